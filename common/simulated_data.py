"""The private data of each simulated node, built deterministically from a scenario.

Every process (the coordinator for its manifest and centralized test set, each
Ray actor for its nodes) derives the same partition from (scenario, seed), so
no data ever travels through Flower messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from consortia.common.arrays import LabeledArrays, concat
from consortia.common.config import SimulationConfig
from consortia.common.datasets import SourceData, load_source
from consortia.common.partition import partition_indices, train_test_split


@dataclass(frozen=True)
class NodeData:
    """One node's local train and test splits."""

    train: LabeledArrays
    test: LabeledArrays
    num_classes: int

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def fingerprint(self) -> str:
        """sha256 of the records the node trains and tests on (train, then test)."""
        return concat([self.train, self.test]).fingerprint()


def simulated_node_data(sim: SimulationConfig, seed: int, partition_id: int) -> NodeData:
    """The data of simulated node `partition_id` (0-based)."""
    return _all_nodes(sim, seed)[partition_id]


def centralized_test_data(sim: SimulationConfig, seed: int) -> LabeledArrays:
    """The coordinator's held-out evaluation set for `evaluation = "centralized"`.

    The source's official test set when it has one (MNIST's t10k); otherwise
    the union of the nodes' local test splits (a stand-in for a public
    benchmark set the coordinator holds).
    """
    source = load_source(sim.data)
    if source.test is not None:
        return source.test
    return concat([node.test for node in _all_nodes(sim, seed)])


def source_of(sim: SimulationConfig) -> SourceData:
    """The loaded source of a scenario (shared, cached)."""
    return load_source(sim.data)


@lru_cache(maxsize=4)
def _all_nodes(sim: SimulationConfig, seed: int) -> tuple[NodeData, ...]:
    source = load_source(sim.data)
    nodes = []
    for partition_id in range(sim.nodes):
        train, test = _local_split(source, sim, seed, partition_id)
        nodes.append(NodeData(train=train, test=test, num_classes=source.num_classes))
    return tuple(nodes)


def _local_split(
    source: SourceData, sim: SimulationConfig, seed: int, partition_id: int
) -> tuple[LabeledArrays, LabeledArrays]:
    parts = _partition(sim, seed)
    local = source.pool.subset(parts[partition_id])
    train_idx, test_idx = train_test_split(local.y, sim.data.test_fraction, seed + partition_id)
    return local.subset(train_idx), local.subset(test_idx)


@lru_cache(maxsize=4)
def _partition(sim: SimulationConfig, seed: int) -> tuple[np.ndarray, ...]:
    labels = load_source(sim.data).pool.y
    return tuple(partition_indices(labels, sim.nodes, sim.partition, seed))
