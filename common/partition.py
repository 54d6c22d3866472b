"""Splitting one dataset across simulated nodes: IID, label, class-shard, quantity or column skew.

Every method is deterministic for (data, nodes, config, seed), gives every
record to at most one node (all of them, except where a method says
otherwise), and fails with a `DataError` that names the setting to change
when the split asked for is impossible. `partition_indices` dispatches on
`PartitionConfig.method`:

- `iid`: a seeded shuffle cut into equal parts;
- `dirichlet`: per class, proportions ~ Dirichlet(alpha) (Hsu et al., 2019);
- `pathological`: every node holds exactly `classes_per_node` classes
  (McMahan et al., 2017);
- `quantity`: node sizes ∝ Dirichlet(alpha), labels IID (Li et al., 2022);
- `column`: the value of one feature column picks the node.

Written here in NumPy rather than taken from `flwr-datasets`: that package is
not installed, its partitioners work on Hugging Face `datasets.Dataset`
objects (not NumPy arrays), and it would pull the Hugging Face stack into
every node for a few dozen lines of index arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from consortia.common.config import PartitionConfig
from consortia.common.errors import DataError

_MAX_DIRICHLET_DRAWS = 1000
_SHOWN = 5  # values listed in an error message


def partition_indices(
    labels: np.ndarray,
    num_nodes: int,
    config: PartitionConfig,
    seed: int,
    *,
    column: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Return one sorted index array per node; no record is in two of them.

    Parameters
    ----------
    labels : np.ndarray
        Class id of every record of the pool.
    num_nodes : int
        How many nodes to split the pool across.
    config : PartitionConfig
        The method and its parameters.
    seed : int
        The job's seed: the same seed gives the same split.
    column : np.ndarray, optional
        The values of `config.column` for every record (method 'column' only).
    """
    if len(labels) < num_nodes * config.min_records:
        raise DataError(
            f"{len(labels)} records cannot give {num_nodes} nodes at least "
            f"{config.min_records} each; lower 'simulation.nodes' or 'partition.min_records'"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A27]))
    if config.method == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_nodes)]
    if config.method == "dirichlet":
        return _dirichlet(labels, num_nodes, config, rng)
    if config.method == "pathological":
        assert config.classes_per_node is not None  # guaranteed by PartitionConfig
        parts = _pathological(labels, num_nodes, config.classes_per_node, rng)
    elif config.method == "quantity":
        parts = _quantity(len(labels), num_nodes, config, rng)
    else:
        if column is None:
            raise DataError("partition.method = 'column' needs the column's values")
        parts = _by_column(column, num_nodes, config)
    _check_min_records(parts, config)
    return parts


def _check_min_records(parts: list[np.ndarray], config: PartitionConfig) -> None:
    smallest = min(range(len(parts)), key=lambda node: len(parts[node]))
    if len(parts[smallest]) < config.min_records:
        raise DataError(
            f"partition.method = '{config.method}' gives node {smallest} only "
            f"{len(parts[smallest])} records (partition.min_records = {config.min_records}); "
            f"lower 'partition.min_records' or 'simulation.nodes'"
            + (" or change 'partition.column_values'" if config.method == "column" else "")
        )


# ------------------------------------------------------------------ dirichlet


def _dirichlet(
    labels: np.ndarray, num_nodes: int, config: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, share its records among nodes by proportions ~ Dirichlet(alpha).

    Draws again until every node holds at least `min_records` (the usual
    rejection scheme of Hsu et al., 2019); fails clearly if alpha and the data
    make that practically impossible.
    """
    alpha = config.concentration
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for members in by_class:
            shares = rng.dirichlet(np.full(num_nodes, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for node, chunk in enumerate(np.split(members, cuts)):
                parts[node].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(m) for m in merged) >= config.min_records:
            return merged
    raise DataError(
        f"a Dirichlet(alpha={alpha}) split of {len(labels)} records over {num_nodes} "
        f"nodes left some node below {config.min_records} records in {_MAX_DIRICHLET_DRAWS} "
        "draws; raise 'partition.alpha' or lower 'partition.min_records'"
    )


# --------------------------------------------------------------- pathological


def _pathological(
    labels: np.ndarray, num_nodes: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Every node gets k shards of k distinct classes (McMahan et al., 2017).

    McMahan et al. sort the records by label, cut them into nodes × k shards
    and deal k shards to each node; a shard can then straddle two classes
    and a node end up with two shards of one class. Here each class is cut
    into its own shards (so a shard holds one class), their number
    proportional to the class's size but at most one per node, and the shards,
    grouped by class, are dealt round-robin: a class has at most `num_nodes`
    shards, so no node gets two of one class, and every node holds exactly k
    classes. The seed shuffles the records within a class, the order of the
    classes and which node sits at which place of the deal.
    """
    classes, sizes = np.unique(labels, return_counts=True)
    _check_pathological(len(labels), len(classes), num_nodes, k)
    cap = np.minimum(sizes, num_nodes)
    if num_nodes * k > cap.sum():
        raise DataError(
            f"{num_nodes} nodes × partition.classes_per_node = {k} shards of distinct classes "
            f"per node need more records in the small classes (a class gives at most one shard "
            f"per node and per record: {int(cap.sum())} here); lower "
            "'partition.classes_per_node' or 'simulation.nodes'"
        )
    counts = _shard_counts(sizes, num_nodes * k, cap)
    shards: list[np.ndarray] = []
    for c in rng.permutation(len(classes)):
        members = rng.permutation(np.flatnonzero(labels == classes[c]))
        shards.extend(np.array_split(members, counts[c]))
    seat_of_node = rng.permutation(num_nodes)
    return [np.sort(np.concatenate(shards[seat::num_nodes])) for seat in seat_of_node]


def _check_pathological(num_records: int, num_classes: int, num_nodes: int, k: int) -> None:
    if k > num_classes:
        raise DataError(
            f"partition.classes_per_node = {k} exceeds the {num_classes} classes in the data; "
            f"lower 'partition.classes_per_node' to at most {num_classes}"
        )
    if num_nodes * k < num_classes:
        need = -(-num_classes // num_nodes)
        raise DataError(
            f"{num_nodes} nodes × partition.classes_per_node = {k} shards cannot hold all "
            f"{num_classes} classes; raise 'partition.classes_per_node' to at least {need} "
            "or 'simulation.nodes'"
        )
    if num_nodes * k > num_records:
        raise DataError(
            f"{num_nodes} nodes × partition.classes_per_node = {k} shards exceed the "
            f"{num_records} records; lower 'partition.classes_per_node' or 'simulation.nodes'"
        )


def _shard_counts(sizes: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Apportion `total` shards to classes ∝ `sizes`: one each, then D'Hondt, within `cap`.

    Proportional shard counts keep shard sizes about equal (the shard
    scheme's point); the cap (at most one shard per node, and per record)
    is what lets every node's k shards be of k distinct classes. The callers'
    checks (k ≤ classes, nodes·k ≤ records) make `total` ≤ sum(cap).
    """
    counts = np.ones(len(sizes), dtype=np.int64)
    for _ in range(total - len(sizes)):
        quotient = np.where(counts < cap, sizes / (counts + 1), -1.0)
        counts[int(np.argmax(quotient))] += 1
    return counts


# ------------------------------------------------------------------- quantity


def _quantity(
    num_records: int, num_nodes: int, config: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Quantity skew: node sizes = min_records + (rest ∝ Dirichlet(alpha)), labels IID.

    A Dirichlet over the nodes rather than a power law: it is the quantity
    skew of Li et al. (2022, "Federated learning on non-IID data silos"), it
    shares `alpha` and its meaning with the 'dirichlet' method (small: a few
    nodes hold most records; large: near equal sizes), and it needs no
    rejection loop: the `min_records` floor is given first and only the rest
    is shared out, so the split never fails once the records suffice.
    """
    rest = num_records - num_nodes * config.min_records
    shares = rng.dirichlet(np.full(num_nodes, config.concentration))
    sizes = config.min_records + _largest_remainder(shares, rest)
    order = rng.permutation(num_records)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Whole numbers ∝ `shares` that add up to `total` exactly."""
    exact = shares * total
    whole: np.ndarray = np.floor(exact).astype(np.int64)
    short = total - int(whole.sum())
    whole[np.argsort(whole - exact, kind="stable")[:short]] += 1
    return whole


# --------------------------------------------------------------------- column


def _by_column(values: np.ndarray, num_nodes: int, config: PartitionConfig) -> list[np.ndarray]:
    """Records with the same value of the column go to the same node.

    Without `column_values` the distinct values, sorted, are dealt to the
    nodes round-robin (value i to node i mod nodes): deterministic without
    a seed, and it spreads neighbouring values (ages, sites by id) over the
    nodes. With `column_values`, node i gets the values listed at i; a value
    of the data listed for no node is an error rather than silently dropped.
    """
    distinct = np.unique(values)
    if np.issubdtype(distinct.dtype, np.floating) and np.isnan(distinct).any():
        raise DataError(
            f"column '{config.column}' has missing values (NaN): a record without a value "
            "belongs to no node; choose another 'partition.column'"
        )
    if config.column_values is None:
        if len(distinct) < num_nodes:
            raise DataError(
                f"column '{config.column}' has {len(distinct)} distinct values for "
                f"{num_nodes} nodes: some node would get nothing; lower 'simulation.nodes' "
                "or choose another 'partition.column'"
            )
        node_of = {value: i % num_nodes for i, value in enumerate(distinct.tolist())}
    else:
        node_of = _mapped_values(distinct, num_nodes, config)
    owners = np.array([node_of[v] for v in values.tolist()], dtype=np.int64)
    return [np.flatnonzero(owners == node) for node in range(num_nodes)]


def _mapped_values(
    distinct: np.ndarray, num_nodes: int, config: PartitionConfig
) -> dict[object, int]:
    """Value → node from `column_values`, checked against the values the column holds."""
    mapping = config.column_values
    assert mapping is not None
    if len(mapping) != num_nodes:
        raise DataError(
            f"partition.column_values lists {len(mapping)} nodes' values but "
            f"simulation.nodes is {num_nodes}; give one list per node"
        )
    node_of: dict[object, int] = {}
    for node, listed in enumerate(mapping):
        for value in listed:
            node_of[_as_column_value(value, distinct, config)] = node
    present = set(distinct.tolist())
    absent = [v for v in node_of if v not in present]
    if absent:
        raise DataError(
            f"partition.column_values lists {_some(absent)}, which column '{config.column}' "
            "never holds; correct or remove them"
        )
    unassigned = [v for v in distinct.tolist() if v not in node_of]
    if unassigned:
        raise DataError(
            f"column '{config.column}' holds {_some(unassigned)}, which partition.column_values "
            "gives to no node; add them to a node's list"
        )
    return node_of


def _as_column_value(
    value: float | int | str, distinct: np.ndarray, config: PartitionConfig
) -> object:
    """A listed value in the column's own type (numbers compare as numbers, text as text)."""
    numeric = bool(np.issubdtype(distinct.dtype, np.number))
    if numeric == isinstance(value, str):
        kind = "numbers" if numeric else "text"
        raise DataError(
            f"partition.column_values: {value!r} is not of the column's type: column "
            f"'{config.column}' holds {kind}"
        )
    return float(value) if numeric else value


def _some(values: Sequence[object]) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:_SHOWN])
    more = f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else ""
    return shown + more


# ---------------------------------------------------------------- local split


def train_test_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified local split: each class contributes `test_fraction` of its records."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57]))
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(members) * test_fraction)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
