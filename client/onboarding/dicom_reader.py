"""Reading a DICOM source: a folder of DICOM files and a CSV file of their labels.

Every file of the folder (searched recursively; hidden files, a DICOMDIR
index and the label file itself aside) is read with pydicom and its pixel
data decoded, in the order of the files' paths. A file that gives no image
is a problem naming the file, why, and what to do (`Unusable`); with
`skip_non_images`, DICOM objects without pixel data are only counted.

A record is one image (unit = "image": the file's middle frame, frame
number // 2 counting from 0, if it holds several) or one series
(unit = "series": the files sharing a Series Instance UID, put in slice
order, by position along the slice normal where every file has Image
Position and Orientation (Patient), else by Instance Number where every
file has one, else by path; the middle one of them, its middle frame). The
middle slice, not a mean of the slices: it is a real image of the series,
it needs no common size or spacing of the slices, and it is what a reader
looks at first. A record's label is the label row whose identifier names
its file, patient, study or series (`key`); records that no row names are
left out and counted.

Header values live only in this module's memory while it reads (the
identifiers that match label rows and group series, slice positions, what
the pixels need); none is put into a problem message (files are named by
path, label rows by row number), and pydicom's own warnings and log
records, which can quote header values, are silenced while it reads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from consortia.client.onboarding.dicom_pixels import UnusableImageError, fit, frame_image
from consortia.client.onboarding.dicom_summary import (
    OTHER,
    UNSPECIFIED,
    DicomSummary,
    Photometric,
    Unusable,
    Windowing,
    modality_category,
    photometric_category,
)
from consortia.client.onboarding.problems import Problem, ProblemLog, fail
from consortia.client.onboarding.readers import RawArrays, check_source_folder, read_text
from consortia.client.onboarding.schema import (
    DicomKey,
    DicomSource,
    DicomUnit,
    category_number,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

CANONICAL_VERSION = "consortia-dicom-v1"
_INDEX_FILES = frozenset({"DICOMDIR"})
_UNDEFINED_LENGTH = 0xFFFFFFFF
_SUPPORTED = frozenset(p.value for p in Photometric)
_KEYWORDS = {
    DicomKey.PATIENT: ("PatientID", "Patient ID (0010,0020)"),
    DicomKey.STUDY: ("StudyInstanceUID", "Study Instance UID (0020,000D)"),
    DicomKey.SERIES: ("SeriesInstanceUID", "Series Instance UID (0020,000E)"),
}
# What is wrong with a file that gives no image, and how to fix it (the other kinds say it
# case by case: `_report`).
_PROBLEMS = {
    Unusable.NOT_DICOM: (
        "not a DICOM file (no 'DICM' marker after the 128-byte preamble); remove it from the "
        "folder, or export it again as a DICOM file"
    ),
    Unusable.DAMAGED: (
        "a truncated or damaged DICOM file (its header or pixel data is cut short or "
        "inconsistent); export the file again or remove it"
    ),
    Unusable.NO_PIXELS: (
        "a DICOM object without an image (no pixel data: a structured report, an RT plan, a "
        "presentation state...); remove it from the folder, or set skip_non_images = true in "
        "[source] to leave such objects out"
    ),
    Unusable.NO_DECODER: (
        "its pixel data is compressed with a transfer syntax that no installed pydicom plugin "
        "decodes; install one (e.g. `pip install pylibjpeg pylibjpeg-libjpeg "
        "pylibjpeg-openjpeg`, or python-gdcm) or export the file uncompressed"
    ),
}


@dataclass
class _File:
    """One file of the folder: what the summary counts and what records need of it."""

    path: Path
    name: str  # the path inside the folder, with '/'
    unusable: Unusable | None = None
    reason: str = ""  # what is wrong, where the kind alone does not say
    modality: str = ""
    photometric: str = ""
    size: str = ""
    frames: int = 1
    ids: dict[DicomKey, str] = field(default_factory=dict)
    position: float | None = None
    instance: int | None = None
    image: np.ndarray | None = None  # unit = "image": the record's image, resized
    digest: bytes = b""  # unit = "image": sha256 of the image before resizing
    windowing: Windowing | None = None


@dataclass
class _Record:
    files: list[_File]  # in slice order (one file for unit = "image")
    key: str
    label: str = ""
    row: int = 0


def read_dicom(source: DicomSource) -> RawArrays:
    """Read a DICOM source (see the module docstring); `DataError` if it cannot be read at all."""
    root, display = source.path, str(source.path)
    check_source_folder(root, "a dicom source reads a folder of files")
    log = ProblemLog()
    rows = _label_rows(source, log)
    paths = _folder_files(root, skip=source.labels)
    if not paths:
        raise fail(Problem(display, "holds no files; put the DICOM files in this folder"))
    with _quiet_pydicom():
        files = [_read_file(path, root, source) for path in paths]
        for file in files:
            _report(file, source, log)
        records = _records([f for f in files if f.unusable is None], source, log)
        labeled = _with_images(_label(records, rows), source, log)
    usable = [f for f in files if f.unusable is None]
    if not usable and all(_skipped(f, source) for f in files):
        log.add(Problem(display, "holds no DICOM image, only objects without pixel data"), "empty")
    elif records and not labeled and rows:
        unit = "images" if source.unit == DicomUnit.IMAGE else "series"
        log.add(
            Problem(
                str(source.labels),
                f"none of its {len(rows)} label rows names one of the {len(records)} {unit} "
                f'in {display} (key = "{source.key.value}": column '
                f"'{source.identifier_column}' must hold {_key_words(source.key)}); check "
                "'key' and 'key_column' in [source]",
            ),
            "nothing_left",
        )
    return RawArrays(
        files=(root, source.labels),
        x=_stack(labeled, source),
        y=_label_array([r.label for r in labeled]),
        image=True,
        features_name="pixels",
        labels_name=source.label_column,
        problems=log,
        digest=_digest(source, files, labeled),
        label_rows=np.asarray([r.row for r in labeled], dtype=np.int64),
        dicom=_summary(source, files, records, labeled, rows),
    )


def _summary(
    source: DicomSource,
    files: list[_File],
    records: list[_Record],
    labeled: list[_Record],
    rows: dict[str, tuple[str, int]],
) -> DicomSummary:
    usable = [f for f in files if f.unusable is None]
    named = {r.key for r in records}
    return DicomSummary(
        unit=source.unit,
        files=len(files),
        images=len(usable),
        unusable=dict(Counter(f.unusable for f in files if f.unusable is not None)),
        skipped=sum(_skipped(f, source) for f in files),
        modalities=_counts(f.modality for f in usable),
        photometric_interpretations=_counts(f.photometric for f in usable),
        image_sizes=_counts(f.size for f in usable),
        multi_frame=sum(f.frames > 1 for f in usable),
        windowing=dict(Counter(w for w in (_chosen(r).windowing for r in labeled) if w)),
        records=len(labeled),
        unlabeled=len(records) - len(labeled),
        label_rows=len(rows),
        unmatched_label_rows=sum(key not in named for key, (label, _) in rows.items() if label),
    )


def _skipped(file: _File, source: DicomSource) -> bool:
    """An object without pixel data that `skip_non_images` leaves out without a problem."""
    return file.unusable == Unusable.NO_PIXELS and source.skip_non_images


# ------------------------------------------------------------------ label file


def _label_rows(source: DicomSource, log: ProblemLog) -> dict[str, tuple[str, int]]:
    """Each identifier of the label file with its label (trimmed; "" for none) and row.

    Problems name rows, never cells: the identifiers are patients' IDs.
    """
    display = str(source.labels)
    text = read_text(source.labels, "source.labels")
    reader = csv.reader(io.StringIO(text, newline=""))
    wanted = (source.identifier_column, source.label_column)
    positions: tuple[int, int] | None = None
    width = 0
    found: dict[str, tuple[str, int]] = {}
    previous_line = 0
    try:
        for fields in reader:
            row, previous_line = previous_line + 1, reader.line_num
            if not "".join(fields).strip():
                continue
            if positions is None:
                header = [f.strip() for f in fields]
                missing = [name for name in wanted if header.count(name) != 1]
                if missing:
                    log.add(_header_problem(source, header, missing, row), "labels\0header")
                    return {}
                width = len(header)
                positions = (header.index(wanted[0]), header.index(wanted[1]))
                continue
            if len(fields) != width:
                log.add(
                    Problem(
                        display,
                        f"{len(fields)} fields where the header has {width} columns; fix the "
                        "row (a stray or missing ',', or a value with ',' that needs quotes)",
                        row=row,
                    ),
                    "labels\0field_count",
                )
                continue
            key, label = fields[positions[0]].strip(), fields[positions[1]].strip()
            if source.key == DicomKey.FILE:
                key = key.replace("\\", "/").removeprefix("./")
            if not key:
                log.add(
                    Problem(
                        display,
                        "no identifier; fill it in or remove the row",
                        row=row,
                        column=wanted[0],
                    ),
                    "labels\0identifier",
                )
            elif key in found:
                log.add(
                    Problem(
                        display,
                        f"names the same {source.key.value} as row {found[key][1]}; keep one "
                        f"row per {source.key.value}",
                        row=row,
                        column=wanted[0],
                    ),
                    "labels\0duplicate",
                )
            else:
                found[key] = (label, row)
    except csv.Error:
        log.add(
            Problem(display, "cannot be parsed as CSV; fix the row", row=reader.line_num),
            "labels\0csv",
        )
    if positions is None and not log:
        log.add(Problem(display, "the file has no header line and no rows"), "labels\0header")
    elif positions is not None and not found and not log:
        log.add(Problem(display, "the file has a header line but no label rows"), "labels\0empty")
    return found


def _header_problem(
    source: DicomSource, header: list[str], missing: list[str], row: int
) -> Problem:
    # The header's other names are not shown: a wrong file's first line could be a record.
    absent = [f"no column '{name}'" for name in missing if name not in header]
    twice = [f"'{name}' twice" for name in missing if name in header]
    return Problem(
        str(source.labels),
        f"its header has {' and '.join(absent + twice)} (of {len(header)} columns); the "
        "label file needs one column of identifiers ('key_column', default: the name of "
        "'key') and one of labels ('label_column', default 'label'): rename the columns or "
        "set these keys in [source]",
        row=row,
    )


def _key_words(key: DicomKey) -> str:
    if key == DicomKey.FILE:
        return "file paths inside the folder (e.g. ct/0001.dcm)"
    return f"the files' {_KEYWORDS[key][1]} values"


# ---------------------------------------------------------------------- files


def _folder_files(root: Path, skip: Path) -> list[Path]:
    """The folder's files in path order (recursively; hidden ones, DICOMDIR and `skip` aside)."""
    skipped = skip.resolve()
    found: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith(".") or name.upper() in _INDEX_FILES:
                continue
            if path.resolve() == skipped:
                continue
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """No pydicom warning or log record while reading: their texts can quote header values."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _read_file(path: Path, root: Path, source: DicomSource) -> _File:
    """Read and decode one file; for unit = "image", also make its record image."""
    file = _File(path=path, name=path.relative_to(root).as_posix())
    try:
        ds, pixels = _decode(path)
    except UnusableImageError as exc:
        file.unusable, file.reason = exc.kind, exc.reason
        return file
    file.photometric = photometric_category(_text(ds, "PhotometricInterpretation"))
    file.modality = modality_category(_text(ds, "Modality"))
    file.frames = _frame_count(ds, pixels)
    rows, columns = (pixels.shape[1:] if file.frames > 1 else pixels.shape)[:2]
    file.size = f"{rows}x{columns}"
    file.ids = {key: _text(ds, keyword) for key, (keyword, _) in _KEYWORDS.items()}
    file.ids[DicomKey.FILE] = file.name
    file.position, file.instance = _slice_position(ds), _instance_number(ds)
    needed = {source.key} | ({DicomKey.SERIES} if source.unit == DicomUnit.SERIES else set())
    if any(not file.ids[key] for key in needed):
        file.unusable = Unusable.NO_IDENTIFIER
        return file
    if source.unit == DicomUnit.IMAGE:
        try:
            file.image, file.digest, file.windowing = _record_image(ds, pixels, file, source)
        except UnusableImageError as exc:
            file.unusable, file.reason = exc.kind, exc.reason
    return file


def _decode(path: Path) -> tuple[Dataset, np.ndarray]:
    """The file's dataset and all its frames; `UnusableImageError` saying why not."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise UnusableImageError(Unusable.NOT_DICOM) from None
    except Exception:  # untrusted bytes: pydicom raises many types on a damaged header
        raise UnusableImageError(Unusable.DAMAGED) from None
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}) or _truncated(ds):
        raise UnusableImageError(Unusable.DAMAGED)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # An image object whose pixel data is missing was cut short; others hold no image.
        sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        image_class = "Image Storage" in str(getattr(sop_class, "name", ""))
        raise UnusableImageError(
            Unusable.DAMAGED if image_class or "Rows" in ds else Unusable.NO_PIXELS
        )
    photometric = photometric_category(_text(ds, "PhotometricInterpretation"))
    if photometric not in _SUPPORTED:  # before decoding: a decoder would call it damaged
        raise UnusableImageError(Unusable.UNSUPPORTED, _unsupported_words(photometric))
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception:  # untrusted bytes: decoders raise many types
        raise UnusableImageError(_decode_failure(ds)) from None
    return ds, pixels


def _truncated(ds: Dataset) -> bool:
    """Whether an element's value is shorter than its declared length (the file was cut).

    pydicom stops quietly at the end of a file; the last element read then
    holds fewer bytes than its header announced.
    """
    from pydicom.dataelem import RawDataElement

    tags = list(ds.keys())  # tags only: iterating the dataset would convert every value
    for tag in tags:
        # pydicom's annotation says DataElement; an unread element is a RawDataElement.
        raw: object = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and isinstance(raw.value, bytes)
            and raw.length != _UNDEFINED_LENGTH
            and len(raw.value) < raw.length
        ):
            return True
    return False


def _decode_failure(ds: Dataset) -> Unusable:
    """Why decoding failed: no installed decoder for its compression, else damaged data."""
    from pydicom.pixels.decoders.base import get_decoder

    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        available = get_decoder(syntax).is_available
    except Exception:  # an unknown or non-image transfer syntax
        return Unusable.DAMAGED
    return Unusable.DAMAGED if available else Unusable.NO_DECODER


def _report(file: _File, source: DicomSource, log: ProblemLog) -> None:
    """Log the problem of an unusable file: what, and how to fix it (no header value)."""
    kind = file.unusable
    if kind is None or _skipped(file, source):
        return
    if kind == Unusable.UNSUPPORTED:
        what = file.reason
    elif kind == Unusable.NO_IDENTIFIER:
        what = _missing_identifier_words(file, source)
    else:
        what = _PROBLEMS[kind]
    log.add(Problem(str(file.path), what), f"dicom\0{kind.value}")


def _unsupported_words(photometric: str) -> str:
    # Only a standard name is shown; anything else in the header is not repeated.
    shown = "an unknown one" if photometric in (OTHER, UNSPECIFIED) else photometric
    return (
        f"its photometric interpretation ({shown}) is not supported (MONOCHROME1/2, RGB, "
        "YBR_FULL(_422), YBR_ICT/RCT and PALETTE COLOR are); convert the image or remove it"
    )


def _missing_identifier_words(file: _File, source: DicomSource) -> str:
    needed = [source.key] + ([DicomKey.SERIES] if source.unit == DicomUnit.SERIES else [])
    names = " and ".join(_KEYWORDS[k][1] for k in dict.fromkeys(needed) if not file.ids.get(k))
    return (
        f'has no {names}, so no label row can name it (key = "{source.key.value}", unit = '
        f'"{source.unit.value}"); fix the export, use key = "file", or remove the file'
    )


# -------------------------------------------------------------------- records


def _records(files: list[_File], source: DicomSource, log: ProblemLog) -> list[_Record]:
    """The records in path order: one per file, or one per series in slice order."""
    if source.unit == DicomUnit.IMAGE:
        return [_Record([f], f.ids[source.key]) for f in files]
    series: dict[str, list[_File]] = {}
    for file in files:
        series.setdefault(file.ids[DicomKey.SERIES], []).append(file)
    records = []
    for members in series.values():
        keys = {f.ids[source.key] for f in members}
        if len(keys) > 1:
            log.add(
                Problem(
                    str(members[0].path),
                    f"the {len(members)} files of its series name {len(keys)} different "
                    f"{source.key.value}s ({_KEYWORDS[source.key][1]}), but a series belongs to "
                    "one; fix the export",
                ),
                "dicom\0series",
            )
            continue
        records.append(_Record(_slice_order(members), keys.pop()))
    return records


def _slice_order(files: list[_File]) -> list[_File]:
    """Slices by position along the normal, else instance number, else path (ties: path)."""
    if all(f.position is not None for f in files):
        return sorted(files, key=lambda f: (f.position, f.name))
    if all(f.instance is not None for f in files):
        return sorted(files, key=lambda f: (f.instance, f.name))
    return sorted(files, key=lambda f: f.name)


def _chosen(record: _Record) -> _File:
    """The record's file: the middle slice (for one file, itself)."""
    return record.files[len(record.files) // 2]


def _label(records: list[_Record], rows: dict[str, tuple[str, int]]) -> list[_Record]:
    """The records a label row names with a label, each given its label and row."""
    labeled = []
    for record in records:
        label, row = rows.get(record.key, ("", 0))
        if label:
            record.label, record.row = label, row
            labeled.append(record)
    return labeled


def _with_images(records: list[_Record], source: DicomSource, log: ProblemLog) -> list[_Record]:
    """The records whose chosen file has its image (made now for series), problems logged.

    unit = "image" made the images while reading; for series only the chosen
    slices are read again (keeping every slice's image would hold the whole
    archive in memory).
    """
    kept = []
    for record in records:
        file = _chosen(record)
        if file.image is None:
            try:
                ds, pixels = _decode(file.path)
                file.image, file.digest, file.windowing = _record_image(ds, pixels, file, source)
            except UnusableImageError as exc:
                file.unusable, file.reason = exc.kind, exc.reason
                _report(file, source, log)
                continue
        kept.append(record)
    return kept


def _record_image(
    ds: Dataset, pixels: np.ndarray, file: _File, source: DicomSource
) -> tuple[np.ndarray, bytes, Windowing]:
    frame = pixels[file.frames // 2] if file.frames > 1 else pixels
    image, windowing = frame_image(ds, frame, Photometric(file.photometric), source.window)
    unit = np.ascontiguousarray(image, dtype=np.float32)
    digest = hashlib.sha256(json.dumps(list(unit.shape)).encode() + unit.tobytes()).digest()
    return fit(image, source.mode, source.size), digest, windowing


# ------------------------------------------------------------------- assembly


def _stack(records: list[_Record], source: DicomSource) -> np.ndarray:
    images = [image for r in records if (image := _chosen(r).image) is not None]
    assert len(images) == len(records)  # `_with_images` keeps only records with their image
    if images:
        return np.stack(images)
    channels = (3,) if source.mode == "rgb" else ()
    return np.zeros((0, *source.size, *channels), dtype=np.float32)


def _label_array(labels: list[str]) -> np.ndarray:
    """Labels as numbers when every one is written as a number (class ids), else as text."""
    numbers = [category_number(label) for label in labels]
    if all(n is not None for n in numbers):
        return np.asarray(numbers, dtype=np.float64)
    return np.asarray(labels, dtype=str)


def _digest(source: DicomSource, files: list[_File], records: list[_Record]) -> str:
    """The content fingerprint: every file's path and status, every record's image and label.

    Each record contributes its files (in slice order), its label, and its
    chosen frame on [0, 1] before resizing: what the model sees, whatever
    the files' encoding. Every file's status is included, so a file that
    appears, vanishes or stops decoding changes the fingerprint.
    """
    digest = hashlib.sha256()
    head = {"canonical": CANONICAL_VERSION, "unit": source.unit.value, "mode": source.mode}
    digest.update(_json(head))
    digest.update(_json([[f.name, f.unusable.value if f.unusable else "image"] for f in files]))
    for record in records:
        digest.update(_json({"files": [f.name for f in record.files], "label": record.label}))
        digest.update(_chosen(record).digest)
    return digest.hexdigest()


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


# -------------------------------------------------------------------- headers


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as trimmed text ("" if absent or unreadable); it stays in memory."""
    try:
        value = ds.get(keyword)
    except Exception:  # untrusted header: a damaged value raises on conversion
        return ""
    return "" if value is None else str(value).strip()


def _samples(ds: Dataset) -> int:
    try:
        return int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError):
        return 1


def _frame_count(ds: Dataset, pixels: np.ndarray) -> int:
    """Frames in the decoded array: (frames, rows, columns[, samples]) when more than one."""
    single = 3 if _samples(ds) > 1 else 2
    return int(pixels.shape[0]) if pixels.ndim > single else 1


def _slice_position(ds: Dataset) -> float | None:
    """The slice's position along its normal (Image Position/Orientation (Patient)), if given."""
    try:
        orientation = [float(v) for v in ds.ImageOrientationPatient]
        position = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(orientation) != 6 or len(position) != 3:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    value = float(np.dot(normal, position))
    return value if np.isfinite(value) else None


def _instance_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or str(value).strip() == "" else int(value)
    except (TypeError, ValueError):
        return None
