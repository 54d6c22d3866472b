"""The dataset schema, `dataset.toml`: where a node's local data lives and what it must hold.

A hospital's IT team writes one such file per dataset. It names the source
(`[source]`, one of six formats), describes every table column
(`[[columns]]`), and says how the data is prepared for training (label
mapping, missing values, split, standardisation). Every model forbids unknown
keys, so a typo is an error rather than a silently ignored setting.

Relative paths in the file are resolved from the folder of the file itself,
so a schema can sit next to its data and be moved together with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from consortia.common.config import ImageNormalization, StrictModel
from consortia.common.config_io import read_toml, validate_model
from consortia.common.scaling import FeatureScaling, ScalingKind, image_scaling

FORMATS = ("csv", "parquet", "npz", "idx", "image_folder", "dicom")
TABLE_FORMATS = ("csv", "parquet")
IMAGE_FORMATS = ("idx", "image_folder", "dicom")
IMAGE_PIXELS = "uint8 pixels / 255"
DICOM_PIXELS = (
    "DICOM pixels through their rescale slope and intercept (modality LUT), then a window "
    "(the schema's, else each file's VOI LUT or window centre/width, else each image's own "
    "range; colour images by their bit depth)"
)

# ----------------------------------------------------------------------- sources


# More classes than any dataset has: a class count inferred above it is a typo in a label.
MAX_CLASSES = 100_000


class _TableSource(StrictModel):
    """Settings shared by the table formats."""

    path: Path
    missing_values: tuple[str, ...] = Field(
        default=("",), description="cell texts that mean 'no value' (compared after trimming)"
    )

    @field_validator("missing_values")
    @classmethod
    def _trimmed_markers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(marker.strip() for marker in value))


class CsvSource(_TableSource):
    """A delimited text file (UTF-8, a byte-order mark is accepted)."""

    format: Literal["csv"]
    header: bool = Field(
        default=True,
        description="the first line names the columns; without one the schema's order is used",
    )
    delimiter: str = Field(default=",", min_length=1, max_length=1)

    @field_validator("delimiter")
    @classmethod
    def _usable_delimiter(cls, value: str) -> str:
        if value in {'"', "\n", "\r"}:
            raise ValueError("the delimiter cannot be a quote or a line break")
        return value


class ParquetSource(_TableSource):
    """A Parquet file; column names come from the file, markers apply to text columns."""

    format: Literal["parquet"]


class NpzSource(StrictModel):
    """A NumPy `.npz` archive with a feature array and a label array (no pickles)."""

    format: Literal["npz"]
    path: Path
    features_key: str = Field(default="x", min_length=1)
    labels_key: str = Field(default="y", min_length=1)


class IdxSource(StrictModel):
    """An IDX image file and an IDX label file (the MNIST format), gzipped or not."""

    format: Literal["idx"]
    images: Path
    labels: Path


ColourMode = Literal["grayscale", "rgb"]
ImageSize = Annotated[
    tuple[Annotated[int, Field(ge=1, le=4096)], Annotated[int, Field(ge=1, le=4096)]],
    Field(description="[height, width] every image is resized to"),
]


class ImageFolderSource(StrictModel):
    """One sub-folder per class holding PNG or JPEG images; the folder name is the label."""

    format: Literal["image_folder"]
    path: Path
    mode: ColourMode = "grayscale"
    size: ImageSize


class DicomKey(StrEnum):
    """What the identifiers in a DICOM source's label file name."""

    FILE = "file"  # the file's path inside the folder ("ct/0001.dcm")
    PATIENT = "patient"  # Patient ID (0010,0020)
    STUDY = "study"  # Study Instance UID (0020,000D)
    SERIES = "series"  # Series Instance UID (0020,000E)


class DicomUnit(StrEnum):
    """What one record of a DICOM source is."""

    IMAGE = "image"  # one file (its middle frame, if it holds several)
    SERIES = "series"  # one series: its middle slice in slice order


class DicomWindow(StrictModel):
    """A window every image is shown through, in the modality's units (e.g. HU for CT).

    The DICOM "LINEAR" function (PS3.3 C.11.2.1.2.1): values at or below
    centre - width/2 become 0, values above centre + width/2 become 1.
    """

    center: Annotated[float, Field(allow_inf_nan=False)]
    width: Annotated[float, Field(ge=1, allow_inf_nan=False)]


class DicomSource(StrictModel):
    """A folder of DICOM files (searched recursively) and a CSV file of their labels.

    The CSV's `key_column` (default: the name of `key`) holds identifiers
    of the kind `key` names, its `label_column` the labels; other columns
    are ignored. Every file of the folder is read as DICOM (hidden files and
    a DICOMDIR index aside); with `skip_non_images`, DICOM objects without
    pixel data (structured reports, RT plans...) are counted and left out
    instead of stopping registration.
    """

    format: Literal["dicom"]
    path: Path
    labels: Path
    key: DicomKey = DicomKey.FILE
    key_column: str | None = Field(default=None, min_length=1)
    label_column: str = Field(default="label", min_length=1)
    unit: DicomUnit = DicomUnit.IMAGE
    mode: ColourMode = "grayscale"
    size: ImageSize
    window: DicomWindow | None = None
    skip_non_images: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> DicomSource:
        if self.unit == DicomUnit.SERIES and self.key == DicomKey.FILE:
            raise ValueError(
                'unit = "series" takes one label per series; key = "file" labels single '
                'files: use key = "series", "study" or "patient", or unit = "image"'
            )
        if self.identifier_column == self.label_column:
            raise ValueError(
                f"key_column and label_column are both '{self.label_column}'; the label file "
                "needs one column of identifiers and one of labels"
            )
        return self

    @property
    def identifier_column(self) -> str:
        """The label file's column of identifiers."""
        return self.key_column if self.key_column is not None else self.key.value


def _source_format(value: Any) -> Any:
    return value.get("format") if isinstance(value, dict) else getattr(value, "format", None)


Source = Annotated[
    Annotated[CsvSource, Tag("csv")]
    | Annotated[ParquetSource, Tag("parquet")]
    | Annotated[NpzSource, Tag("npz")]
    | Annotated[IdxSource, Tag("idx")]
    | Annotated[ImageFolderSource, Tag("image_folder")]
    | Annotated[DicomSource, Tag("dicom")],
    # A callable discriminator so that a wrong or missing `format` reads as one
    # plain sentence (the shared formatter words string-tag errors for `name`).
    Discriminator(
        _source_format,
        custom_error_type="invalid_format",
        custom_error_message="'format' must be one of " + ", ".join(f"'{f}'" for f in FORMATS),
    ),
]

# ----------------------------------------------------------------------- columns


class CategoryKind(StrEnum):
    """How a category column's cells are matched to its declared `categories`."""

    NUMBER = "number"  # by value: "1", "1.0", "01" and "+1" are the category "1"
    TEXT = "text"  # by the exact text after trimming: "1.0" is not "1"


# A number as a data export writes one: sign, digits, decimal point, exponent.
# Deliberately narrower than float(): no "nan", "inf", "1_000" or hex.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def category_number(text: str) -> float | None:
    """The value of a (trimmed) category text written as a finite number, else None."""
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if value == value and abs(value) != float("inf") else None


def _numbers_of(categories: tuple[str, ...]) -> list[float] | None:
    """Each category's number, or None unless every one is a number and no two are equal."""
    numbers = [category_number(c) for c in categories]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    return values if len(set(values)) == len(values) else None


class ColumnSpec(StrictModel):
    """One column of a table source.

    `min`/`max` bound numeric values (inclusive); `categories` lists the
    allowed values of a category column, in the order every node one-hot
    encodes them. `ignore = true` reads the column (it counts for the column
    count and the fingerprint) but never checks or uses it, e.g. a patient id.

    `category_kind` says how cells match `categories`: "number" by value (one
    site's export writes `1.0` where another writes `1`; both are the
    category "1", one and the same one-hot column), "text" by the exact text.
    Unset, the categories are numbers when every one is written as a number
    and no two are equal ("1" and "01" together stay text), else text. A
    matched cell takes the declared category's spelling, so everything
    downstream (one-hot columns, labels, fingerprint) sees one spelling.

    `drop_first = true` leaves out the one-hot column of the first declared
    category (reference-category coding, as clinical models use): that
    category is the all-zero row.
    """

    name: str = Field(min_length=1)
    type: Literal["float", "int", "category"]
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None
    category_kind: CategoryKind | None = None
    drop_first: bool = False
    label: bool = False
    ignore: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ColumnSpec:
        where = f"column '{self.name}'"
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{where}: 'min' ({self.min:g}) is above 'max' ({self.max:g})")
        if self.type == "category" and (self.min is not None or self.max is not None):
            raise ValueError(f"{where}: 'min'/'max' apply to numbers; remove them or use 'float'")
        if self.type != "category" and self.categories is not None:
            raise ValueError(
                f"{where}: 'categories' applies to type 'category'; remove it or change the type"
            )
        if self.categories is not None:
            if not self.categories:
                raise ValueError(f"{where}: 'categories' is empty; list the allowed values")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError(f"{where}: 'categories' lists a value twice")
        if self.category_kind is not None and self.categories is None:
            raise ValueError(
                f"{where}: 'category_kind' says how values match 'categories'; list the "
                "categories or remove it"
            )
        if self.category_kind == CategoryKind.NUMBER:
            assert self.categories is not None
            if _numbers_of(self.categories) is None:
                raise ValueError(
                    f'{where}: category_kind = "number" needs every category written as a '
                    f"number, no two equal (e.g. '1' and '01'); got "
                    f"{', '.join(repr(c) for c in self.categories[:10])}; correct them or use "
                    'category_kind = "text"'
                )
        if self.drop_first and (self.label or self.ignore or self.type != "category"):
            raise ValueError(
                f"{where}: 'drop_first' applies to category feature columns (their one-hot "
                "columns); remove it"
            )
        if self.drop_first and self.categories is not None and len(self.categories) < 2:
            raise ValueError(
                f"{where}: 'drop_first' with one category would leave no column; remove it"
            )
        if self.label and self.ignore:
            raise ValueError(f"{where}: a column cannot be both 'label' and 'ignore'")
        if self.label and self.type == "float":
            raise ValueError(f"{where}: the label column must be of type 'int' or 'category'")
        if self.type == "category" and not self.label and not self.ignore and not self.categories:
            raise ValueError(
                f"{where}: type 'category' needs 'categories' (the allowed values, in the "
                "order every node encodes them)"
            )
        return self

    @property
    def is_feature(self) -> bool:
        return not self.label and not self.ignore

    @property
    def numeric_categories(self) -> bool:
        """Whether cells match `categories` by value (see the class docstring)."""
        if self.categories is None or self.category_kind == CategoryKind.TEXT:
            return False
        return _numbers_of(self.categories) is not None

    @property
    def encoded_categories(self) -> tuple[str, ...]:
        """The categories that get a one-hot column, in order (with drop_first, not the first)."""
        categories = self.categories or ()
        return categories[1:] if self.drop_first else categories

    def match_categories(self, texts: Iterable[str]) -> dict[str, str | None]:
        """Each of the (trimmed) cell texts' declared category, None where it is not one."""
        categories = self.categories or ()
        if not self.numeric_categories:
            allowed = set(categories)
            return {text: text if text in allowed else None for text in texts}
        by_value = {category_number(c): c for c in categories}
        matches: dict[str, str | None] = {}
        for text in texts:
            number = category_number(text)
            matches[text] = None if number is None else by_value.get(number)
        return matches


class SplitSpec(StrictModel):
    """The local train/test split."""

    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    stratified: bool = True
    seed: int = Field(default=0, ge=0, lt=2**32)


# ----------------------------------------------------------------------- dataset


class DatasetSpec(StrictModel):
    """A validated `dataset.toml`.

    Preparation settings:
    - `label_mapping` maps raw label values (as text) to class ids 0..k-1,
      e.g. ``{"0" = 0, "1" = 1, "2" = 1}`` to binarise a graded label;
    - `num_classes` fixes the class count every node agrees on (otherwise it
      comes from the mapping, the label column's categories or `max`, or the
      data);
    - `missing`: "drop" removes records with a missing feature; "impute" fills
      it with the median (numbers) or the most frequent category, computed on
      the local train split only. Records without a label are always dropped;
    - `standardize`: z-score numeric features with the train split's mean and
      standard deviation (one-hot columns are left as 0/1). Off by default:
      statistics of one node's records differ from node to node, and under
      label skew they can erase the class signal (see simulations/sources.py).
    - `[normalize]` (image sources): public per-channel `mean` and `std` on
      the [0, 1] pixel scale, e.g. the ones published with the dataset, that
      every node standardises its pixels with. Without it (and without
      `standardize`) pixels stay on their fixed [0, 1] scale.
    """

    description: str = ""
    source: Source
    columns: tuple[ColumnSpec, ...] = ()
    label_mapping: dict[str, int] | None = None
    num_classes: int | None = Field(default=None, ge=2, le=MAX_CLASSES)
    missing: Literal["drop", "impute"] = "drop"
    standardize: bool = False
    normalize: ImageNormalization | None = None
    split: SplitSpec = SplitSpec()

    @field_validator("columns")
    @classmethod
    def _columns(cls, columns: tuple[ColumnSpec, ...]) -> tuple[ColumnSpec, ...]:
        if not columns:
            return columns
        names = [c.name for c in columns]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"column names must be unique; declared twice: {', '.join(twice)}")
        labels = [c.name for c in columns if c.label]
        if len(labels) != 1:
            found = f"{len(labels)} ({', '.join(labels)})" if labels else "none"
            raise ValueError(
                f"exactly one column needs 'label = true'; found {found}; "
                "mark the column that holds the outcome, and only that one"
            )
        if not any(c.is_feature for c in columns):
            raise ValueError("no feature column: every column is the label or ignored")
        return columns

    @field_validator("label_mapping")
    @classmethod
    def _mapping(cls, mapping: dict[str, int] | None) -> dict[str, int] | None:
        if mapping is None:
            return None
        if not mapping:
            raise ValueError("[label_mapping] is empty; map each raw label to a class id")
        ids = sorted(set(mapping.values()))
        if ids != list(range(len(ids))):
            raise ValueError(f"class ids must be 0..k-1 without gaps; the mapping gives {ids}")
        return mapping

    @model_validator(mode="after")
    def _fits_source(self) -> DatasetSpec:
        fmt = self.source.format
        if fmt in TABLE_FORMATS and not self.columns:
            raise ValueError(
                f"a {fmt} source needs [[columns]] entries describing every column "
                "(name, type, and label = true on the outcome column)"
            )
        if fmt not in TABLE_FORMATS and self.columns:
            raise ValueError(f"[[columns]] describe table columns; a {fmt} source takes none")
        if self.normalize is not None:
            if fmt not in IMAGE_FORMATS:
                raise ValueError(
                    f"[normalize] gives public pixel constants of image sources; a {fmt} "
                    "source takes none (remove it)"
                )
            if self.standardize:
                raise ValueError(
                    "[normalize] (public constants) and standardize = true (this node's "
                    "train-split statistics) both scale the pixels; keep one"
                )
            try:
                self.normalize.per_channel(self.image_channels)
            except ValueError as exc:
                raise ValueError(f"[normalize]: {exc}") from None
        label = self.label_column
        known = len(set(self.label_mapping.values())) if self.label_mapping else None
        if label is not None and label.type == "category" and known is None:
            if not label.categories:
                raise ValueError(
                    f"label column '{label.name}': give 'categories' (their order sets the "
                    "class ids) or a [label_mapping]"
                )
            known = len(label.categories)
        if label is not None and label.categories and self.label_mapping is not None:
            unmapped = [c for c in label.categories if c not in self.label_mapping]
            if unmapped:
                raise ValueError(
                    f"[label_mapping] has no class id for the label categories "
                    f"{', '.join(repr(c) for c in unmapped)}"
                )
        if known is not None and self.num_classes is not None and self.num_classes < known:
            raise ValueError(
                f"'num_classes' ({self.num_classes}) is below the {known} classes the "
                "label mapping or categories define"
            )
        return self

    # ------------------------------------------------------------------ helpers

    @property
    def is_table(self) -> bool:
        return self.source.format in TABLE_FORMATS

    @property
    def image_channels(self) -> int:
        """Channels of an image source's images (1 for other sources)."""
        if isinstance(self.source, ImageFolderSource | DicomSource) and self.source.mode == "rgb":
            return 3
        return 1

    def feature_scaling(self) -> FeatureScaling:
        """How preparing the data scales its features (recorded in the registration)."""
        if self.standardize:
            return FeatureScaling(
                kind=ScalingKind.TRAIN_SPLIT,
                detail="z-score with this node's own train-split mean and std (per channel "
                "for images, per numeric feature for tables; one-hot columns stay 0/1)",
            )
        if isinstance(self.source, DicomSource):
            return image_scaling(self.normalize, self.image_channels, DICOM_PIXELS)
        if self.source.format in IMAGE_FORMATS:
            return image_scaling(self.normalize, self.image_channels, IMAGE_PIXELS)
        return FeatureScaling(
            kind=ScalingKind.NONE, detail="values as parsed; one-hot columns 0 or 1"
        )

    @property
    def label_column(self) -> ColumnSpec | None:
        return next((c for c in self.columns if c.label), None)

    @property
    def feature_columns(self) -> tuple[ColumnSpec, ...]:
        return tuple(c for c in self.columns if c.is_feature)

    def feature_ranges(self) -> dict[str, tuple[float, float]]:
        """The public range of each prepared feature the schema bounds (unstandardised units).

        A numeric column with both `min` and `max` set; each one-hot column
        ("column=category") of a category column is 0 or 1.
        """
        ranges: dict[str, tuple[float, float]] = {}
        for column in self.feature_columns:
            if column.categories is not None:
                ranges.update({f"{column.name}={c}": (0.0, 1.0) for c in column.encoded_categories})
            elif column.min is not None and column.max is not None and column.min < column.max:
                ranges[column.name] = (column.min, column.max)
        return ranges

    def declared_num_classes(self) -> int | None:
        """The class count the schema fixes, or None when only the data can tell."""
        if self.num_classes is not None:
            return self.num_classes
        if self.label_mapping is not None:
            return len(set(self.label_mapping.values()))
        label = self.label_column
        if label is not None and label.categories:
            return len(label.categories)
        if label is not None and label.max is not None:
            return min(int(label.max) + 1, MAX_CLASSES)
        return None

    def source_files(self) -> tuple[Path, ...]:
        """The files (or folder) the source reads."""
        if isinstance(self.source, IdxSource):
            return (self.source.images, self.source.labels)
        if isinstance(self.source, DicomSource):
            return (self.source.path, self.source.labels)
        return (self.source.path,)

    def resolved(self, base: Path) -> DatasetSpec:
        """A copy whose relative source paths are made absolute from `base`."""
        base = base.expanduser().resolve()

        def fix(path: Path) -> Path:
            path = path.expanduser()
            return path if path.is_absolute() else (base / path).resolve()

        if isinstance(self.source, IdxSource):
            update = {"images": fix(self.source.images), "labels": fix(self.source.labels)}
        elif isinstance(self.source, DicomSource):
            update = {"path": fix(self.source.path), "labels": fix(self.source.labels)}
        else:
            update = {"path": fix(self.source.path)}
        return self.model_copy(update={"source": self.source.model_copy(update=update)})


def load_spec(path: Path) -> DatasetSpec:
    """Read and validate a `dataset.toml`; relative paths resolve from its folder.

    Raises `ConfigError` ("file: key: message" lines) when the file is not
    valid TOML or does not describe a valid dataset.
    """
    path = Path(path)
    spec = validate_model(DatasetSpec, read_toml(path), str(path))
    return spec.resolved(path.parent)
