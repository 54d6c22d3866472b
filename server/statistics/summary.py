"""What the coordinator makes of the nodes' noisy statistics: post-processing only.

Every figure here is computed from DP releases (common/statistics.py), so
none costs the nodes more privacy. The noise std of each released number is
known, so every estimate carries an error bar: ± z × its standard error at
the job's `confidence` (z = 2.58 at 99%), by the delta method for ratios
(proportions, means, accuracies). Negative noisy counts are clipped to zero
before they become proportions; a count below `min_count` is suppressed
(shown as missing): it is mostly noise, however honestly released.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
from pydantic import BaseModel, Field

from consortia.common.statistics import FeatureRelease, StatisticsRelease

# A node is an outlier when its robust z-score (distance from the median in
# units of 1.4826 × MAD, the normal-consistent spread) exceeds this.
OUTLIER_Z = 3.5
_MIN_NODES_FOR_OUTLIERS = 4


class Estimate(BaseModel):
    """A value and the half-width of its error bar (None: suppressed, or not estimable)."""

    value: float | None
    error: float | None = None

    def covers(self, truth: float) -> bool:
        """Whether the true value lies within the error bar (for checks and tests)."""
        if self.value is None or self.error is None:
            return False
        return abs(self.value - truth) <= self.error


class LabelMix(BaseModel):
    """One node's (or the pool's) label distribution, with its error bars."""

    records: Estimate
    counts: list[Estimate]
    proportions: list[Estimate]
    total_variation: float | None = None  # to the pooled distribution
    jensen_shannon: float | None = None  # distance (√ of the divergence, base 2)
    # L2 distance to the pooled mix with the noise's expected share taken out:
    # √max(0, Σ(p̂ − p̄)² − Σ se²). TV and JS grow with the noise (a small node's
    # mix looks skewed for its noise alone); this one does not, so it ranks skew.
    skew: float | None = None


class FeatureView(BaseModel):
    """One feature at one node (or pooled): histogram shares, mean, spread, shift."""

    values: Estimate  # records with a value
    histogram: list[float | None]  # share of the values in each bin (None: suppressed)
    mean: Estimate
    std: float | None
    shift: float | None = None  # (node mean − pooled mean) / pooled std
    shift_noise: float | None = None  # standard error of `shift` from the noise
    total_variation: float | None = None  # histogram, to the pooled one


class FeatureSummary(BaseModel):
    name: str
    low: float
    high: float
    edges: list[float]
    pooled: FeatureView
    nodes: dict[str, FeatureView]


class MissingSummary(BaseModel):
    records_read: Estimate
    per_column: dict[str, Estimate]


class AccuracyView(BaseModel):
    accuracy: Estimate
    per_class: list[Estimate]
    per_group: dict[str, Estimate] = Field(default_factory=dict)


class Outlier(BaseModel):
    node: str
    why: str


class Spend(BaseModel):
    """What the query cost one node, as it reported it (its ledger's figures)."""

    epsilon: float
    epsilon_spent: float
    delta: float
    noise_multiplier: float


class StatisticsSummary(BaseModel):
    """stats.json's findings: pooled and per-node distributions, skew, shift, outliers."""

    confidence: float
    min_count: float
    spend: dict[str, Spend]
    labels_pooled: LabelMix
    labels: dict[str, LabelMix]
    most_skewed: str | None
    features: list[FeatureSummary]
    not_pooled: list[str] = Field(default_factory=list)  # released on different ranges or bins
    unranged: list[str]
    missing: dict[str, MissingSummary]
    accuracy_pooled: AccuracyView | None = None
    accuracy: dict[str, AccuracyView] = Field(default_factory=dict)
    group_column: str | None = None
    outliers: list[Outlier]


def summarize(
    releases: dict[str, StatisticsRelease],
    confidence: float,
    min_count: float,
    group_column: str | None = None,
) -> StatisticsSummary:
    """Pool the nodes' releases (at least one) and compare every node with the pool."""
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    names = sorted(releases)
    pooled_counts = np.sum([releases[n].label_counts for n in names], axis=0)
    pooled_std = _pooled_std([releases[n].std("labels") for n in names])
    labels_pooled = _label_mix(pooled_counts, pooled_std, z, min_count)
    pooled_shares, _ = _shares(pooled_counts, pooled_std)
    labels: dict[str, LabelMix] = {}
    skews: dict[str, tuple[float, float]] = {}  # node -> (skew, its noise scale)
    for name in names:
        counts, std = np.asarray(releases[name].label_counts), releases[name].std("labels")
        mix = labels[name] = _label_mix(counts, std, z, min_count)
        shares, variance = _shares(counts, std)
        if shares is None or pooled_shares is None:
            continue
        # From every cell, suppressed or not: suppression is for display only.
        mix.total_variation = 0.5 * float(np.abs(shares - pooled_shares).sum())
        mix.jensen_shannon = _jensen_shannon(shares, pooled_shares)
        excess = float(((shares - pooled_shares) ** 2).sum()) - variance
        mix.skew = math.sqrt(max(0.0, excess))
        skews[name] = (mix.skew, math.sqrt(variance))
    features, not_pooled = _features(releases, z, min_count)
    accuracy = {
        n: _pooled_accuracy({n: r}, z, min_count)
        for n, r in sorted(releases.items())
        if r.accuracy is not None
    }
    most = max(skews, key=lambda n: skews[n][0], default=None)
    return StatisticsSummary(
        confidence=confidence,
        min_count=min_count,
        spend={
            n: Spend(
                epsilon=r.epsilon,
                epsilon_spent=r.epsilon_spent,
                delta=r.delta,
                noise_multiplier=r.noise_multiplier,
            )
            for n, r in sorted(releases.items())
        },
        labels_pooled=labels_pooled,
        labels=labels,
        most_skewed=most if most is not None and skews[most][0] > 0 else None,
        features=features,
        not_pooled=not_pooled,
        unranged=sorted({name for r in releases.values() for name in r.unranged}),
        missing={n: _missing(r, z, min_count) for n, r in sorted(releases.items()) if r.missing},
        accuracy_pooled=_pooled_accuracy(releases, z, min_count) if accuracy else None,
        accuracy=accuracy,
        group_column=group_column,
        outliers=_outliers(skews, features, z),
    )


# ------------------------------------------------------------------ labels


def _label_mix(counts: np.ndarray, std: float, z: float, min_count: float) -> LabelMix:
    classes = len(counts)
    total = float(counts.sum())
    records = Estimate(value=total, error=z * std * math.sqrt(classes))
    if not _shown(np.asarray([total]), min_count)[0]:
        records = Estimate(value=None)
    shown = _shown(counts, min_count)
    cells = [
        Estimate(value=float(c), error=z * std) if keep else Estimate(value=None)
        for c, keep in zip(counts, shown, strict=True)
    ]
    shares, _ = _shares(counts, std)
    if shares is None:
        return LabelMix(records=records, counts=cells, proportions=[Estimate(value=None)] * classes)
    errors = z * _share_errors(shares, std, counts)
    proportions = [
        Estimate(value=float(p), error=float(e)) if keep else Estimate(value=None)
        for p, e, keep in zip(shares, errors, shown, strict=True)
    ]
    return LabelMix(records=records, counts=cells, proportions=proportions)


def _shares(counts: np.ndarray, std: float) -> tuple[np.ndarray | None, float]:
    """(proportions from the clipped noisy counts, the sum of their variances); None if all ≤ 0."""
    shares = _clipped_shares(counts)
    if shares is None:
        return None, 0.0
    return shares, float((_share_errors(shares, std, counts) ** 2).sum())


def _clipped_shares(counts: np.ndarray) -> np.ndarray | None:
    """Shares of noisy counts, negatives clipped to 0 (None when nothing is left)."""
    clipped = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    return clipped / clipped.sum() if clipped.sum() > 0 else None


def _share_errors(shares: np.ndarray, std: float, counts: np.ndarray) -> np.ndarray:
    """Standard error of each share p = a / (a + b), a one count, b the others (delta method):
    Var ≈ σ²((1 − p)² + p²(C − 1)) / N²."""
    total = float(np.clip(counts, 0.0, None).sum())
    classes = len(shares)
    errors: np.ndarray = std * np.sqrt((1 - shares) ** 2 + shares**2 * (classes - 1)) / total
    return errors


def _shown(counts: np.ndarray, min_count: float) -> np.ndarray:
    """Which noisy counts are shown: those at least `min_count` (all, when it is 0)."""
    return counts >= min_count if min_count > 0 else np.ones(len(counts), dtype=bool)


def _jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    middle = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / middle[mask])).sum())

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def _pooled_std(stds: Sequence[float]) -> float:
    """The noise std of a sum of independent releases."""
    return math.sqrt(sum(s * s for s in stds))


# ------------------------------------------------------------------ features


def _features(
    releases: dict[str, StatisticsRelease], z: float, min_count: float
) -> tuple[list[FeatureSummary], list[str]]:
    """Features pooled bin by bin, and those the nodes released on different ranges."""
    by_name: dict[str, dict[str, tuple[FeatureRelease, StatisticsRelease]]] = {}
    for node, release in sorted(releases.items()):
        for feature in release.features:
            by_name.setdefault(feature.name, {})[node] = (feature, release)
    summaries, not_pooled = [], []
    for name, per_node in by_name.items():
        spans = {(f.low, f.high, len(f.histogram)) for f, _ in per_node.values()}
        if len(spans) != 1:
            not_pooled.append(name)
            continue
        low, high, bins = spans.pop()
        views = {node: _feature_view([pair], z, min_count) for node, pair in per_node.items()}
        pooled = _feature_view(list(per_node.values()), z, min_count)
        pooled_shares = _clipped_shares(np.sum([f.histogram for f, _ in per_node.values()], 0))
        for node, view in views.items():
            _compare(view, pooled, z)
            mine = _clipped_shares(np.asarray(per_node[node][0].histogram))
            if mine is not None and pooled_shares is not None and view.mean.value is not None:
                # From every bin, suppressed or not (suppression is for display only).
                view.total_variation = 0.5 * float(np.abs(mine - pooled_shares).sum())
        summaries.append(
            FeatureSummary(
                name=name,
                low=low,
                high=high,
                edges=np.linspace(low, high, bins + 1).tolist(),
                pooled=pooled,
                nodes=views,
            )
        )
    return summaries, not_pooled


def _feature_view(
    parts: list[tuple[FeatureRelease, StatisticsRelease]], z: float, min_count: float
) -> FeatureView:
    feature = parts[0][0]
    centre, half = (feature.low + feature.high) / 2, (feature.high - feature.low) / 2
    histogram = np.sum([f.histogram for f, _ in parts], axis=0)
    total_sum = sum(f.sum for f, _ in parts)
    total_squares = sum(f.sum_squares for f, _ in parts)
    std_bin = _pooled_std([r.std("histograms") for _, r in parts])
    std_sum = _pooled_std([r.std("sums") for _, r in parts])
    count = float(histogram.sum())
    values = Estimate(value=count, error=z * std_bin * math.sqrt(len(histogram)))
    if count < max(min_count, 1.0, values.error or 0.0):  # the count itself is mostly noise
        return FeatureView(
            values=values, histogram=[None] * len(histogram), mean=Estimate(value=None), std=None
        )
    shares = _clipped_shares(histogram)
    if shares is None:
        shares = np.zeros(len(histogram))
    mean_u = total_sum / count
    # μ = S / N: Var ≈ (σ_S² + μ² σ_N²) / N², σ_N² = bins × σ_bin².
    error_u = z * math.sqrt(std_sum**2 + mean_u**2 * len(histogram) * std_bin**2) / count
    variance_u = max(0.0, total_squares / count - mean_u**2)
    return FeatureView(
        values=values,
        histogram=[
            float(s) if keep else None
            for s, keep in zip(shares, _shown(histogram, min_count), strict=True)
        ],
        mean=Estimate(value=centre + half * float(np.clip(mean_u, -1, 1)), error=half * error_u),
        std=half * math.sqrt(variance_u),
    )


def _compare(view: FeatureView, pooled: FeatureView, z: float) -> None:
    if view.mean.value is None or pooled.mean.value is None:
        return
    if pooled.std:
        view.shift = (view.mean.value - pooled.mean.value) / pooled.std
        view.shift_noise = (view.mean.error or 0.0) / z / pooled.std


# ------------------------------------------------------------------ missing values


def _missing(release: StatisticsRelease, z: float, min_count: float) -> MissingSummary:
    assert release.missing is not None
    error = z * release.std("missing")

    def estimate(value: float) -> Estimate:
        shown = bool(_shown(np.asarray([value]), min_count)[0])
        return Estimate(value=value, error=error) if shown else Estimate(value=None)

    return MissingSummary(
        records_read=estimate(release.missing.records_read),
        per_column={c: estimate(v) for c, v in release.missing.per_column.items()},
    )


# ------------------------------------------------------------------ accuracy


def _ratio(
    correct: float, total: float, var_correct: float, var_total: float, z: float, min_count: float
) -> Estimate:
    """correct / total with its delta-method error bar; None when total is below `min_count`
    (or not positive): such a ratio is mostly noise."""
    if total <= 0 or total < min_count:
        return Estimate(value=None)
    ratio = correct / total
    error = z * math.sqrt(var_correct + ratio**2 * var_total) / total
    return Estimate(value=float(np.clip(ratio, 0.0, 1.0)), error=error)


def _pooled_accuracy(
    releases: dict[str, StatisticsRelease], z: float, min_count: float
) -> AccuracyView:
    """Accuracy over the releases' test records: in all, per class, per group."""
    parts = [(r.accuracy, r) for r in releases.values() if r.accuracy is not None]
    var = sum(r.std("accuracy") ** 2 for _, r in parts)
    var_class = sum(r.std("classes") ** 2 for _, r in parts)
    total = np.sum([a.class_total for a, _ in parts], axis=0)
    correct = np.sum([a.class_correct for a, _ in parts], axis=0)
    per_group: dict[str, Estimate] = {}
    groups = [(a, r) for a, r in parts if a.group_total]
    if groups:
        var_g = sum(r.std("groups") ** 2 for _, r in groups)
        for name in sorted({g for a, _ in groups for g in a.group_total}):
            g_total = sum(a.group_total.get(name, 0.0) for a, _ in groups)
            g_right = sum(a.group_correct.get(name, 0.0) for a, _ in groups)
            per_group[name] = _ratio(g_right, g_total, var_g, var_g, z, min_count)
    right, tested = sum(a.correct for a, _ in parts), sum(a.total for a, _ in parts)
    return AccuracyView(
        accuracy=_ratio(right, tested, var, var, z, min_count),
        per_class=[
            _ratio(float(c), float(t), var_class, var_class, z, min_count)
            for c, t in zip(correct, total, strict=True)
        ],
        per_group=per_group,
    )


# ------------------------------------------------------------------ outliers


def _outliers(
    skews: dict[str, tuple[float, float]], features: list[FeatureSummary], z: float
) -> list[Outlier]:
    """Nodes far from the others in label mix or in feature means.

    A robust z-score: the distance from the median node in units of the
    nodes' spread (1.4826 × MAD), or of the node's own noise when that is
    larger — a small node's skew or shift is noisier, and noise alone must
    not make an outlier.
    """
    found = [
        Outlier(node=n, why=f"label mix: skew {d:.3f} from the pool (robust z {s:.1f})")
        for n, d, s in _robust_outliers(skews)
    ]
    shifts: dict[str, tuple[float, float]] = {}
    for feature in features:
        for node, view in feature.nodes.items():
            if view.shift is not None and abs(view.shift) >= shifts.get(node, (0.0, 0.0))[0]:
                shifts[node] = (abs(view.shift), view.shift_noise or 0.0)
    found += [
        Outlier(node=n, why=f"feature means: largest shift {d:.2f} pooled std (robust z {s:.1f})")
        for n, d, s in _robust_outliers(shifts)
    ]
    return found


def _robust_outliers(values: dict[str, tuple[float, float]]) -> list[tuple[str, float, float]]:
    """(node, value, z) of each node whose value is OUTLIER_Z robust z-scores above the median."""
    if len(values) < _MIN_NODES_FOR_OUTLIERS:
        return []
    data = np.asarray([v for v, _ in values.values()])
    median = float(np.median(data))
    spread = 1.4826 * float(np.median(np.abs(data - median)))
    found = []
    for node, (value, noise) in values.items():
        scale = max(spread, noise, 1e-9)
        if (value - median) / scale > OUTLIER_Z:
            found.append((node, value, (value - median) / scale))
    return found
