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
    unranged: list[str]
    missing: dict[str, MissingSummary]
    accuracy_pooled: AccuracyView | None = None
    accuracy: dict[str, AccuracyView] = Field(default_factory=dict)
    group_column: str | None = None
    outliers: list[Outlier]


def summarize(
    releases: dict[str, StatisticsRelease], confidence: float, min_count: float
) -> StatisticsSummary:
    """Pool the nodes' releases (at least one) and compare every node with the pool."""
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    names = sorted(releases)
    labels_pooled = _label_mix(
        np.sum([releases[n].label_counts for n in names], axis=0),
        _pooled_std([releases[n].std("labels") for n in names]),
        z,
        min_count,
    )
    labels = {
        n: _label_mix(np.asarray(r.label_counts), r.std("labels"), z, min_count)
        for n, r in sorted(releases.items())
    }
    pooled_shares = _shares(labels_pooled)
    for mix in labels.values():
        shares = _shares(mix)
        if shares is not None and pooled_shares is not None:
            mix.total_variation = 0.5 * float(np.abs(shares - pooled_shares).sum())
            mix.jensen_shannon = _jensen_shannon(shares, pooled_shares)
            variance = sum(((p.error or 0.0) / z) ** 2 for p in mix.proportions)
            excess = float(((shares - pooled_shares) ** 2).sum()) - variance
            mix.skew = math.sqrt(max(0.0, excess))
    distances = {n: m.skew for n, m in labels.items() if m.skew is not None}
    features = _features(releases, z, min_count)
    first = releases[names[0]]
    accuracy = {n: _accuracy(r, z) for n, r in sorted(releases.items()) if r.accuracy is not None}
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
        most_skewed=max(distances, key=lambda n: distances[n]) if distances else None,
        features=features,
        unranged=sorted({name for r in releases.values() for name in r.unranged}),
        missing={n: _missing(r, z, min_count) for n, r in sorted(releases.items()) if r.missing},
        accuracy_pooled=_pooled_accuracy(releases, z) if accuracy else None,
        accuracy=accuracy,
        group_column=first.accuracy.group_column if first.accuracy is not None else None,
        outliers=_outliers(distances, features),
    )


# ------------------------------------------------------------------ labels


def _label_mix(counts: np.ndarray, std: float, z: float, min_count: float) -> LabelMix:
    classes = len(counts)
    clipped = np.clip(counts, 0.0, None)
    total = float(clipped.sum())
    records = Estimate(value=float(counts.sum()), error=z * std * math.sqrt(classes))
    shown = _shown(counts, min_count)
    cells = [
        Estimate(value=float(c), error=z * std) if keep else Estimate(value=None)
        for c, keep in zip(counts, shown, strict=True)
    ]
    if total <= 0:
        return LabelMix(records=records, counts=cells, proportions=[Estimate(value=None)] * classes)
    shares = clipped / total
    # p = a / (a + b), a one count, b the others: Var ≈ σ²((1 − p)² + p²(C − 1)) / N².
    errors = z * std * np.sqrt((1 - shares) ** 2 + shares**2 * (classes - 1)) / total
    proportions = [
        Estimate(value=float(p), error=float(e)) if keep else Estimate(value=None)
        for p, e, keep in zip(shares, errors, shown, strict=True)
    ]
    return LabelMix(records=records, counts=cells, proportions=proportions)


def _shown(counts: np.ndarray, min_count: float) -> np.ndarray:
    """Which noisy counts are shown: those at least `min_count` (all, when it is 0)."""
    return counts >= min_count if min_count > 0 else np.ones(len(counts), dtype=bool)


def _shares(mix: LabelMix) -> np.ndarray | None:
    """The mix's proportions with suppressed cells counted as 0 (None when all are)."""
    values = np.asarray([p.value or 0.0 for p in mix.proportions])
    return values / values.sum() if values.sum() > 0 else None


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
) -> list[FeatureSummary]:
    """Features every node released on one range (others could not be pooled bin by bin)."""
    by_name: dict[str, dict[str, tuple[FeatureRelease, StatisticsRelease]]] = {}
    for node, release in sorted(releases.items()):
        for feature in release.features:
            by_name.setdefault(feature.name, {})[node] = (feature, release)
    summaries = []
    for name, per_node in by_name.items():
        spans = {(f.low, f.high, len(f.histogram)) for f, _ in per_node.values()}
        if len(spans) != 1:
            continue
        low, high, bins = spans.pop()
        views = {node: _feature_view([pair], z, min_count) for node, pair in per_node.items()}
        pooled = _feature_view(list(per_node.values()), z, min_count)
        for view in views.values():
            _compare(view, pooled)
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
    return summaries


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
    clipped = np.clip(histogram, 0.0, None)
    shares = clipped / clipped.sum() if clipped.sum() > 0 else clipped
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


def _compare(view: FeatureView, pooled: FeatureView) -> None:
    if view.mean.value is None or pooled.mean.value is None:
        return
    if pooled.std:
        view.shift = (view.mean.value - pooled.mean.value) / pooled.std
    mine = np.asarray([h or 0.0 for h in view.histogram])
    theirs = np.asarray([h or 0.0 for h in pooled.histogram])
    if mine.sum() > 0 and theirs.sum() > 0:
        view.total_variation = 0.5 * float(np.abs(mine / mine.sum() - theirs / theirs.sum()).sum())


# ------------------------------------------------------------------ missing values


def _missing(release: StatisticsRelease, z: float, min_count: float) -> MissingSummary:
    assert release.missing is not None
    error = z * release.std("missing")

    def estimate(value: float) -> Estimate:
        shown = bool(_shown(np.asarray([value]), min_count)[0])
        return Estimate(value=value, error=error) if shown else Estimate(value=None)

    return MissingSummary(
        records_read=Estimate(value=release.missing.records_read, error=error),
        per_column={c: estimate(v) for c, v in release.missing.per_column.items()},
    )


# ------------------------------------------------------------------ accuracy


def _ratio(
    correct: float, total: float, var_correct: float, var_total: float, z: float
) -> Estimate:
    """correct / total with its delta-method error bar; None when total is not positive."""
    if total <= 0:
        return Estimate(value=None)
    ratio = correct / total
    error = z * math.sqrt(var_correct + ratio**2 * var_total) / total
    return Estimate(value=float(np.clip(ratio, 0.0, 1.0)), error=error)


def _accuracy(release: StatisticsRelease, z: float) -> AccuracyView:
    return _pooled_accuracy({"": release}, z)


def _pooled_accuracy(releases: dict[str, StatisticsRelease], z: float) -> AccuracyView:
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
            per_group[name] = _ratio(g_right, g_total, var_g, var_g, z)
    return AccuracyView(
        accuracy=_ratio(
            sum(a.correct for a, _ in parts), sum(a.total for a, _ in parts), var, var, z
        ),
        per_class=[
            _ratio(float(c), float(t), var_class, var_class, z)
            for c, t in zip(correct, total, strict=True)
        ],
        per_group=per_group,
    )


# ------------------------------------------------------------------ outliers


def _outliers(distances: dict[str, float], features: list[FeatureSummary]) -> list[Outlier]:
    """Nodes far from the others in label mix or in feature means (robust z-scores)."""
    found = [
        Outlier(node=n, why=f"label mix: skew {d:.3f} from the pool (robust z {s:.1f})")
        for n, d, s in _robust_outliers(distances)
    ]
    shifts: dict[str, float] = {}
    for feature in features:
        for node, view in feature.nodes.items():
            if view.shift is not None:
                shifts[node] = max(shifts.get(node, 0.0), abs(view.shift))
    found += [
        Outlier(node=n, why=f"feature means: largest shift {d:.2f} pooled std (robust z {s:.1f})")
        for n, d, s in _robust_outliers(shifts)
    ]
    return found


def _robust_outliers(values: dict[str, float]) -> list[tuple[str, float, float]]:
    if len(values) < _MIN_NODES_FOR_OUTLIERS:
        return []
    data = np.asarray(list(values.values()))
    median = float(np.median(data))
    spread = 1.4826 * float(np.median(np.abs(data - median)))
    spread = max(spread, 1e-3 + 0.05 * abs(median))  # identical nodes: no division by zero
    return [
        (node, value, (value - median) / spread)
        for node, value in values.items()
        if (value - median) / spread > OUTLIER_Z
    ]
