"""Partitioners of one dataset across simulated nodes: coverage, skew, determinism, errors.

Unit tests on NumPy labels (no Ray, no model): each method gives every
record to at most one node, shows the skew it promises, gives the same split
for the same seed, and fails with one message that names the setting to
change when the split asked for cannot be made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from consortia.common.config import DataConfig, PartitionConfig, SimulationConfig
from consortia.common.config_io import load_scenario
from consortia.common.errors import ConfigError, DataError
from consortia.common.partition import partition_indices
from consortia.simulations.node_data import simulated_node_data
from consortia.simulations.sources import load_source

# Ten classes of unequal size (the largest 3x the smallest), shuffled.
_SIZES = np.array([300, 150, 450, 200, 250, 300, 350, 180, 220, 400])
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), _SIZES))

METHODS: dict[str, PartitionConfig] = {
    "iid": PartitionConfig(method="iid"),
    "dirichlet": PartitionConfig(method="dirichlet", alpha=0.5),
    "pathological": PartitionConfig(method="pathological", classes_per_node=2),
    "quantity": PartitionConfig(method="quantity", alpha=0.5),
}


def _assert_disjoint(parts: list[np.ndarray], total: int, *, complete: bool = True) -> None:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a record went to two nodes"
    assert joined.min() >= 0 and joined.max() < total
    if complete:
        assert len(joined) == total
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def _classes(parts: list[np.ndarray], labels: np.ndarray = LABELS) -> list[int]:
    return [len(np.unique(labels[p])) for p in parts]


# ------------------------------------------------------------ every method


@pytest.mark.parametrize("method", METHODS)
def test_every_record_once_and_same_seed_same_split(method: str) -> None:
    config = METHODS[method]
    parts = partition_indices(LABELS, 12, config, seed=4)
    assert len(parts) == 12
    _assert_disjoint(parts, len(LABELS))
    assert min(len(p) for p in parts) >= config.min_records
    again = partition_indices(LABELS, 12, config, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, 12, config, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


# ------------------------------------------------------------ pathological


@pytest.mark.parametrize(("nodes", "k"), [(10, 2), (7, 3), (30, 1), (5, 10), (100, 2)])
def test_pathological_gives_every_node_exactly_k_classes(nodes: int, k: int) -> None:
    config = PartitionConfig(method="pathological", classes_per_node=k, min_records=1)
    parts = partition_indices(LABELS, nodes, config, seed=1)
    _assert_disjoint(parts, len(LABELS))
    assert _classes(parts) == [k] * nodes
    # Shards are cut in proportion to the classes: node sizes stay comparable.
    sizes = [len(p) for p in parts]
    assert max(sizes) <= 3 * min(sizes)


def test_pathological_handles_a_dominant_class() -> None:
    """A class holding most records still gives at most one shard per node."""
    labels = np.repeat([0, 1, 2, 3], [3000, 100, 100, 100])
    config = PartitionConfig(method="pathological", classes_per_node=2, min_records=1)
    parts = partition_indices(labels, 10, config, seed=0)
    _assert_disjoint(parts, len(labels))
    assert _classes(parts, labels) == [2] * 10
    assert all(0 in labels[p] for p in parts)  # ten shards of class 0, one per node


@pytest.mark.parametrize(
    ("nodes", "k", "match"),
    [
        (5, 11, "classes_per_node = 11 exceeds the 10 classes.*at most 10"),
        (4, 2, "cannot hold all 10 classes; raise 'partition.classes_per_node' to at least 3"),
        (1000, 3, "1000 nodes × partition.classes_per_node = 3 shards exceed the 2800 records"),
    ],
)
def test_impossible_pathological_splits_name_the_setting(nodes: int, k: int, match: str) -> None:
    config = PartitionConfig(method="pathological", classes_per_node=k, min_records=1)
    with pytest.raises(DataError, match=match):
        partition_indices(LABELS, nodes, config, seed=0)


def test_pathological_with_too_small_classes_is_a_clear_error() -> None:
    labels = np.repeat([0, 1, 2], [500, 2, 2])
    config = PartitionConfig(method="pathological", classes_per_node=2, min_records=1)
    with pytest.raises(DataError, match="need more records in the small classes"):
        partition_indices(labels, 10, config, seed=0)


# ---------------------------------------------------------------- quantity


def test_quantity_skews_sizes_but_not_labels() -> None:
    labels = np.random.default_rng(2).integers(0, 10, 20_000)
    skewed = partition_indices(labels, 10, PartitionConfig(method="quantity", alpha=0.3), seed=3)
    even = partition_indices(labels, 10, PartitionConfig(method="quantity", alpha=1000.0), seed=3)
    _assert_disjoint(skewed, len(labels))
    sizes = sorted(len(p) for p in skewed)
    assert sizes[-1] > 10 * sizes[0]
    assert max(len(p) for p in even) < 1.2 * min(len(p) for p in even)
    # Labels stay IID: the big nodes' class mix is the global one.
    overall = np.bincount(labels, minlength=10) / len(labels)
    for part in skewed:
        if len(part) >= 1000:
            mix = np.bincount(labels[part], minlength=10) / len(part)
            assert np.abs(mix - overall).max() < 0.05


def test_quantity_gives_every_node_its_minimum() -> None:
    config = PartitionConfig(method="quantity", alpha=0.05, min_records=40)
    parts = partition_indices(LABELS, 50, config, seed=0)
    _assert_disjoint(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 40


# ------------------------------------------------------------------ column


def test_column_round_robin_over_sorted_values() -> None:
    values = np.array([30, 10, 20, 10, 40, 50, 30, 20, 60, 10])
    labels = np.zeros(len(values), dtype=np.int64)
    config = PartitionConfig(method="column", column="site", min_records=1)
    parts = partition_indices(labels, 3, config, seed=0, column=values)
    _assert_disjoint(parts, len(values))
    # Sorted distinct values 10, 20, 30, 40, 50, 60 -> nodes 0, 1, 2, 0, 1, 2.
    assert [sorted(set(values[p].tolist())) for p in parts] == [[10, 40], [20, 50], [30, 60]]
    assert partition_indices(labels, 3, config, seed=9, column=values)[0].tolist() == (
        parts[0].tolist()
    )


def test_column_explicit_mapping() -> None:
    values = np.array(["north", "south", "east", "north", "west", "east"])
    labels = np.zeros(len(values), dtype=np.int64)
    config = PartitionConfig(
        method="column",
        column="region",
        column_values=(("north",), ("south", "west"), ("east",)),
        min_records=1,
    )
    parts = partition_indices(labels, 3, config, seed=0, column=values)
    assert [values[p].tolist() for p in parts] == [
        ["north", "north"],
        ["south", "west"],
        ["east", "east"],
    ]


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ((("north",), ("south", "west")), "lists 2 nodes' values but simulation.nodes is 3"),
        ((("north",), ("south",), ("west",)), "holds 'east', which .* gives to no node"),
        ((("north", "east"), ("south",), ("west", "up")), "lists 'up', which column 'region'"),
        ((("north", "east"), ("south",), ("west", 3)), "3 is not of the column's type"),
    ],
)
def test_column_mapping_errors(mapping: tuple[tuple[str, ...], ...], match: str) -> None:
    values = np.array(["north", "south", "east", "west"])
    config = PartitionConfig(method="column", column="region", column_values=mapping, min_records=1)
    with pytest.raises(DataError, match=match):
        partition_indices(np.zeros(4, dtype=np.int64), 3, config, seed=0, column=values)


def test_column_with_fewer_values_than_nodes_is_a_clear_error() -> None:
    values = np.array([1.0, 2.0, 1.0, 2.0] * 10)
    config = PartitionConfig(method="column", column="sex", min_records=1)
    with pytest.raises(DataError, match=r"2 distinct values for 3 nodes.*'simulation.nodes'"):
        partition_indices(np.zeros(40, dtype=np.int64), 3, config, seed=0, column=values)


def test_column_below_min_records_names_the_setting() -> None:
    values = np.array([1] * 30 + [2] * 3)
    config = PartitionConfig(method="column", column="site", min_records=5)
    with pytest.raises(DataError, match=r"node 1 only 3 records.*'partition.min_records'"):
        partition_indices(np.zeros(33, dtype=np.int64), 2, config, seed=0, column=values)


def test_column_partition_of_breast_cancer_end_to_end() -> None:
    sim = SimulationConfig(
        nodes=4,
        partition=PartitionConfig(method="column", column="mean radius", min_records=20),
    )
    raw = load_source(sim.data).columns["mean radius"]
    nodes = [simulated_node_data(sim, 0, i) for i in range(4)]
    assert sum(len(n.train) + len(n.test) for n in nodes) == len(raw)
    assert len({n.fingerprint() for n in nodes}) == 4


def test_column_partition_errors_on_the_source() -> None:
    unknown = SimulationConfig(partition=PartitionConfig(method="column", column="radius"))
    with pytest.raises(DataError, match=r"'radius' is not a column of 'breast_cancer'.*'mean"):
        simulated_node_data(unknown, 0, 0)
    images = SimulationConfig(
        data=DataConfig(source="digits"),
        partition=PartitionConfig(method="column", column="pixel"),
    )
    with pytest.raises(DataError, match="needs a tabular source with named columns; 'digits'"):
        simulated_node_data(images, 0, 0)


# ------------------------------------------------------------- max_records


def test_max_records_partitions_a_seeded_subset() -> None:
    sim = SimulationConfig(
        nodes=5,
        data=DataConfig(source="digits", max_records=500),
        partition=PartitionConfig(method="iid"),
    )
    nodes = [simulated_node_data(sim, 1, i) for i in range(5)]
    assert sum(len(n.train) + len(n.test) for n in nodes) == 500
    assert [n.fingerprint() for n in nodes] == [
        simulated_node_data(sim, 1, i).fingerprint() for i in range(5)
    ]
    too_many = SimulationConfig(data=DataConfig(source="digits", max_records=5000))
    with pytest.raises(DataError, match="max_records = 5000 exceeds the 1797 records"):
        simulated_node_data(too_many, 0, 0)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"method": "iid", "classes_per_node": 2}, "'iid' does not use 'classes_per_node'"),
        ({"method": "pathological", "classes_per_node": 2, "alpha": 0.3}, "does not use 'alpha'"),
        ({"method": "pathological"}, "needs 'classes_per_node'"),
        ({"method": "dirichlet", "column": "age"}, "'dirichlet' does not use 'column'"),
        ({"method": "column"}, "method = 'column' needs 'column'"),
        ({"method": "column", "column": "a", "column_values": [[1], []]}, r"\[1\]' is empty"),
        ({"method": "column", "column": "a", "column_values": [[1], [1]]}, "a value for two"),
        ({"method": "quantity", "classes_per_node": 3}, "'quantity' does not use"),
        ({"method": "pathological", "classes_per_node": 0}, "greater than or equal to 1"),
        ({"method": "shards"}, "Input should be 'iid', 'dirichlet', 'pathological'"),
    ],
)
def test_config_rejects_settings_the_method_does_not_read(
    settings: dict[str, object], match: str
) -> None:
    with pytest.raises(ValidationError, match=match):
        PartitionConfig.model_validate(settings)


def test_config_keeps_accepting_what_it_accepted() -> None:
    """alpha with 'iid' (ignored) is tolerated: scenarios switch methods without removing it."""
    assert PartitionConfig(method="iid", alpha=0.3).alpha == 0.3
    assert PartitionConfig().concentration == 0.5
    again = PartitionConfig.model_validate(
        PartitionConfig(method="pathological", classes_per_node=2).model_dump()
    )
    assert again.classes_per_node == 2  # a resumed run re-validates the dumped config


def test_scenario_file_error_is_one_readable_line(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[simulation.partition]\nmethod = "iid"\nclasses_per_node = 2\n')
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    assert caught.value.message == (
        f"{path}: simulation.partition: Value error, method = 'iid' does not use "
        "'classes_per_node'; remove it or choose the method that reads it"
    )
