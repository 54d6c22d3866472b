"""Data sources, IDX reading and partitioning."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from consortia.common.arrays import LabeledArrays
from consortia.common.config import (
    DataConfig,
    ImageNormalization,
    PartitionConfig,
    SimulationConfig,
)
from consortia.common.errors import DataError
from consortia.common.idx import read_idx
from consortia.common.partition import partition_indices, train_test_split
from consortia.simulations.node_data import centralized_test_data, simulated_node_data
from consortia.simulations.sources import load_source

MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _idx_bytes(values: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, values.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in values.shape)
    return header + values.tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(images)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    np.testing.assert_array_equal(read_idx(path), images)


def test_idx_errors_are_precise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(_idx_bytes(np.zeros((4, 5), dtype=np.uint8))[:-3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(truncated)


def test_mnist_idx_folder(mnist_dir: Path) -> None:
    mnist = ImageNormalization(mean=(0.1307,), std=(0.3081,))  # as the MNIST scenarios declare
    source = load_source(DataConfig(source="idx", path=str(mnist_dir), normalize=mnist))
    assert source.pool.x.shape == (60_000, 1, 28, 28)
    assert source.test is not None and source.test.x.shape == (10_000, 1, 28, 28)
    assert np.bincount(source.pool.y).tolist() == MNIST_TRAIN_LABEL_COUNTS
    assert source.num_classes == 10
    assert abs(float(source.pool.x.mean())) < 0.01  # normalised with the public constants
    fixed = load_source(DataConfig(source="idx", path=str(mnist_dir)))  # none declared: [0, 1]
    assert float(fixed.pool.x.min()) == 0.0 and float(fixed.pool.x.max()) == 1.0


def test_idx_source_without_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no train-images"):
        load_source(DataConfig(source="idx", path=str(tmp_path)))
    with pytest.raises(DataError, match="no such folder"):
        load_source(DataConfig(source="idx", path=str(tmp_path / "nope")))


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition_covers_every_record_once(method: str) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    config = PartitionConfig(method=method, alpha=0.3, min_records=20)
    parts = partition_indices(labels, 12, config, seed=5)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert min(len(p) for p in parts) >= 20
    again = partition_indices(labels, 12, config, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_small_alpha_is_skewed() -> None:
    labels = np.repeat(np.arange(10), 500)
    skewed = partition_indices(labels, 10, PartitionConfig(alpha=0.1, min_records=10), seed=1)
    even = partition_indices(labels, 10, PartitionConfig(alpha=100.0, min_records=10), seed=1)

    def top_class_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))

    assert top_class_share(skewed) > 0.5 > top_class_share(even)


def test_impossible_partition_is_a_clear_error() -> None:
    labels = np.zeros(50, dtype=np.int64)
    with pytest.raises(DataError, match="cannot give 10 nodes"):
        partition_indices(labels, 10, PartitionConfig(min_records=10), seed=0)


def test_local_split_is_stratified() -> None:
    labels = np.repeat([0, 1], [80, 20])
    train, test = train_test_split(labels, 0.25, seed=0)
    assert np.bincount(labels[test]).tolist() == [20, 5]
    assert len(np.intersect1d(train, test)) == 0


def test_simulated_nodes_are_disjoint_and_fingerprinted() -> None:
    sim = SimulationConfig(nodes=4, partition=PartitionConfig(alpha=1.0, min_records=40))
    nodes = [simulated_node_data(sim, 3, i) for i in range(4)]
    fingerprints = {n.fingerprint() for n in nodes}
    assert len(fingerprints) == 4
    total = sum(len(n.train) + len(n.test) for n in nodes)
    assert total == len(load_source(sim.data).pool)
    assert len(centralized_test_data(sim, 3)) == sum(len(n.test) for n in nodes)
    # Features are on the public schema scale, shared by every node.
    assert all(np.abs(n.train.x).max() <= 1.0 + 1e-6 for n in nodes)


def test_fingerprint_detects_a_single_changed_value() -> None:
    node = simulated_node_data(SimulationConfig(), 0, 0)
    changed = node.train.x.copy()
    changed[3, 2] += 1e-3
    assert LabeledArrays(changed, node.train.y).fingerprint() != node.train.fingerprint()
