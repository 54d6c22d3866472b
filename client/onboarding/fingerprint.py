"""Fingerprints of a dataset's content, to notice when the data changes after registration.

The fingerprint is a sha256 over the *canonical content* of the source as the
registered schema reads it, not over the file's bytes:

- tables (CSV, Parquet): the schema's column names, then per column, in
  file order, each record's parsed value: a number as IEEE float64, a category
  as its declared text when it matches one (a number category written `1.0`
  counts as its declared "1"), else as its trimmed text, an ignored column as
  its trimmed text, a missing value (empty cell or a `missing_values`
  marker) as "missing", and a cell that is not a number as its text; then
  the rows with a wrong field count with their position among the records.
  So line endings (CRLF or LF), a trailing newline, a UTF-8 byte-order mark,
  quoting, blank lines, spaces around cells, how a number is written ("5",
  "5.0", "5.00") and the order of the columns in the file do not change it;
  any changed value, added, removed or reordered record does. The same
  values in a CSV and a Parquet file give the same fingerprint.
- npz and IDX: `LabeledArrays(x, y).fingerprint()` over the decoded arrays
  as stored (dtype, shape, values), so gzipping an IDX file does not change it.
- image folders: each image's class folder and file name, and its pixels
  decoded in the schema's `mode` *before* resizing, in sorted order.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from consortia.client.onboarding.schema import DatasetSpec
from consortia.client.onboarding.validation import Inspection, TableRecords, inspect
from consortia.common.arrays import LabeledArrays
from consortia.common.errors import DataError

TABLE_CANONICAL_VERSION = "consortia-table-v1"


def fingerprint(spec: DatasetSpec) -> str:
    """The content fingerprint (sha256 hex) of the source `spec` names."""
    return inspection_fingerprint(inspect(spec))


def inspection_fingerprint(inspection: Inspection) -> str:
    """The content fingerprint of an already inspected source."""
    records = inspection.records
    if isinstance(records, TableRecords):
        return _table_digest(records)
    if records.raw.digest is not None:
        return records.raw.digest
    return LabeledArrays(records.raw.x, records.raw.y).fingerprint()


def check_unchanged(
    registered_fingerprint: str, spec: DatasetSpec, *, name: str | None = None
) -> Inspection:
    """Raise `DataError` if the source's content differs from the registered fingerprint.

    Returns the inspection made for the comparison, so that a caller can go
    on (validate, prepare) without reading the source again.
    """
    inspection = inspect(spec)
    current = inspection_fingerprint(inspection)
    if current != registered_fingerprint:
        what = f"dataset '{name}'" if name else "the dataset"
        command = f"consortia node data add {name or 'NAME'} --config <dataset.toml> --replace"
        raise DataError(
            f"{inspection.source}: the data changed since {what} was registered "
            f"(fingerprint {registered_fingerprint[:12]}… at registration, {current[:12]}… "
            f"now); if the change is intended, re-register the dataset to accept it "
            f"(`{command}`), otherwise restore the registered file"
        )
    return inspection


def _table_digest(records: TableRecords) -> str:
    raw = records.raw
    digest = hashlib.sha256()
    head = {"canonical": TABLE_CANONICAL_VERSION, "columns": list(raw.names), "records": len(raw)}
    digest.update(_json(head))
    for name in raw.names:
        column = records.columns[name]
        digest.update(_json({"column": name}))
        if column.numbers is not None:
            # 0: a value, 1: missing, 2: not a number (kept as its text).
            unparsed = column.unparsed
            status = np.where(column.missing, 1, np.where(unparsed, 2, 0)).astype(np.uint8)
            values = np.where(status == 0, column.numbers, 0.0).astype("<f8")
            digest.update(status.tobytes())
            digest.update(values.tobytes())
            texts = column.texts
            bad = [None if texts is None else texts[i] for i in np.flatnonzero(unparsed)]
            digest.update(_json(bad))
        else:
            assert column.texts is not None
            shown = [None if m else t for t, m in zip(column.texts, column.missing, strict=True)]
            digest.update(_json(shown))
    digest.update(_json([[position, list(fields)] for position, _, fields in raw.malformed]))
    return digest.hexdigest()


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
