"""The node's label histogram, released only under the Gaussian mechanism.

Label skew across nodes is what most often sinks a federation, and the
coordinator cannot see it: each node's class counts are data. A node whose
policy allows it answers the roster query with its training labels' counts
plus Gaussian noise of std σ per class (L2 sensitivity 1: one record moves one
count by one), charged to its privacy account *before* the reply leaves.
"""

from __future__ import annotations

import numpy as np

from consortia.client.ledger import BudgetExceededError
from consortia.client.spend import PrivacyAccount
from consortia.common import protocol as p
from consortia.common.arrays import LabeledArrays
from consortia.common.privacy import Mechanism, histogram_release


def noisy_counts(
    labels: np.ndarray, num_classes: int, sigma: float, rng: np.random.Generator
) -> list[float]:
    """Class counts plus independent N(0, σ²) noise on each (may be negative: post-process)."""
    counts = np.bincount(labels.astype(np.int64), minlength=num_classes)[:num_classes]
    return [float(c) for c in counts + rng.normal(0.0, sigma, size=num_classes)]


def release_label_histogram(
    train: LabeledArrays,
    num_classes: int,
    sigma: float,
    account: PrivacyAccount,
    seed: int,
) -> dict[str, list[float] | str]:
    """Record the release, then draw it: the node-record entries for the roster.

    The caller has checked that the node may share it. If the budget cannot
    afford it (recording refuses), the histogram is withheld instead.
    """
    try:
        account.record(histogram_release(sigma), server_round=0, mechanism=Mechanism.GAUSSIAN)
    except BudgetExceededError as exc:
        return {p.NODE_HISTOGRAM_WITHHELD: f"privacy budget: {exc.message}"}
    counts = noisy_counts(train.y, num_classes, sigma, np.random.default_rng(seed))
    return {p.NODE_LABEL_HISTOGRAM: counts}
