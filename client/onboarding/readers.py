"""Reading a dataset source into raw cells or raw arrays, nothing interpreted yet.

A reader only fails on its own (one `DataError`) when the source cannot be
read at all: a missing or empty file, a file that is not of its format.
Anything wrong inside a readable file (a row with too many fields, a header
that does not match the schema, an image that does not decode) is collected
as a `Problem`, so that one check lists every problem at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consortia.client.onboarding.dicom_summary import DicomSummary
from consortia.client.onboarding.problems import Problem, ProblemLog, fail
from consortia.client.onboarding.schema import (
    CsvSource,
    DatasetSpec,
    IdxSource,
    ImageFolderSource,
    NpzSource,
    ParquetSource,
)
from consortia.common.idx import read_idx

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PREVIEW_CHARS = 60


@dataclass(frozen=True)
class ColumnCells:
    """The cells of one schema column, in file order.

    `texts` holds trimmed cell texts (None where the file has no value at
    all, e.g. a Parquet null); `numbers` is set instead for Parquet columns
    stored as numbers (NaN for null).
    """

    texts: np.ndarray | None = None
    numbers: np.ndarray | None = None

    def __len__(self) -> int:
        array = self.texts if self.texts is not None else self.numbers
        return 0 if array is None else len(array)


@dataclass(frozen=True)
class RawTable:
    """The records of a table source whose fields line up with the schema's columns.

    `rows` gives the 1-based row of each record as in the file (counting the
    header line; Parquet records count from 1). Rows whose field count is
    wrong are kept aside in `malformed` as (records before it, row, fields).
    """

    path: Path
    names: tuple[str, ...]
    cells: dict[str, ColumnCells]
    rows: np.ndarray
    malformed: tuple[tuple[int, int, tuple[str, ...]], ...]
    problems: ProblemLog

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class RawArrays:
    """Decoded arrays of an npz, IDX or image-folder source, before any scaling.

    Image folders give `x` as (N, H, W) or (N, H, W, 3) uint8 after resizing,
    `y` as the class folder names, `record_files` as each image's path, and
    `digest`: the sha256 of the decoded pixels *before* resizing (so an edit
    that resizing would hide still changes the fingerprint). DICOM sources
    (`dicom_reader`) give `x` as float32 on [0, 1], `y` as the label file's
    labels, `label_rows` as each record's row in that file, a `digest`, and
    `dicom`: the counts their quality report shows.
    """

    files: tuple[Path, ...]
    x: np.ndarray
    y: np.ndarray
    image: bool
    features_name: str
    labels_name: str
    problems: ProblemLog
    record_files: tuple[str, ...] | None = None
    digest: str | None = None
    label_rows: np.ndarray | None = None
    dicom: DicomSummary | None = None


def read_source(spec: DatasetSpec) -> RawTable | RawArrays:
    """Read the source `spec` names; raise `DataError` only if it cannot be read at all.

    A DICOM source is read by `dicom_reader.read_dicom` (which builds on this
    module); `validation.inspect` dispatches it there.
    """
    source = spec.source
    names = tuple(c.name for c in spec.columns)
    if isinstance(source, CsvSource):
        return _read_csv(source, names)
    if isinstance(source, ParquetSource):
        return _read_parquet(source, names)
    if isinstance(source, NpzSource):
        return _read_npz(source)
    if isinstance(source, IdxSource):
        return _read_idx(source)
    if isinstance(source, ImageFolderSource):
        return _read_image_folder(source)
    raise TypeError(f"read_source does not read {type(source).__name__}: see its docstring")


# -------------------------------------------------------------------- helpers


def _read_bytes(path: Path, key: str = "source.path") -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail(
            Problem(
                str(path),
                f"no such file; fix '{key}' in the dataset schema "
                "(relative paths are resolved from the schema file's folder)",
            )
        ) from None
    except IsADirectoryError:
        raise fail(Problem(str(path), f"is a folder, not a file; fix '{key}'")) from None
    except OSError as exc:
        raise fail(Problem(str(path), f"cannot be read ({exc.strerror or exc})")) from None
    if not data.strip():
        raise fail(
            Problem(str(path), "the file is empty; export the data again or fix '" + key + "'")
        )
    return data


def read_text(path: Path, key: str) -> str:
    """A non-empty UTF-8 text file (a byte-order mark is accepted); `key` names its setting."""
    data = _read_bytes(path, key)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise fail(
            Problem(
                str(path),
                f"not UTF-8 text (undecodable byte at offset {exc.start}); "
                "export or save the file as UTF-8 CSV",
            )
        ) from None


def _preview(fields: list[str], delimiter: str) -> str:
    text = delimiter.join(fields)
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 1] + "…"


def _map_header(
    header: list[str], names: tuple[str, ...], display: str, row: int | None, log: ProblemLog
) -> list[int] | None:
    """Position in the file of each schema column, or None if some are absent."""
    if not set(header) & set(names):
        # Not the table the schema describes (a wrong path, or a link to another file):
        # its first line is not shown, since an error may reach logs and the coordinator.
        hint = "; if the file has no header line, set header = false in [source]" * (
            row is not None
        )
        log.add(
            Problem(
                display,
                f"none of its {len(header)} column names matches a column of the schema "
                f"({', '.join(names)}), so it is not the table the schema describes: check "
                f"'source.path'{hint}",
                row=row,
            ),
            kind="header",
        )
        return None
    for name in sorted({h for h in header if header.count(h) > 1}):
        log.add(
            Problem(display, "the column name appears twice; rename one", row=row, column=name),
            kind="header",
        )
    for index, name in enumerate(names):
        if name not in header:
            log.add(
                Problem(
                    display,
                    "declared in the schema but not in the file; add it to the file or fix "
                    "its 'name' in [[columns]]",
                    row=row,
                    column=name,
                    column_index=index,
                ),
                kind="header",
            )
    for name in header:
        if name not in names:
            log.add(
                Problem(
                    display,
                    "in the file but not declared in the schema; add a [[columns]] entry for "
                    "it (with ignore = true to skip it)",
                    row=row,
                    column=name,
                    column_index=len(names),
                ),
                kind="header",
            )
    if any(name not in header for name in names):
        return None
    return [header.index(name) for name in names]


# ------------------------------------------------------------------------ CSV


def _read_csv(source: CsvSource, names: tuple[str, ...]) -> RawTable:
    path, display = source.path, str(source.path)
    text = read_text(path, "source.path")
    log = ProblemLog()
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=source.delimiter)
    width, positions = len(names), list(range(len(names)))
    header_pending = source.header
    records: list[list[str]] = []
    rows: list[int] = []
    malformed: list[tuple[int, int, tuple[str, ...]]] = []
    misfits: list[Problem] = []  # rows of the wrong width, each with a preview of its text
    expected = "the header has" if source.header else "the schema declares"
    previous_line = 0
    try:
        for fields in reader:
            row, previous_line = previous_line + 1, reader.line_num
            if not "".join(fields).strip():
                continue  # a blank line (or one of only delimiters) holds no record
            if header_pending:
                header_pending = False
                header = [field.strip() for field in fields]
                mapped = _map_header(header, names, display, row, log)
                if mapped is None:
                    break  # the columns cannot be found; every row would be noise
                width, positions = len(header), mapped
                continue
            if len(fields) != width:
                malformed.append((len(records), row, tuple(field.strip() for field in fields)))
                misfits.append(
                    Problem(
                        display,
                        f"{len(fields)} fields where {expected} {width} columns; fix the row "
                        f"(a stray or missing '{source.delimiter}', or a value with "
                        f"'{source.delimiter}' that needs quotes)",
                        row=row,
                        value=_preview(fields, source.delimiter),
                    )
                )
                continue
            records.append(fields)
            rows.append(row)
    except csv.Error as exc:
        log.add(
            Problem(
                display,
                f"cannot be parsed as CSV ({exc}); fix the row, reading stopped here",
                row=reader.line_num,
            ),
            kind="csv",
        )
    if source.header or records:  # the file is the schema's table: show the rows that misfit
        for problem in misfits:
            log.add(problem, kind="field_count")
    elif misfits:  # not one row fits: another file, whose text is not shown (see _map_header)
        log.add(
            Problem(
                display,
                f"none of its {len(misfits)} lines has the {width} fields {expected}, so it is "
                f"not the table the schema describes: check 'source.path' and that "
                f"'{source.delimiter}' is its delimiter",
            ),
            kind="field_count",
        )
    if not source.header and records and [f.strip() for f in records[0]] == list(names):
        # A header line read as data would fail every cell; report it once instead.
        log.add(
            Problem(display, "holds the column names; set header = true in [source]", row=rows[0]),
            kind="header",
        )
        malformed = [
            (0, rows[0], tuple(f.strip() for f in records[0])),
            *((position - 1, row, fields) for position, row, fields in malformed),
        ]
        records, rows = records[1:], rows[1:]
    if not records and not malformed and not log:
        what = "a header line but no data rows" if source.header else "no data rows"
        log.add(Problem(display, f"the file has {what}; export the data again"), kind="empty")
    by_column = list(zip(*records, strict=True)) if records else [() for _ in range(width)]
    cells = {
        name: ColumnCells(texts=np.array([v.strip() for v in by_column[pos]], dtype=object))
        for name, pos in zip(names, positions, strict=True)
    }
    return RawTable(
        path=path,
        names=names,
        cells=cells,
        rows=np.asarray(rows, dtype=np.int64),
        malformed=tuple(malformed),
        problems=log,
    )


# -------------------------------------------------------------------- Parquet


def _read_parquet(source: ParquetSource, names: tuple[str, ...]) -> RawTable:
    import pandas as pd

    path, display = source.path, str(source.path)
    data = _read_bytes(path)
    try:
        frame = pd.read_parquet(io.BytesIO(data), engine="pyarrow")
    except Exception as exc:  # untrusted bytes: pyarrow raises many types on corrupt files
        raise fail(
            Problem(display, f"not a readable Parquet file ({exc}); export it again")
        ) from None
    log = ProblemLog()
    header = [str(column) for column in frame.columns]
    positions = _map_header(header, names, display, None, log)
    n = len(frame) if positions is not None else 0
    if positions is not None and n == 0:
        log.add(Problem(display, "the file holds no records; export the data again"), "empty")
    cells: dict[str, ColumnCells] = {}
    for i, name in enumerate(names):
        if positions is None:
            cells[name] = ColumnCells(texts=np.array([], dtype=object))
            continue
        series = frame.iloc[:, positions[i]]
        if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
            values = series.astype("float64") if pd.api.types.is_bool_dtype(series) else series
            cells[name] = ColumnCells(numbers=values.to_numpy(dtype=np.float64, na_value=np.nan))
        else:
            # pandas takes any na_value; pandas-stubs' `Scalar` leaves out None.
            objects = series.to_numpy(dtype=object, na_value=None)  # type: ignore[call-overload]
            cells[name] = ColumnCells(
                texts=np.array([None if v is None else str(v).strip() for v in objects], object)
            )
    return RawTable(
        path=path,
        names=names,
        cells=cells,
        rows=np.arange(1, n + 1, dtype=np.int64),
        malformed=(),
        problems=log,
    )


# ------------------------------------------------------------------------ npz


def _read_npz(source: NpzSource) -> RawArrays:
    path, display = source.path, str(source.path)
    data = _read_bytes(path)
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise fail(Problem(display, f"not a NumPy .npz archive ({exc})")) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise fail(Problem(display, "holds a single array (.npy), not an .npz archive"))
    log = ProblemLog()
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for key, setting in (
            (source.features_key, "features_key"),
            (source.labels_key, "labels_key"),
        ):
            if key not in archive.files:
                log.add(
                    Problem(
                        display,
                        f"no array named {key!r} (the archive holds: "
                        f"{', '.join(archive.files) or 'nothing'}); set '{setting}' in [source]",
                    )
                )
                continue
            try:
                arrays[key] = archive[key]
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                problem = f"member is damaged ({exc}); save the file again"
                log.add(Problem(display, problem, column=key))
                continue
            except ValueError:
                log.add(
                    Problem(
                        display,
                        "holds Python objects, which are never loaded (unpickling can run "
                        "code); save it as a numeric array",
                        column=key,
                    )
                )
    x, y = arrays.get(source.features_key), arrays.get(source.labels_key)
    if x is not None:
        if x.dtype.kind not in "biuf":
            log.add(
                Problem(display, f"holds {x.dtype} values, not numbers", column=source.features_key)
            )
        if x.ndim < 2:
            log.add(
                Problem(
                    display,
                    f"has shape {x.shape}; features need one row per record, "
                    "shape (records, features...)",
                    column=source.features_key,
                )
            )
    if y is not None:
        if y.ndim != 1:
            log.add(
                Problem(
                    display,
                    f"has shape {y.shape}; labels need one value per record, shape (records,)",
                    column=source.labels_key,
                )
            )
        elif y.dtype.kind not in "biufUS":
            log.add(Problem(display, f"holds {y.dtype} values", column=source.labels_key))
    if x is not None and y is not None and x.ndim >= 1 and len(x) != len(y):
        log.add(
            Problem(
                display,
                f"{len(x)} feature rows ({source.features_key!r}) but {len(y)} labels "
                f"({source.labels_key!r}); each record needs exactly one label",
            )
        )
    log.raise_if_any("data check failed")
    assert x is not None and y is not None
    if len(y) == 0:
        raise fail(Problem(display, "the arrays hold no records"))
    return RawArrays(
        files=(path,),
        x=x,
        y=y,
        image=False,
        features_name=source.features_key,
        labels_name=source.labels_key,
        problems=log,
    )


# ------------------------------------------------------------------------ IDX


def _read_idx(source: IdxSource) -> RawArrays:
    for path, key in ((source.images, "source.images"), (source.labels, "source.labels")):
        _read_bytes(path, key)  # a clear message for a missing or empty file
    images, labels = read_idx(source.images), read_idx(source.labels)
    log = ProblemLog()
    if images.ndim != 3:
        log.add(
            Problem(
                str(source.images),
                f"has shape {images.shape}; expected images of shape (records, height, width)",
            )
        )
    if labels.ndim != 1:
        log.add(
            Problem(str(source.labels), f"has shape {labels.shape}; expected one label per record")
        )
    elif len(labels) != len(images):
        log.add(
            Problem(
                str(source.labels),
                f"{len(labels)} labels for {len(images)} images in {source.images}; "
                "the files do not belong together",
            )
        )
    log.raise_if_any("data check failed")
    if len(labels) == 0:
        raise fail(Problem(str(source.images), "the files hold no records"))
    return RawArrays(
        files=(source.images, source.labels),
        x=images,
        y=labels,
        image=True,
        features_name="images",
        labels_name="labels",
        problems=log,
    )


def check_source_folder(root: Path, needs: str) -> None:
    """Raise `DataError` unless `source.path` is an existing folder; `needs` says what it holds."""
    if not root.exists():
        raise fail(
            Problem(
                str(root),
                "no such folder; fix 'source.path' (relative paths are resolved from the "
                "schema file's folder)",
            )
        )
    if not root.is_dir():
        raise fail(Problem(str(root), f"is not a folder; {needs}"))


# --------------------------------------------------------------- image folder


def _read_image_folder(source: ImageFolderSource) -> RawArrays:
    from PIL import Image, UnidentifiedImageError

    root, display = source.path, str(source.path)
    check_source_folder(root, "an image_folder source needs one sub-folder per class")
    log = ProblemLog()
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    for stray in (p for p in entries if not p.is_dir()):
        log.add(
            Problem(
                str(stray),
                "is not inside a class sub-folder; move it into the folder "
                "of its class or remove it",
            ),
            kind="stray",
        )
    mode = "L" if source.mode == "grayscale" else "RGB"
    height, width = source.size
    digest = hashlib.sha256()
    digest.update(json.dumps({"canonical": "consortia-images-v1", "mode": mode}).encode())
    pixels: list[np.ndarray] = []
    labels: list[str] = []
    files: list[str] = []
    for class_dir in class_dirs:
        for path in sorted(p for p in class_dir.iterdir() if not p.name.startswith(".")):
            if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
                log.add(
                    Problem(
                        str(path), "is not a PNG or JPEG image; remove it from the class folder"
                    ),
                    kind="not_image",
                )
                continue
            try:
                with Image.open(path) as image:
                    converted = image.convert(mode)
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                log.add(
                    Problem(
                        str(path), f"cannot be decoded as an image ({exc}); replace or remove it"
                    ),
                    kind="decode",
                )
                continue
            original = np.asarray(converted)
            relative = path.relative_to(root).as_posix()
            digest.update(json.dumps({"file": relative, "shape": original.shape}).encode())
            digest.update(original.tobytes())
            resized = converted.resize((width, height), Image.Resampling.BILINEAR)
            pixels.append(np.asarray(resized, dtype=np.uint8))
            labels.append(class_dir.name)
            files.append(str(path))
    if not class_dirs:
        raise fail(
            Problem(
                display,
                "holds no class sub-folders; put the images of each class "
                "in a sub-folder named after the class",
            )
        )
    if not pixels and not log:
        raise fail(Problem(display, "holds no PNG or JPEG images in its class sub-folders"))
    channels = () if mode == "L" else (3,)
    x = np.stack(pixels) if pixels else np.zeros((0, height, width, *channels), np.uint8)
    return RawArrays(
        files=(root,),
        x=x,
        y=np.asarray(labels, dtype=str),
        image=True,
        features_name="pixels",
        labels_name="class folder",
        problems=log,
        record_files=tuple(files),
        digest=digest.hexdigest(),
    )
