"""Splitting one dataset across simulated nodes: IID or Dirichlet label skew.

Written here (a few lines of NumPy) rather than taken from `flwr-datasets`,
which would pull the Hugging Face stack into every node for two functions.
"""

from __future__ import annotations

import numpy as np

from consortia.common.config import PartitionConfig
from consortia.common.errors import DataError

_MAX_DIRICHLET_DRAWS = 1000


def partition_indices(
    labels: np.ndarray, num_nodes: int, config: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Return one sorted index array per node; together they cover every record once."""
    if len(labels) < num_nodes * config.min_records:
        raise DataError(
            f"{len(labels)} records cannot give {num_nodes} nodes at least "
            f"{config.min_records} each; lower 'simulation.nodes' or 'partition.min_records'"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A27]))
    if config.method == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_nodes)]
    return _dirichlet(labels, num_nodes, config, rng)


def _dirichlet(
    labels: np.ndarray, num_nodes: int, config: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, share its records among nodes by proportions ~ Dirichlet(alpha).

    Draws again until every node holds at least `min_records` (the usual
    rejection scheme of Hsu et al., 2019); fails clearly if alpha and the data
    make that practically impossible.
    """
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
        for members in by_class:
            shares = rng.dirichlet(np.full(num_nodes, config.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for node, chunk in enumerate(np.split(members, cuts)):
                parts[node].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(m) for m in merged) >= config.min_records:
            return merged
    raise DataError(
        f"a Dirichlet(alpha={config.alpha}) split of {len(labels)} records over {num_nodes} "
        f"nodes left some node below {config.min_records} records in {_MAX_DIRICHLET_DRAWS} "
        "draws; raise 'partition.alpha' or lower 'partition.min_records'"
    )


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
