"""What the quality report says about a DICOM source: counts by category, no header value.

A DICOM header names the patient, their IDs and birth date, the study's
dates, UIDs and institution. None of that may leave the node, nor even reach
the node's own reports: the summary keeps counts only, keyed by values
from closed vocabularies that identify no one (a modality code from the
standard's defined terms, a photometric interpretation from its enumerated
values, an image size, how the pixels were windowed, why a file could not
be used). A header value outside the vocabulary is counted as "other",
never copied.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from consortia.client.onboarding.schema import DicomUnit

# Modality (0008,0060) defined terms of DICOM PS3.3 C.7.3.1.1.1 (current and retired).
MODALITIES = frozenset(
    {
        "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CD", "CF", "CP", "CR", "CS", "CT", "CV",
        "DD", "DF", "DG", "DM", "DOC", "DS", "DX", "EC", "ECG", "EPS", "ES", "FA", "FID", "FS",
        "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LP", "LS", "MA",
        "MG", "MR", "MS", "NM", "OAM", "OCT", "OP", "OPM", "OPR", "OPT", "OPTBSV", "OPTENF",
        "OPV", "OSS", "OT", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG",
        "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN",
        "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "ST", "STAIN", "TEXTUREMAP", "TG",
        "US", "VA", "VF", "XA", "XAPS", "XC",
    }
)  # fmt: skip
UNSPECIFIED = "unspecified"  # the header holds no value
OTHER = "other"  # a value outside the vocabulary: counted, never copied


class Photometric(StrEnum):
    """Photometric interpretations (0028,0004) the DICOM source turns into pixels."""

    MONOCHROME1 = "MONOCHROME1"  # low values bright: inverted after windowing
    MONOCHROME2 = "MONOCHROME2"
    PALETTE_COLOR = "PALETTE COLOR"
    RGB = "RGB"
    YBR_FULL = "YBR_FULL"  # decoded to RGB by pydicom
    YBR_FULL_422 = "YBR_FULL_422"
    YBR_ICT = "YBR_ICT"  # JPEG 2000 colour: decoded to RGB
    YBR_RCT = "YBR_RCT"

    @property
    def monochrome(self) -> bool:
        return self in (Photometric.MONOCHROME1, Photometric.MONOCHROME2)


# The standard's other (mostly retired) enumerated values: counted by name, refused.
_OTHER_PHOTOMETRIC = frozenset({"YBR_PARTIAL_420", "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK"})


def photometric_category(value: object) -> str:
    """A photometric interpretation as counted: its enumerated name, else unspecified/other."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return UNSPECIFIED
    if text in Photometric.__members__.values() or text in _OTHER_PHOTOMETRIC:
        return text
    return OTHER


def modality_category(value: object) -> str:
    """A modality as counted: its defined term, else unspecified/other."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return UNSPECIFIED
    return text if text in MODALITIES else OTHER


class Unusable(StrEnum):
    """Why a file of a DICOM source yields no image."""

    NOT_DICOM = "not_dicom"  # no DICOM Part 10 file (no 'DICM' marker)
    DAMAGED = "damaged"  # truncated or damaged header or pixel data
    NO_PIXELS = "no_pixels"  # a DICOM object without an image (SR, RT plan, ...)
    NO_DECODER = "no_decoder"  # compressed with a syntax no installed plugin decodes
    UNSUPPORTED = "unsupported"  # pixels this source cannot interpret (colour model, LUT)
    NO_IDENTIFIER = "no_identifier"  # lacks the identifier its label or series needs


class Windowing(StrEnum):
    """How a record's pixels were mapped onto [0, 1]."""

    SCHEMA = "schema"  # the schema's [source.window]
    VOI_LUT = "voi_lut"  # the file's VOI LUT Sequence
    FILE_WINDOW = "file_window"  # the file's Window Center / Width (its first pair)
    IMAGE_RANGE = "image_range"  # no window: the image's own minimum and maximum
    COLOUR = "colour"  # colour pixels by their bit depth (or palette), no window


class DicomSummary(BaseModel):
    """Counts describing a DICOM source (see the module docstring: no header value).

    `files` counts the files read (hidden files and DICOMDIR aside);
    `unusable` those that gave no image, by reason; `skipped` the ones of
    them left out under `skip_non_images`. `modalities`,
    `photometric_interpretations`, `image_sizes` ("rows x columns") and
    `multi_frame` describe the files that gave an image. `windowing` counts
    the records by how their pixels reached [0, 1]; `unlabeled` the images
    or series no label row names (left out), `unmatched_label_rows` the
    label rows that name no image.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit: DicomUnit
    files: int
    images: int
    unusable: dict[Unusable, int]
    skipped: int = 0
    modalities: dict[str, int]
    photometric_interpretations: dict[str, int]
    image_sizes: dict[str, int]
    multi_frame: int
    windowing: dict[Windowing, int]
    records: int
    unlabeled: int
    label_rows: int
    unmatched_label_rows: int
