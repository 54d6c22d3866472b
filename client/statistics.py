"""A node's answer to a statistics query: exact statistics of its records, then Gaussian noise.

The exact values never leave this module: `release_statistics` adds the
noise of each block (common/statistics.py) before building the reply, and
the ClientApp records the query's ε in the node's account before calling it.
What is described: the node's usable records (train and test split), their
labels, and each feature on its public range — a tabular column, or an
image channel's mean intensity per record. With a model, its predictions on
the node's test split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from consortia.client.onboarding.prepare import PreparedDataset
from consortia.client.onboarding.schema import ColumnSpec
from consortia.client.onboarding.validation import Inspection, TableRecords
from consortia.client.policy import Refusal
from consortia.common.config import StatisticsConfig
from consortia.common.privacy import AccountantName, Release, epsilon
from consortia.common.protocol import RefusalCode
from consortia.common.statistics import (
    AccuracyRelease,
    Block,
    FeatureRelease,
    MissingRelease,
    query_noise,
    sensitivities,
)

MISSING_GROUP = "(missing)"


@dataclass(frozen=True)
class DataFacts:
    """What a node's statistics describe: its usable records, feature by feature.

    `features`: one row per record (the same records as `labels`), one
    column per name in `names`, NaN where the value is missing. On a
    deployed node these are the values parsed from the file, never imputed
    or standardised: an imputed median or a standardised value depends on
    every other record, so one record could move many bins. `ranges`: the
    public range the node knows for a feature. `missing`: records read and
    missing values per column of the source (None where the source has no
    such notion). `test_groups`: per category column, its declared
    categories (public: the schema's, plus one for a missing value) and each
    test record's.
    """

    features: np.ndarray
    names: tuple[str, ...]
    ranges: Mapping[str, tuple[float, float]]
    labels: np.ndarray
    missing: tuple[int, Mapping[str, int]] | None = None
    test_groups: Mapping[str, tuple[tuple[str, ...], np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class Predictions:
    """The model's predicted class of each test record, its true class, and its group.

    `group_names` are the group column's declared categories: every node
    releases a count for each, so the set of names says nothing of its data.
    """

    predicted: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] = ()


def described(x: np.ndarray) -> np.ndarray:
    """The features a statistics query describes: a table's columns, an image's channel means."""
    if x.ndim == 2:
        return x.astype(np.float64, copy=False)
    features: np.ndarray
    if x.ndim == 4:  # (records, channels, height, width)
        features = x.mean(axis=(2, 3), dtype=np.float64)
    else:
        features = x.reshape(len(x), 1, -1).mean(axis=2, dtype=np.float64)
    return features


def deployed_facts(prepared: PreparedDataset, inspection: Inspection) -> DataFacts:
    """A registered dataset's usable records as parsed: schema ranges, missing values, groups."""
    records = inspection.records
    keep = np.flatnonzero(records.keep)
    groups: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    if isinstance(records, TableRecords):
        features, names = _table_values(inspection.spec.feature_columns, records, keep)
        missing = {name: int(column.missing.sum()) for name, column in records.columns.items()}
        ranges: Mapping[str, tuple[float, float]] = inspection.spec.feature_ranges()
        rows = prepared.test_rows if prepared.test_rows is not None else np.zeros(0, np.int64)
        for name, column in records.columns.items():
            categories = column.spec.categories
            if column.texts is not None and categories is not None:
                marker = _missing_marker(categories)
                values = np.where(column.missing[rows], marker, column.texts[rows])
                groups[name] = ((*categories, marker), values.astype(str))
    else:
        features = described(records.x[keep])  # NaN stays NaN: a missing value
        names = prepared.feature_names
        if len(names) != features.shape[1]:  # an array source without per-column names
            names = tuple(f"x{j}" for j in range(features.shape[1]))
        # Decoded images are uint8 pixels / 255: [0, 1] by the format, not by the data.
        ranges = dict.fromkeys(names, (0.0, 1.0)) if records.raw.image else {}
        missing = {records.raw.features_name: int(records.missing_rows.sum())}
    return DataFacts(
        features=features,
        names=names,
        ranges=ranges,
        labels=records.labels[keep],
        missing=(len(records), missing),
        test_groups=groups,
    )


def _table_values(
    columns: tuple[ColumnSpec, ...], records: TableRecords, keep: np.ndarray
) -> tuple[np.ndarray, tuple[str, ...]]:
    """The feature columns as the model sees them (one 0/1 column per encoded category), NaN
    if missing."""
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for column in columns:
        parsed = records.columns[column.name]
        missing = parsed.missing[keep]
        if parsed.numbers is not None:
            values = parsed.numbers[keep].astype(np.float64)
            blocks.append(np.where(missing, np.nan, values)[:, None])
            names.append(column.name)
            continue
        texts = parsed.texts[keep] if parsed.texts is not None else np.zeros(len(keep), str)
        for category in column.encoded_categories:
            blocks.append(np.where(missing, np.nan, texts == category).astype(np.float64)[:, None])
            names.append(f"{column.name}={category}")
    values = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(keep), 0))
    return values, tuple(names)


def _missing_marker(categories: tuple[str, ...]) -> str:
    """The group name of a missing value: never one of the declared categories."""
    marker = MISSING_GROUP
    while marker in categories:
        marker += "'"
    return marker


@dataclass(frozen=True)
class Selection:
    """The features a query releases (with the range each is binned over) and those it cannot."""

    columns: tuple[int, ...]
    ranges: tuple[tuple[float, float], ...]
    unranged: tuple[str, ...]


def select_features(facts: DataFacts, config: StatisticsConfig) -> Selection | Refusal:
    """The job's features (default: every one) that have a range, from the job or the node."""
    wanted = config.features if config.features is not None else facts.names
    unknown = [name for name in wanted if name not in facts.names]
    if unknown:
        return Refusal(
            code=RefusalCode.UNKNOWN_FEATURE,
            reason=f"the query names feature(s) {unknown} this node's data does not have "
            f"(it has {len(facts.names)}: {', '.join(facts.names[:8])}"
            + (", …)" if len(facts.names) > 8 else ")"),
        )
    columns, ranges, unranged = [], [], []
    for name in wanted:
        span = config.ranges.get(name) or facts.ranges.get(name)
        if span is None:
            unranged.append(name)
            continue
        columns.append(facts.names.index(name))
        ranges.append((float(span[0]), float(span[1])))
    return Selection(tuple(columns), tuple(ranges), tuple(unranged))


def query_blocks(
    facts: DataFacts, selection: Selection, config: StatisticsConfig
) -> dict[Block, float]:
    """The blocks the node releases for the query, with their L2 sensitivities."""
    missing_columns = None if facts.missing is None else len(facts.missing[1])
    return sensitivities(
        len(selection.columns),
        missing_columns,
        accuracy=config.model is not None,
        groups=config.group_column is not None,
    )


@dataclass(frozen=True)
class QueryPlan:
    """What the node would release for a query and what it costs, before any data is read out."""

    selection: Selection
    blocks: dict[Block, float]
    sigma: float  # of every block
    release: Release  # the one release the blocks compose to, as the ledger records it
    epsilon: float  # of the query alone, at the node's δ


def plan_query(
    facts: DataFacts, config: StatisticsConfig, delta: float, accountant: AccountantName
) -> QueryPlan | Refusal:
    """The query's features, blocks and noise on this node, or why it cannot be answered.

    Shared by the ClientApp (which then records and releases) and `node
    check-job --statistics` (which only shows it). Raises `PrivacyError` when
    no noise reaches the query's target ε.
    """
    selection = select_features(facts, config)
    if isinstance(selection, Refusal):
        return selection
    if config.group_column is not None and config.group_column not in facts.test_groups:
        known = f" (it has {', '.join(facts.test_groups)})" if facts.test_groups else ""
        return Refusal(
            code=RefusalCode.UNKNOWN_GROUP_COLUMN,
            reason=f"'{config.group_column}' is not a category column of this node's dataset"
            + known,
        )
    blocks = query_blocks(facts, selection, config)
    sigma, release = query_noise(config, len(blocks), delta, accountant)
    cost = epsilon([release], delta, accountant)
    return QueryPlan(selection, blocks, sigma, release, cost)


Noise = Callable[[Block, int], np.ndarray]


def release_statistics(
    num_classes: int,
    facts: DataFacts,
    selection: Selection,
    predictions: Predictions | None,
    config: StatisticsConfig,
    noise: Noise,
) -> dict[str, object]:
    """Every block's noisy values (`noise(block, size)` draws its noise), as release fields."""
    counts = np.bincount(facts.labels.astype(np.int64), minlength=num_classes)[:num_classes]
    fields: dict[str, object] = {
        "label_counts": _tuple(counts + noise("labels", num_classes)),
        "unranged": selection.unranged,
    }
    if selection.columns:
        fields["features"] = _feature_releases(facts, selection, config.bins, noise)
    if facts.missing is not None:
        read, per_column = facts.missing
        noisy = np.asarray([read, *per_column.values()], dtype=np.float64)
        noisy = noisy + noise("missing", len(noisy))
        fields["missing"] = MissingRelease(
            records_read=float(noisy[0]),
            per_column={name: float(v) for name, v in zip(per_column, noisy[1:], strict=True)},
        )
    if predictions is not None:
        fields["accuracy"] = _accuracy_release(predictions, num_classes, config, noise)
    return fields


def _feature_releases(
    facts: DataFacts, selection: Selection, bins: int, noise: Noise
) -> tuple[FeatureRelease, ...]:
    values = facts.features[:, list(selection.columns)]
    low = np.asarray([r[0] for r in selection.ranges])
    high = np.asarray([r[1] for r in selection.ranges])
    present = ~np.isnan(values)
    # u in [−1, 1]: the value's place in its range; clipping is what bounds the sensitivity.
    u = np.clip(2.0 * (np.nan_to_num(values) - low) / (high - low) - 1.0, -1.0, 1.0)
    u = np.where(present, u, 0.0)
    index = np.minimum(((u + 1.0) / 2.0 * bins).astype(np.int64), bins - 1)
    count = len(selection.columns)
    histograms = np.zeros((count, bins))
    for j in range(count):
        histograms[j] = np.bincount(index[present[:, j], j], minlength=bins)
    histograms += noise("histograms", count * bins).reshape(count, bins)
    sums = u.sum(axis=0) + noise("sums", count)
    squares = (u * u).sum(axis=0) + noise("squares", count)
    return tuple(
        FeatureRelease(
            name=facts.names[column],
            low=float(low[j]),
            high=float(high[j]),
            histogram=_tuple(histograms[j]),
            sum=float(sums[j]),
            sum_squares=float(squares[j]),
        )
        for j, column in enumerate(selection.columns)
    )


def _accuracy_release(
    predictions: Predictions, num_classes: int, config: StatisticsConfig, noise: Noise
) -> AccuracyRelease:
    labels = predictions.labels.astype(np.int64)
    right = predictions.predicted == labels
    total = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.float64)
    correct = np.bincount(labels[right], minlength=num_classes)[:num_classes].astype(np.float64)
    overall = np.asarray([len(labels), right.sum()], dtype=np.float64) + noise("accuracy", 2)
    noisy = np.concatenate([total, correct]) + noise("classes", 2 * num_classes)
    release = AccuracyRelease(
        total=float(overall[0]),
        correct=float(overall[1]),
        class_total=_tuple(noisy[:num_classes]),
        class_correct=_tuple(noisy[num_classes:]),
    )
    if config.group_column is None or predictions.groups is None:
        return release
    names = predictions.group_names
    group_total = np.asarray([(predictions.groups == g).sum() for g in names], dtype=np.float64)
    group_right = np.asarray(
        [(right & (predictions.groups == g)).sum() for g in names], dtype=np.float64
    )
    noisy = np.concatenate([group_total, group_right]) + noise("groups", 2 * len(names))
    return release.model_copy(
        update={
            "group_column": config.group_column,
            "group_total": dict(zip(names, noisy[: len(names)].tolist(), strict=True)),
            "group_correct": dict(zip(names, noisy[len(names) :].tolist(), strict=True)),
        }
    )


def _tuple(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)
