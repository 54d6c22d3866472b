"""The private data of each simulated node, built deterministically from a scenario.

Every process (the coordinator for its manifest and centralized test set, each
Ray actor for its nodes) derives the same partition from (scenario, seed), so
no data ever travels through Flower messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from consortia.common.arrays import LabeledArrays, concat
from consortia.common.config import (
    BUNDLED_SOURCES,
    DataConfig,
    PartitionConfig,
    ScenarioConfig,
    SimulationConfig,
)
from consortia.common.config_io import LoadedScenario, validate_model
from consortia.common.errors import ConfigError, ConsortiaError, DataError
from consortia.common.partition import partition_indices, train_test_split
from consortia.simulations.sources import SourceData, data_path, load_source


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
    source = source_of(sim)
    if source.test is not None:
        return source.test
    return concat([node.test for node in _all_nodes(sim, seed)])


def partition_label_counts(config: ScenarioConfig) -> dict[str, tuple[int, ...]] | None:
    """Every virtual node's label counts (train and test split), as the simulation made them.

    The coordinator derives the same partition its virtual nodes do, from
    (scenario, seed). None for data this code cannot rebuild: the report then
    has no chart, and the run never fails for it.
    """
    sim = config.simulation
    try:
        data = [simulated_node_data(sim, config.seed, pid) for pid in range(sim.nodes)]
    except ConsortiaError:
        return None
    return {
        sim.node_name(pid): tuple(
            int(c)
            for c in np.bincount(np.concatenate([d.train.y, d.test.y]), minlength=d.num_classes)
        )
        for pid, d in enumerate(data)
    }


def source_of(sim: SimulationConfig) -> SourceData:
    """The loaded source of a scenario (shared, cached), checked against the node count."""
    check_data_fits(sim)
    return load_source(sim.data)


def scenario_with_data(loaded: LoadedScenario, data: Path | None = None) -> LoadedScenario:
    """`loaded` with absolute data paths, and `data` (`--data`) as `[simulation.data] path`.

    Paths in a scenario file are relative to the file's folder, so a scenario
    can sit beside its data and move with it; `data`, a command-line path,
    is relative to the working directory. They are made absolute here, once,
    because the Ray actors and a later `--resume` read them from wherever
    they run. A 'files' scenario without `path` reads its files from the
    scenario's folder. Raises `ConfigError` for `data` with a bundled source,
    and `DataError` where the data and the node count or partition disagree.
    """
    current = loaded.config.simulation.data
    if data is not None and current.source in BUNDLED_SOURCES:
        raise ConfigError(
            f"--data sets the data folder of the 'idx' and 'files' sources; {loaded.source} "
            f"uses scikit-learn's bundled '{current.source}' data: drop --data"
        )
    scenario = Path(loaded.source)
    base = scenario.parent if scenario.is_file() else Path.cwd()
    update: dict[str, str] = {}
    if data is not None:
        update["path"] = _absolute(data, Path.cwd())
    elif current.path is not None:
        update["path"] = _absolute(Path(current.path), base)
    elif current.source == "files":
        update["path"] = _absolute(base, base)
    if current.schema_file is not None:
        update["schema_file"] = _absolute(Path(current.schema_file), base)
    changed = {key: value for key, value in update.items() if getattr(current, key) != value}
    if changed:
        loaded = _with_data(loaded, {**current.model_dump(), **changed})
    check_data_fits(loaded.config.simulation)
    return loaded


def _absolute(path: Path, base: Path) -> str:
    """`path` from `base` (unless absolute), normalised but with symlinks kept as written."""
    return os.path.abspath(base / path.expanduser())  # noqa: PTH100 - keep symlinks


def _with_data(loaded: LoadedScenario, data: dict[str, object]) -> LoadedScenario:
    """`loaded` with `[simulation.data]` replaced by `data`, validated as a `DataConfig`."""
    new_data = validate_model(DataConfig, data, f"{loaded.source}: simulation.data")
    simulation = loaded.config.simulation.model_copy(update={"data": new_data})
    config = loaded.config.model_copy(update={"simulation": simulation})
    return loaded.model_copy(update={"config": config})


def check_data_fits(sim: SimulationConfig) -> None:
    """Raise `DataError` where `[simulation.data]` and the rest of `[simulation]` disagree,
    or where the data folder is missing ('idx': or still unset).

    Checked here, before any data is read, because `DataConfig` alone does
    not know the node count or the partition, and must accept a path left to
    `--data`.
    """
    data = sim.data
    if data.source in ("idx", "files"):
        data_path(data)  # raises while the path is unset ('idx') or names no folder
    if data.source != "files":
        return
    assert data.files is not None  # DataConfig
    if len(data.files) != sim.nodes:
        raise DataError(
            f"simulation.data.files lists {len(data.files)} files but simulation.nodes is "
            f"{sim.nodes}: each simulated node reads its own file; list one per node"
        )
    if sim.partition != PartitionConfig():
        raise DataError(
            "source = 'files' is already partitioned (one file per node): remove "
            "[simulation.partition]"
        )


@dataclass(frozen=True)
class Canaries:
    """A scenario's canaries, and which of them its canary node trains on."""

    records: LabeledArrays
    inside: np.ndarray  # bool per canary: appended to the node's training split


def canaries_of(sim: SimulationConfig, seed: int) -> Canaries | None:
    """The `[simulation.canaries]` records, drawn from the seed (None without that block).

    Features uniform over each feature's observed range in the pool, labels
    uniform over the classes: points no model fits without memorising them.
    """
    if sim.canaries is None:
        return None
    source = source_of(sim)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA7A]))
    pool = source.pool.x.reshape(len(source.pool), -1)
    low, high = pool.min(axis=0), pool.max(axis=0)
    count = sim.canaries.count
    x = rng.uniform(low, high, size=(count, pool.shape[1])).astype(np.float32)
    y = rng.integers(0, source.num_classes, size=count).astype(source.pool.y.dtype)
    records = LabeledArrays(x.reshape(count, *source.pool.x.shape[1:]), y)
    return Canaries(records=records, inside=rng.random(count) < 0.5)


@lru_cache(maxsize=4)
def _all_nodes(sim: SimulationConfig, seed: int) -> tuple[NodeData, ...]:
    source = source_of(sim)
    if source.nodes is not None:
        nodes = [
            NodeData(train=train, test=test, num_classes=source.num_classes)
            for train, test in source.nodes
        ]
    else:
        nodes = []
        for partition_id in range(sim.nodes):
            train, test = _local_split(source, sim, seed, partition_id)
            nodes.append(NodeData(train=train, test=test, num_classes=source.num_classes))
    canaries = canaries_of(sim, seed)
    if canaries is not None:
        assert sim.canaries is not None
        index = sim.canaries.node - 1
        node = nodes[index]
        planted = canaries.records.subset(np.flatnonzero(canaries.inside))
        nodes[index] = NodeData(concat([node.train, planted]), node.test, node.num_classes)
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
    """Each node's records, as indices into the source's pool."""
    source = source_of(sim)
    chosen = _chosen_records(sim, seed, len(source.pool))
    column = _column_values(source, sim)
    parts = partition_indices(
        source.pool.y[chosen],
        sim.nodes,
        sim.partition,
        seed,
        column=None if column is None else column[chosen],
    )
    return tuple(chosen[part] for part in parts)


def _chosen_records(sim: SimulationConfig, seed: int, pool_size: int) -> np.ndarray:
    """The pool records to partition: all of them, or a seeded subset of `max_records`."""
    wanted = sim.data.max_records
    if wanted is None:
        return np.arange(pool_size)
    if wanted > pool_size:
        raise DataError(
            f"simulation.data.max_records = {wanted} exceeds the {pool_size} records of "
            f"source '{sim.data.source}'; lower it or remove it"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B5E7]))
    return np.sort(rng.choice(pool_size, size=wanted, replace=False))


def _column_values(source: SourceData, sim: SimulationConfig) -> np.ndarray | None:
    """The raw values of `partition.column` (method 'column'), or None for other methods."""
    name = sim.partition.column
    if sim.partition.method != "column" or name is None:
        return None
    if not source.columns:
        raise DataError(
            f"partition.method = 'column' needs a tabular source with named columns; "
            f"'{sim.data.source}' has none: choose another 'partition.method'"
        )
    if name not in source.columns:
        raise DataError(
            f"partition.column = '{name}' is not a column of '{sim.data.source}'; "
            f"its columns: {', '.join(repr(c) for c in source.columns)}"
        )
    return source.columns[name]
