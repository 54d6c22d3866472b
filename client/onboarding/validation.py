"""Checking a source against its schema: typed columns, class ids, and every problem.

`inspect` reads and parses without raising on bad content, so that the
quality report and the fingerprint can be computed for any readable file;
`validate` is `inspect` plus one `DataError` listing all problems found.

Checks on a table: the header names the schema's columns (or, without a
header, every row has as many fields as the schema has columns); every row
has the right number of fields; numbers parse (and are whole in 'int'
columns) and lie in [min, max]; categories are among `categories`; labels are
in `[label_mapping]` or are valid class ids; some records are left after the
missing-value policy. Array sources get the same label checks, plus a check
for infinite feature values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from consortia.client.onboarding.problems import MAX_SHOWN, Problem, ProblemLog
from consortia.client.onboarding.readers import RawArrays, RawTable, read_source
from consortia.client.onboarding.schema import MAX_CLASSES, ColumnSpec, DatasetSpec, DicomSource

CHECK_FAILED = "data check failed"


@dataclass(frozen=True)
class ParsedColumn:
    """One table column, typed. Masks are per record, in file order.

    `numbers` (numeric columns) holds each parsed value, NaN where the cell
    is missing or not a number; `texts` holds the trimmed cell texts (None
    where the file holds no value), derived from the numbers for Parquet
    columns stored as numbers. In a column with `categories`, a cell that
    matches a category holds that category's declared text, and
    `normalised` marks the cells written otherwise (`1.0` for the number
    category "1"; see `ColumnSpec.match_categories`).
    """

    spec: ColumnSpec
    index: int
    texts: np.ndarray | None
    numbers: np.ndarray | None
    missing: np.ndarray
    invalid: np.ndarray
    out_of_range: np.ndarray
    normalised: np.ndarray | None = None

    @property
    def unparsed(self) -> np.ndarray:
        """Present but not a number at all (numeric columns; all False otherwise)."""
        if self.numbers is None:
            return np.zeros(len(self.missing), dtype=bool)
        unparsed: np.ndarray = ~self.missing & np.isnan(self.numbers)
        return unparsed

    def text(self, i: int) -> str:
        """The value of record `i` as shown in messages."""
        if self.texts is not None and self.texts[i] is not None:
            return str(self.texts[i])
        if self.numbers is not None:
            return number_text(float(self.numbers[i]))
        return ""


@dataclass(frozen=True)
class TableRecords:
    """A parsed table: typed columns, class ids (-1: none) and the records kept."""

    raw: RawTable
    columns: dict[str, ParsedColumn]
    labels: np.ndarray
    keep: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ArrayRecords:
    """Decoded arrays: float32 features (images as (N, C, H, W); uint8 pixels / 255).

    NaN marks a missing feature value; `labels` are class ids (-1: none).
    """

    raw: RawArrays
    x: np.ndarray
    labels: np.ndarray
    keep: np.ndarray
    num_classes: int
    missing_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Inspection:
    """Everything one read of a source tells: the records and the problems found."""

    spec: DatasetSpec
    records: TableRecords | ArrayRecords
    problems: ProblemLog

    @property
    def source(self) -> str:
        return ", ".join(str(path) for path in self.spec.source_files())

    def raise_if_problems(self, header: str = CHECK_FAILED) -> None:
        self.problems.raise_if_any(header)


def _read(spec: DatasetSpec) -> RawTable | RawArrays:
    if isinstance(spec.source, DicomSource):
        # Imported here: pydicom is imported only when a DICOM source is read.
        from consortia.client.onboarding.dicom_reader import read_dicom

        return read_dicom(spec.source)
    return read_source(spec)


def inspect(spec: DatasetSpec) -> Inspection:
    """Read and parse the source; collect problems instead of raising on them.

    Raises `DataError` only when the source cannot be read at all (missing,
    empty, not of its format).
    """
    raw = _read(spec)
    log = ProblemLog()
    log.extend(raw.problems)
    if isinstance(raw, RawTable):
        records: TableRecords | ArrayRecords = _table_records(spec, raw, log)
    else:
        records = _array_records(spec, raw, log)
    return Inspection(spec=spec, records=records, problems=log)


def validate(spec: DatasetSpec) -> Inspection:
    """`inspect`, then raise one `DataError` listing every problem, if any."""
    inspection = inspect(spec)
    inspection.raise_if_problems()
    return inspection


def number_text(value: float) -> str:
    """A number as shown to people: whole numbers without '.0'."""
    if np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _report(log: ProblemLog, kind: str, mask: np.ndarray, make: Callable[[int], Problem]) -> None:
    """Add the problems at `mask`: all counted, the first few spelled out."""
    index = np.flatnonzero(mask)
    log.add_batch(kind, (make(int(i)) for i in index[:MAX_SHOWN]), len(index))


# ---------------------------------------------------------------------- tables


def _table_records(spec: DatasetSpec, raw: RawTable, log: ProblemLog) -> TableRecords:
    markers = tuple(getattr(spec.source, "missing_values", ()))
    display = str(raw.path)
    columns = {
        column.name: _parse_column(column, index, raw, markers, display, log)
        for index, column in enumerate(spec.columns)
    }
    label_spec = spec.label_column
    assert label_spec is not None  # guaranteed by DatasetSpec for table sources
    label = columns[label_spec.name]
    labels, num_classes = _table_labels(spec, label, raw, display, log)
    usable = ~label.missing
    if spec.missing == "drop":
        for column in spec.feature_columns:
            usable &= ~columns[column.name].missing
    if len(raw) and not usable.any():
        log.add(Problem(display, _nothing_left(spec, columns, len(raw))), kind="nothing_left")
    return TableRecords(
        raw=raw,
        columns=columns,
        labels=labels,
        keep=usable & (labels >= 0),
        num_classes=num_classes,
    )


def _nothing_left(spec: DatasetSpec, columns: dict[str, ParsedColumn], n: int) -> str:
    label = spec.label_column
    assert label is not None
    if columns[label.name].missing.all():
        return (
            f"no records left: the label column '{label.name}' is missing in all {n} records; "
            "check that the right column is marked label = true"
        )
    worst = max(spec.feature_columns, key=lambda c: int(columns[c.name].missing.sum()))
    count = int(columns[worst.name].missing.sum())
    return (
        f"no records left after dropping records with a missing value (most often missing: "
        f"column '{worst.name}', in {count} of {n} records); fill in the data, add the right "
        "markers to 'missing_values', or set missing = \"impute\""
    )


def _parse_column(
    column: ColumnSpec,
    index: int,
    raw: RawTable,
    markers: tuple[str, ...],
    display: str,
    log: ProblemLog,
) -> ParsedColumn:
    # pandas here, not at the top: every node process imports this module (the
    # ClientApp's admission checks), few validate a table, and pandas costs a
    # second of start-up per process (benchmarks/startup.py).
    import pandas as pd

    cells = raw.cells[column.name]
    n = len(raw)
    texts, numbers = cells.texts, cells.numbers
    if numbers is not None:
        missing = np.isnan(numbers)
        if column.type == "category" or column.ignore:
            texts = np.array(
                [None if m else number_text(v) for v, m in zip(numbers, missing, strict=True)],
                dtype=object,
            )
            numbers = None
    else:
        assert texts is not None
        series = pd.Series(texts, dtype=object)
        missing = (series.isna() | series.isin(markers)).to_numpy(dtype=bool)
        if column.type != "category" and not column.ignore:
            present = series.where(~missing, None)
            numbers = pd.to_numeric(present, errors="coerce").to_numpy(
                dtype=np.float64, na_value=np.nan
            )
    invalid = np.zeros(n, dtype=bool)
    out_of_range = np.zeros(n, dtype=bool)
    unknown = normalised = None
    if column.categories is not None and not column.ignore:
        assert texts is not None  # a category column's numbers became texts above
        texts, unknown, normalised = _match_categories(column, texts, missing)
    parsed = ParsedColumn(column, index, texts, numbers, missing, invalid, out_of_range, normalised)
    if column.ignore:
        return parsed

    def problem(message: str) -> Callable[[int], Problem]:
        return lambda i: Problem(
            display,
            message.replace("{value}", repr(parsed.text(i))),
            row=int(raw.rows[i]),
            column=column.name,
            value=parsed.text(i),
            column_index=index,
        )

    if numbers is not None:
        not_number = ~missing & ~np.isfinite(numbers)
        _report(
            log,
            f"{column.name}\0number",
            not_number,
            problem(
                "value {value} is not a number; correct it, or add it to 'missing_values' "
                "in [source] if it marks a missing value"
            ),
        )
        invalid |= not_number
        if column.type == "int":
            with np.errstate(invalid="ignore"):
                fractional = ~invalid & ~missing & (np.floor(numbers) != numbers)
            _report(
                log,
                f"{column.name}\0whole",
                fractional,
                problem(
                    "value {value} is not a whole number; correct it, or declare the column "
                    'with type = "float"'
                ),
            )
            invalid |= fractional
        checked = ~invalid & ~missing
        low = -np.inf if column.min is None else column.min
        high = np.inf if column.max is None else column.max
        with np.errstate(invalid="ignore"):
            out_of_range |= checked & ((numbers < low) | (numbers > high))
        allowed = _range_text(column)
        _report(
            log,
            f"{column.name}\0range",
            out_of_range,
            problem(
                "value {value} is outside the allowed range "
                + allowed
                + f"; correct it, or widen 'min'/'max' of column '{column.name}' in the "
                "schema if the value is plausible"
            ),
        )
    elif column.categories is not None:
        assert unknown is not None
        allowed = ", ".join(repr(c) for c in column.categories[:10])
        allowed += ", …" if len(column.categories) > 10 else ""
        _report(
            log,
            f"{column.name}\0category",
            unknown,
            problem(
                "value {value} is not one of the allowed categories ("
                + allowed
                + f"); correct it, or add it to 'categories' of column '{column.name}' "
                "(every node of the consortium must then add it too)"
            ),
        )
        invalid |= unknown
    return parsed


def _match_categories(
    column: ColumnSpec, texts: np.ndarray, missing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell texts in the declared spelling, where no category matches, and where respelled.

    A cell that matches no category keeps its own text, for the message
    that reports it.
    """
    import pandas as pd  # here: every node process imports this module, few check a table

    matches = column.match_categories({str(t) for t in texts[~missing]})
    found = pd.Series(texts, dtype=object).where(~missing).map(matches)
    matched = found.notna().to_numpy(dtype=bool)
    canonical = np.where(matched, found.to_numpy(dtype=object), texts)
    return canonical, ~missing & ~matched, matched & (canonical != texts)


def _range_text(column: ColumnSpec) -> str:
    low = "-inf" if column.min is None else f"{column.min:g}"
    high = "inf" if column.max is None else f"{column.max:g}"
    return f"[{low}, {high}]"


def _table_labels(
    spec: DatasetSpec, label: ParsedColumn, raw: RawTable, display: str, log: ProblemLog
) -> tuple[np.ndarray, int]:
    """Class id of each record (-1 where the label is missing or invalid)."""
    n = len(label.missing)
    ok = ~label.missing & ~label.invalid & ~label.out_of_range
    keys = np.array([label.text(i) if ok[i] else "" for i in range(n)], dtype=object)
    ids = np.full(n, -1, dtype=np.int64)
    mapping = spec.label_mapping

    def problem(i: int, message: str) -> Problem:
        """A problem with record i's label, located by file, row and column."""
        return Problem(
            display,
            message,
            row=int(raw.rows[i]),
            column=label.spec.name,
            value=label.text(i),
            column_index=label.index,
        )

    if mapping is not None:
        mapped = np.array(
            [mapping.get(k, -1) if o else -1 for k, o in zip(keys, ok, strict=True)], dtype=np.int64
        )
        shown = ", ".join(repr(k) for k in list(mapping)[:10]) + (
            ", …" if len(mapping) > 10 else ""
        )
        _report(
            log,
            "label\0mapping",
            ok & (mapped < 0),
            lambda i: problem(
                i,
                f"label {label.text(i)!r} is not in [label_mapping] (keys: {shown}); correct "
                "it or map it to a class id",
            ),
        )
        ids = mapped
    elif label.spec.type == "category":
        categories = label.spec.categories or ()
        position = {c: k for k, c in enumerate(categories)}
        ids = np.array(
            [position.get(k, -1) if o else -1 for k, o in zip(keys, ok, strict=True)],
            dtype=np.int64,
        )
    else:
        assert label.numbers is not None
        ids = np.where(ok, np.nan_to_num(label.numbers, nan=-1.0), -1).astype(np.int64)
        negative = ok & (ids < 0)
        _report(
            log,
            "label\0negative",
            negative,
            lambda i: problem(
                i,
                f"label {label.text(i)!r} is not a class id (0, 1, …); correct it or add a "
                "[label_mapping] that maps it to one",
            ),
        )
        ids[negative] = -1
    num_classes = _num_classes(spec, ids)
    beyond = ids >= num_classes
    _report(
        log,
        "label\0beyond",
        beyond,
        lambda i: problem(
            i,
            f"label {label.text(i)!r} is not a class id below num_classes = {num_classes}; "
            "correct it, raise 'num_classes', or add a [label_mapping]",
        ),
    )
    ids[beyond] = -1
    return ids, num_classes


def _num_classes(spec: DatasetSpec, ids: np.ndarray) -> int:
    declared = spec.declared_num_classes()
    if declared is not None:
        return declared
    valid = ids[ids >= 0]
    # Capped: a mistyped label (e.g. 3000000) must fail the "beyond num_classes"
    # check with a message, not size every per-class array after it.
    return min(int(valid.max()) + 1, MAX_CLASSES) if len(valid) else 0


# ---------------------------------------------------------------------- arrays


def _array_records(spec: DatasetSpec, raw: RawArrays, log: ProblemLog) -> ArrayRecords:
    x = raw.x
    if raw.image:
        x = x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)
    scale = 255.0 if raw.image and raw.x.dtype == np.uint8 else 1.0
    x = np.ascontiguousarray(x, dtype=np.float32)
    if scale != 1.0:
        x /= np.float32(scale)
    # Not reshape(len(x), -1): numpy cannot infer the width of no records (every image unusable).
    flat = x.reshape(len(x), int(np.prod(x.shape[1:])))
    missing_rows = np.isnan(flat).any(axis=1)
    infinite = np.isinf(flat).any(axis=1)
    display = str(raw.files[0])
    _report(
        log,
        "features\0infinite",
        infinite,
        lambda i: Problem(
            display,
            "holds an infinite feature value; correct the record or remove it",
            row=i + 1,
            column=raw.features_name,
        ),
    )
    if raw.record_files is not None:
        labels, num_classes = _folder_labels(spec, raw, log)
    else:
        labels, num_classes = _array_labels(spec, raw, log)
    usable = ~missing_rows if spec.missing == "drop" else np.ones(len(x), dtype=bool)
    if len(x) and not usable.any():
        log.add(
            Problem(
                display,
                f"no records left after dropping records with a missing (NaN) feature value "
                f'(all {len(x)} have one); fill in the data or set missing = "impute"',
            ),
            kind="nothing_left",
        )
    return ArrayRecords(
        raw=raw,
        x=x,
        labels=labels,
        keep=usable & (labels >= 0) & ~infinite,
        num_classes=num_classes,
        missing_rows=missing_rows,
    )


def _array_labels(spec: DatasetSpec, raw: RawArrays, log: ProblemLog) -> tuple[np.ndarray, int]:
    y = raw.y
    n = len(y)
    file = str(raw.files[-1])
    # A label file with rows of its own (DICOM) is located by row and column.
    rows = raw.label_rows
    column = raw.labels_name if len(raw.files) == 1 or rows is not None else None
    ids = np.full(n, -1, dtype=np.int64)
    mapping = spec.label_mapping

    def problem(message: str) -> Callable[[int], Problem]:
        return lambda i: Problem(
            file,
            message.replace("{value}", repr(_label_text(y[i]))),
            row=i + 1 if rows is None else int(rows[i]),
            column=column,
            value=_label_text(y[i]),
        )

    if y.dtype.kind in "US":
        keys = y.astype(str)
        present = np.ones(n, dtype=bool)
        if mapping is None:
            examples = ", ".join(repr(str(v)) for v in np.unique(keys)[:5])
            log.add(
                Problem(
                    file,
                    f"the labels are text (e.g. {examples}); add a [label_mapping] that maps "
                    "each to a class id",
                    column=column,
                ),
                kind="label\0text",
            )
            return ids, _num_classes(spec, ids)
    else:
        values = y.astype(np.float64)
        present = ~np.isnan(values)
        whole = present & np.isfinite(values) & (np.floor(values) == values)
        _report(
            log,
            "label\0whole",
            present & ~whole,
            problem("label {value} is not a whole number; correct it"),
        )
        present = whole
        keys = np.array(
            [number_text(v) if p else "" for v, p in zip(values, present, strict=True)],
            dtype=object,
        )
        if mapping is None:
            ids = np.where(present, np.nan_to_num(values, nan=-1.0), -1).astype(np.int64)
            negative = present & (ids < 0)
            _report(
                log,
                "label\0negative",
                negative,
                problem(
                    "label {value} is not a class id (0, 1, …); correct it or add a [label_mapping]"
                ),
            )
            ids[negative] = -1
    if mapping is not None:
        ids = np.array(
            [mapping.get(k, -1) if p else -1 for k, p in zip(keys, present, strict=True)],
            dtype=np.int64,
        )
        shown = ", ".join(repr(k) for k in list(mapping)[:10]) + (
            ", …" if len(mapping) > 10 else ""
        )
        _report(
            log,
            "label\0mapping",
            present & (ids < 0),
            problem(
                "label {value} is not in [label_mapping] (keys: "
                + shown
                + "); correct it or map it to a class id"
            ),
        )
    num_classes = _num_classes(spec, ids)
    beyond = ids >= num_classes
    _report(
        log,
        "label\0beyond",
        beyond,
        problem(
            f"label {{value}} is not a class id below num_classes = {num_classes}; correct it, "
            "raise 'num_classes', or add a [label_mapping]"
        ),
    )
    ids[beyond] = -1
    return ids, num_classes


def _label_text(value: object) -> str:
    if isinstance(value, np.floating | float):
        return number_text(float(value))
    return str(value)


def _folder_labels(spec: DatasetSpec, raw: RawArrays, log: ProblemLog) -> tuple[np.ndarray, int]:
    """Class ids of an image folder: `[label_mapping]` of folder names, else sorted order."""
    root = raw.files[0]
    folders = sorted({p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")})
    mapping = spec.label_mapping
    if mapping is None:
        mapping = {name: k for k, name in enumerate(folders)}
    else:
        for name in folders:
            if name not in mapping:
                log.add(
                    Problem(
                        str(root / name),
                        f"class folder {name!r} is not in [label_mapping] (keys: "
                        f"{', '.join(repr(k) for k in mapping)}); rename the folder or map it",
                    ),
                    kind="label\0mapping",
                )
    ids = np.array([mapping.get(str(name), -1) for name in raw.y], dtype=np.int64)
    declared = spec.declared_num_classes()
    num_classes = declared if declared is not None else len(folders)
    if len(folders) > num_classes and spec.label_mapping is None:
        log.add(
            Problem(
                str(root),
                f"{len(folders)} class folders but num_classes = {num_classes}; remove the "
                "extra folders or raise 'num_classes'",
            ),
            kind="label\0beyond",
        )
        ids[ids >= num_classes] = -1
    return ids, num_classes
