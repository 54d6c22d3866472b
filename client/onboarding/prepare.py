"""From validated records to train/test arrays, deterministic for the schema's seed.

Order of the steps: drop records without a label; with missing = "drop",
drop records with a missing feature; map labels to class ids; split train /
test (stratified by class unless `split.stratified = false`); with missing =
"impute", fill gaps with the *train* split's median (numbers) or most
frequent category (ties: the earlier declared category); one-hot encode
category columns in the schema's declared order (without the first
category's column where `drop_first = true`); with `standardize = true`,
z-score numeric features with the *train* split's mean and standard
deviation; with `[normalize]` (images), standardise each channel with its
public, declared mean and std instead. No statistic of the test split is
ever used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consortia.client.onboarding.schema import DatasetSpec
from consortia.client.onboarding.validation import (
    ArrayRecords,
    Inspection,
    TableRecords,
    validate,
)
from consortia.common.arrays import LabeledArrays
from consortia.common.errors import DataError
from consortia.common.partition import train_test_split

_CHANNEL_NAMES = {1: ("gray",), 3: ("red", "green", "blue")}


@dataclass(frozen=True)
class PreparedDataset:
    """A node's data ready for training: float32 features, int64 class ids.

    `feature_names` names the columns of tabular features (one-hot columns
    as "column=category"); for image data it names the channels.
    `mean`/`std` are the constants the features were standardised with:
    the train split's statistics with `standardize = true` (0/1 for one-hot
    columns), the schema's public per-channel constants with `[normalize]`,
    else None.
    """

    train: LabeledArrays
    test: LabeledArrays
    feature_names: tuple[str, ...]
    num_classes: int
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    test_rows: np.ndarray | None = None  # each test record's row in the source (group columns)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def prepare(spec: DatasetSpec, inspection: Inspection | None = None) -> PreparedDataset:
    """Validate (unless given a clean `inspection` of `spec`) and prepare the dataset.

    Raises `DataError` listing every problem if the data does not validate,
    or if the split leaves the train or the test part empty.
    """
    if inspection is None:
        inspection = validate(spec)
    else:
        inspection.raise_if_problems()
    records = inspection.records
    keep = np.flatnonzero(records.keep)
    labels = records.labels[keep]
    train, test = _split(labels, spec)
    if len(train) == 0 or len(test) == 0:
        part = "train" if len(train) == 0 else "test"
        raise DataError(
            f"{inspection.source}: the {part} split is empty ({len(keep)} usable records, "
            f"test_fraction = {spec.split.test_fraction}); add records or change "
            "'split.test_fraction'"
        )
    if isinstance(records, TableRecords):
        x, names, numeric = _table_features(spec, records, keep, train, inspection.source)
    else:
        x, names, numeric = _array_features(spec, records, keep, train, inspection.source)
    mean = std = None
    if spec.standardize:
        x, mean, std = _standardize(x, train, numeric, image=_is_image(records))
    elif spec.normalize is not None and _is_image(records):
        scaling = spec.feature_scaling()
        x = scaling.scale_images(x.astype(np.float32, copy=False))
        mean, std = np.asarray(scaling.mean), np.asarray(scaling.std)
    x = x.astype(np.float32, copy=False)
    return PreparedDataset(
        train=LabeledArrays(x[train], labels[train]),
        test=LabeledArrays(x[test], labels[test]),
        feature_names=names,
        num_classes=records.num_classes,
        mean=mean,
        std=std,
        test_rows=keep[test],
    )


def _is_image(records: TableRecords | ArrayRecords) -> bool:
    return isinstance(records, ArrayRecords) and records.raw.image


def _split(labels: np.ndarray, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test positions (into the kept records)."""
    fraction, seed = spec.split.test_fraction, spec.split.seed
    if spec.split.stratified:
        return train_test_split(labels, fraction, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57, 1]))
    order = rng.permutation(len(labels))
    n_test = round(len(labels) * fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _table_features(
    spec: DatasetSpec,
    records: TableRecords,
    keep: np.ndarray,
    train: np.ndarray,
    source: str,
) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    """Feature matrix (float64), its column names, and which columns are numeric."""
    blocks: list[np.ndarray] = []
    names: list[str] = []
    numeric: list[bool] = []
    for column in spec.feature_columns:
        parsed = records.columns[column.name]
        missing = parsed.missing[keep]
        if parsed.numbers is not None:
            values = parsed.numbers[keep].astype(np.float64)
            if missing.any():
                observed = values[train][~missing[train]]
                if len(observed) == 0:
                    raise _no_train_values(source, column.name)
                values = np.where(missing, np.median(observed), values)
            blocks.append(values[:, None])
            names.append(column.name)
            numeric.append(True)
            continue
        assert parsed.texts is not None  # a column without numbers keeps its texts
        categories = column.categories or ()
        index = {c: k for k, c in enumerate(categories)}
        codes = np.array(
            [-1 if m else index[t] for t, m in zip(parsed.texts[keep], missing, strict=True)],
            dtype=np.int64,
        )
        if missing.any():
            observed = codes[train][codes[train] >= 0]
            if len(observed) == 0:
                raise _no_train_values(source, column.name)
            mode = int(np.argmax(np.bincount(observed, minlength=len(categories))))
            codes = np.where(codes < 0, mode, codes)
        encoded = column.encoded_categories  # with drop_first, the first is the all-zero row
        one_hot = np.eye(len(categories), dtype=np.float64)[codes]
        blocks.append(one_hot[:, len(categories) - len(encoded) :])
        names.extend(f"{column.name}={c}" for c in encoded)
        numeric.extend([False] * len(encoded))
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(keep), 0))
    return x, tuple(names), np.asarray(numeric, dtype=bool)


def _no_train_values(source: str, column: str) -> DataError:
    return DataError(
        f"{source}: column '{column}': no value in the train split to impute from; "
        'fill in some values or set missing = "drop"'
    )


def _array_features(
    spec: DatasetSpec,
    records: ArrayRecords,
    keep: np.ndarray,
    train: np.ndarray,
    source: str,
) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
    x = records.x[keep]
    if records.missing_rows[keep].any():
        flat = x.reshape(len(x), -1).copy()
        with np.errstate(all="ignore"):
            medians = np.nanmedian(flat[train], axis=0)
        if np.isnan(medians[np.isnan(flat).any(axis=0)]).any():
            raise _no_train_values(source, records.raw.features_name)
        flat = np.where(np.isnan(flat), medians, flat)
        x = flat.reshape(x.shape)
    if records.raw.image:
        names = _CHANNEL_NAMES.get(x.shape[1], tuple(f"channel{c}" for c in range(x.shape[1])))
        return x, names, np.ones(x.shape[1], dtype=bool)
    key = records.raw.features_name
    names = tuple(f"{key}[{j}]" for j in range(x.shape[1])) if x.ndim == 2 else ()
    return x, names, np.ones(x.shape[1:], dtype=bool)


def _standardize(
    x: np.ndarray, train: np.ndarray, numeric: np.ndarray, *, image: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z-score with train statistics: per channel for images, else per feature.

    A feature that is constant on the train split keeps a std of 1.
    """
    axes = (0, 2, 3) if image else (0,)
    shape = (1, -1, 1, 1) if image else (1, *x.shape[1:])
    mean = x[train].mean(axis=axes, dtype=np.float64)
    std = x[train].std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    mean = np.where(numeric, mean, 0.0)
    std = np.where(numeric, std, 1.0)
    x = (x - mean.reshape(shape).astype(x.dtype)) / std.reshape(shape).astype(x.dtype)
    return x, mean, std
