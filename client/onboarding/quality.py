"""The data-quality report of a node's dataset.

The report stays on the node: it is written next to the registration in the
node's own state folder and shown to the node's operators, and it is never
sent to the server or to other nodes. Even counts (class balance, missing
values) describe a hospital's patients; what leaves the node is decided
elsewhere, under differential privacy.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.client.onboarding.dicom_summary import DicomSummary, Unusable
from consortia.client.onboarding.schema import DatasetSpec, DicomUnit
from consortia.client.onboarding.validation import (
    ArrayRecords,
    Inspection,
    TableRecords,
    inspect,
    number_text,
)
from consortia.common.atomic import write_json_atomic
from consortia.common.errors import DataError


class QualityReport(BaseModel):
    """Counts that describe a dataset's quality; stays on the node (see the module docstring).

    `records` counts the records read (rows with the right field count);
    `records_used` those left after dropping records without a valid label
    and, with missing = "drop", records with a missing feature. Per-column
    counts are keyed by column name (for array sources: the feature array and
    the labels). `class_counts` counts the used records per class id, every
    class from 0 to `num_classes - 1` listed; `label_counts` counts the raw
    label values before `[label_mapping]`. `normalised_per_column` counts,
    per category column where any were, the values written otherwise than
    their declared category and matched to it by number (`1.0` for "1"),
    so that a site sees what its export changed. `dicom` (DICOM sources)
    counts files, modalities, image sizes, photometric interpretations,
    windowing and unusable files by category, never a header value.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str | None = None
    source: str
    format: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    records: int
    malformed_rows: int = 0
    records_used: int
    records_dropped: int
    duplicate_rows: int
    missing_per_column: dict[str, int]
    out_of_range_per_column: dict[str, int]
    invalid_per_column: dict[str, int]
    normalised_per_column: dict[str, int] = Field(default_factory=dict)
    num_classes: int
    class_counts: dict[int, int]
    label_counts: dict[str, int]
    problems: int
    dicom: DicomSummary | None = None

    @classmethod
    def from_inspection(cls, inspection: Inspection, dataset: str | None = None) -> QualityReport:
        """Build the report of an inspected source (also when it has problems)."""
        records = inspection.records
        if isinstance(records, TableRecords):
            per_column = _table_counts(records)
            normalised: dict[str, int] = _normalised_counts(records)
            raw_labels = _table_label_values(inspection.spec, records)
            duplicates = _table_duplicates(inspection.spec, records)
            malformed = len(records.raw.malformed)
        else:
            per_column = _array_counts(records)
            normalised = {}
            raw_labels = [_text(v) for v in records.raw.y]
            duplicates = _array_duplicates(records)
            malformed = 0
        used = records.labels[records.keep]
        counts = np.bincount(used.astype(np.int64), minlength=records.num_classes)
        return cls(
            dataset=dataset,
            source=inspection.source,
            format=inspection.spec.source.format,
            records=len(records),
            malformed_rows=malformed,
            records_used=int(records.keep.sum()),
            records_dropped=len(records) - int(records.keep.sum()),
            duplicate_rows=duplicates,
            missing_per_column=per_column[0],
            out_of_range_per_column=per_column[1],
            invalid_per_column=per_column[2],
            normalised_per_column=normalised,
            num_classes=records.num_classes,
            class_counts={k: int(c) for k, c in enumerate(counts)},
            label_counts=dict(sorted(Counter(raw_labels).items(), key=_natural)),
            problems=len(inspection.problems),
            dicom=records.raw.dicom if isinstance(records, ArrayRecords) else None,
        )

    def write_report(self, path: Path) -> None:
        """Write the report as JSON, atomically."""
        write_json_atomic(Path(path), self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: Path) -> QualityReport:
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the quality report ({exc})") from None

    def render(self, console: Console) -> None:
        """Print the report as rich tables."""
        title = f"Data quality: {self.dataset}" if self.dataset else "Data quality"
        summary = Table(title=title, show_header=False, title_justify="left")
        summary.add_column("what", style="bold")
        summary.add_column("value", justify="right")
        summary.add_row("source", f"{self.source} ({self.format})")
        summary.add_row("records read", str(self.records))
        if self.malformed_rows:
            summary.add_row("rows with a wrong field count", str(self.malformed_rows))
        summary.add_row("records used", str(self.records_used))
        summary.add_row("records dropped (no label, missing values)", str(self.records_dropped))
        summary.add_row("duplicate records", str(self.duplicate_rows))
        summary.add_row("problems", str(self.problems))
        console.print(summary)

        columns = list(
            dict.fromkeys(
                [*self.missing_per_column, *self.out_of_range_per_column, *self.invalid_per_column]
            )
        )
        if columns:
            table = Table(title="Columns", title_justify="left")
            table.add_column("column")
            for heading in ("missing", "out of range", "invalid"):
                table.add_column(heading, justify="right")
            for name in columns:
                table.add_row(
                    name,
                    *(
                        _count(counts.get(name, 0))
                        for counts in (
                            self.missing_per_column,
                            self.out_of_range_per_column,
                            self.invalid_per_column,
                        )
                    ),
                )
            console.print(table)
        for name, count in self.normalised_per_column.items():
            console.print(
                f"column '{escape(name)}': {count} value{'' if count == 1 else 's'} written "
                "otherwise than the declared category (e.g. 1.0 for 1) matched it as a number"
            )

        if self.dicom is not None:
            _render_dicom(self.dicom, console)

        balance = Table(title="Class balance", title_justify="left")
        balance.add_column("class", justify="right")
        balance.add_column("records used", justify="right")
        balance.add_column("share", justify="right")
        total = sum(self.class_counts.values())
        for label, count in sorted(self.class_counts.items()):
            share = f"{count / total:.1%}" if total else "-"
            balance.add_row(str(label), str(count), share)
        console.print(balance)
        console.print("[dim]This report stays on this node; it is never sent to the server.[/dim]")


def quality_report(spec: DatasetSpec, dataset: str | None = None) -> QualityReport:
    """Inspect the source `spec` names and report on it (problems are counted, not raised)."""
    return QualityReport.from_inspection(inspect(spec), dataset=dataset)


# ---------------------------------------------------------------------- helpers


def _render_dicom(summary: DicomSummary, console: Console) -> None:
    table = Table(title="DICOM", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("files read", str(summary.files))
    table.add_row("files with an image", str(summary.images))
    for kind, count in summary.unusable.items():
        note = " (skipped)" if kind == Unusable.NO_PIXELS and summary.skipped else ""
        table.add_row(f"unusable: {kind.value.replace('_', ' ')}{note}", _count(count))
    table.add_row("multi-frame files", str(summary.multi_frame))
    for heading, counts in (
        ("modalities", summary.modalities),
        ("photometric interpretations", summary.photometric_interpretations),
        ("image sizes (rows x columns)", summary.image_sizes),
        ("windowing", {k.value.replace("_", " "): v for k, v in summary.windowing.items()}),
    ):
        table.add_row(heading, ", ".join(f"{k} {v}" for k, v in counts.items()) or "-")
    unit = "images" if summary.unit == DicomUnit.IMAGE else "series"
    table.add_row(f"records ({unit} with a label)", str(summary.records))
    table.add_row(f"{unit} no label row names (left out)", _count(summary.unlabeled))
    table.add_row("label rows", str(summary.label_rows))
    table.add_row("label rows naming no image", _count(summary.unmatched_label_rows))
    console.print(table)


def _count(value: int) -> str:
    return f"[yellow]{value}[/yellow]" if value else "0"


def _text(value: object) -> str:
    if isinstance(value, np.floating | float):
        return number_text(float(value))
    return str(value)


def _natural(item: tuple[str, int]) -> tuple[int, float, str]:
    try:
        return (0, float(item[0]), item[0])
    except ValueError:
        return (1, 0.0, item[0])


def _table_counts(records: TableRecords) -> tuple[dict[str, int], ...]:
    missing, out_of_range, invalid = {}, {}, {}
    for name, column in records.columns.items():
        missing[name] = int(column.missing.sum())
        out_of_range[name] = int(column.out_of_range.sum())
        if column.spec.label:
            bad = ~column.missing & ~column.out_of_range & (records.labels < 0)
            invalid[name] = int(bad.sum())
        else:
            invalid[name] = int(column.invalid.sum())
    return missing, out_of_range, invalid


def _normalised_counts(records: TableRecords) -> dict[str, int]:
    counts = {
        name: int(column.normalised.sum())
        for name, column in records.columns.items()
        if column.normalised is not None
    }
    return {name: count for name, count in counts.items() if count}


def _table_label_values(spec: DatasetSpec, records: TableRecords) -> list[str]:
    label = spec.label_column
    assert label is not None
    column = records.columns[label.name]
    return [column.text(int(i)) for i in np.flatnonzero(~column.missing)]


def _table_duplicates(spec: DatasetSpec, records: TableRecords) -> int:
    """Records equal to an earlier one in every feature and the label (ignored columns aside)."""
    if len(records) < 2:
        return 0
    import pandas as pd  # here: every node process imports this module, few check a table

    data: dict[str, np.ndarray] = {}
    for column in spec.columns:
        if column.ignore:
            continue
        parsed = records.columns[column.name]
        if parsed.numbers is not None:
            data[column.name] = parsed.numbers
        else:
            assert parsed.texts is not None  # a column without numbers keeps its texts
            texts = parsed.texts.astype(object)  # a copy: missing cells become None
            texts[parsed.missing] = None
            data[column.name] = texts
    return int(pd.DataFrame(data).duplicated().sum())


def _array_counts(records: ArrayRecords) -> tuple[dict[str, int], ...]:
    raw = records.raw
    flat = records.x.reshape(len(records.x), int(np.prod(records.x.shape[1:])))
    missing = {raw.features_name: int(records.missing_rows.sum())}
    invalid = {
        raw.features_name: int(np.isinf(flat).any(axis=1).sum()),
        raw.labels_name: int((records.labels < 0).sum()),
    }
    return missing, {}, invalid


def _array_duplicates(records: ArrayRecords) -> int:
    n = len(records)
    if n < 2:
        return 0
    flat = np.ascontiguousarray(records.x.reshape(n, -1)).view(np.uint8).reshape(n, -1)
    labels = np.ascontiguousarray(records.labels).view(np.uint8).reshape(n, -1)
    rows = np.ascontiguousarray(np.concatenate([flat, labels], axis=1))
    keys = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    return n - len(np.unique(keys))
