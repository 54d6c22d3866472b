"""The data sources a simulated consortium can be built from.

Each source yields a training pool (split across nodes) and, where the data
comes with one, an official test set. Features are scaled with public
constants only, never with statistics of one node's records: image pixels by
their fixed range onto [0, 1], then, for an 'idx' source whose scenario
declares them (`[simulation.data.normalize]`), by the dataset's public mean
and std (MNIST's are in the bundled MNIST scenarios; another dataset's are
its own, never MNIST's); tabular features by the value ranges published in
the dataset's documentation (a consortium agrees such a schema before
training). `source_scaling` says which, for the run's manifest.
Scaling each node on its own statistics looks harmless but, under label skew,
erases exactly the class signal (a node holding only benign cases would centre
them at zero); measured here it cost over 20 points of accuracy.

The 'files' source is the exception that proves the rule: each node's own
CSV or Parquet file, read and prepared exactly as a real node's onboarding
does it (`consortia.client.onboarding`: its schema, reader, checks and
split), so the simulated node sees what the deployed one would.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from consortia.common.arrays import LabeledArrays, concat
from consortia.common.config import DataConfig
from consortia.common.config_io import read_toml, validate_model
from consortia.common.errors import ConfigError, DataError
from consortia.common.idx import find_idx_pair, read_idx
from consortia.common.preprocess import LogRangeScaler
from consortia.common.scaling import FeatureScaling, ScalingKind, image_scaling

if TYPE_CHECKING:
    from consortia.client.onboarding.schema import DatasetSpec

_IDX_PIXELS = "uint8 pixels / 255"


@dataclass(frozen=True)
class SourceData:
    """A loaded data source: a pool to partition, an optional official test set.

    `columns` holds the raw values of a tabular source's named features (what
    `partition.method = 'column'` splits on: raw, because a value list in a
    scenario is written in the data's own units). `nodes` is set for a
    natural partition (the 'files' source): each node's own train and test
    split, and the pool is only their union.
    """

    pool: LabeledArrays
    test: LabeledArrays | None
    num_classes: int
    kind: Literal["tabular", "image"]
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)
    nodes: tuple[tuple[LabeledArrays, LabeledArrays], ...] | None = None
    # What a statistics query describes: a name per feature (per channel of an
    # image) and the public range of each, on the scale the features are given.
    feature_names: tuple[str, ...] = ()
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.pool.x.shape[1:])


def load_source(config: DataConfig) -> SourceData:
    """Load the source named by `config` (cached: nodes in one process share it)."""
    return _load_source_cached(config)


@lru_cache(maxsize=4)
def _load_source_cached(config: DataConfig) -> SourceData:
    if config.source == "breast_cancer":
        return _sklearn_tabular()
    if config.source == "digits":
        return _sklearn_digits()
    path = data_path(config)
    if config.source == "idx":
        return _idx_folder(path, source_scaling(config))
    return _node_files(config, path)


def source_scaling(config: DataConfig) -> FeatureScaling:
    """How the source `config` names scales its features (what the run's manifest records).

    Reads no data; a 'files' source reads its schema file (`standardize`).
    """
    if config.source == "breast_cancer":
        return FeatureScaling(
            kind=ScalingKind.PUBLIC_RANGE,
            detail="log1p, then each feature's published [min, max] "
            "(load_breast_cancer().DESCR) onto [-1, 1]",
        )
    if config.source == "digits":
        return image_scaling(None, 1, "values 0..16 / 16")
    if config.source == "idx":
        return image_scaling(config.normalize, 1, _IDX_PIXELS)
    assert config.files is not None and config.schema_file is not None  # DataConfig
    schema_path = Path(config.schema_file).expanduser()
    first = data_path(config) / Path(config.files[0]).expanduser()
    return _node_spec(read_toml(schema_path), schema_path, first).feature_scaling()


def data_path(config: DataConfig) -> Path:
    """The folder `path` names ('idx', 'files'); a scenario may leave it to `--data`, not unset.

    Raises `DataError` for a missing folder or an 'idx' source without a
    path; a 'files' source without one reads its files from the working
    directory.
    """
    if config.path is not None:
        folder = Path(config.path).expanduser()
        if not folder.is_dir():
            what = "MNIST-style IDX files" if config.source == "idx" else "the node files"
            raise DataError(f"{folder}: no such folder (expected {what} in it)")
        return folder
    if config.source == "files":
        return Path()  # the files' names are then relative to the working directory
    raise DataError(
        f"source = '{config.source}' has no data path: pass `consortia simulate SCENARIO "
        "--data PATH` or set [simulation.data] path (the folder with the IDX files)"
    )


def _sklearn_tabular() -> SourceData:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    # The per-feature minimum and maximum are the ones in the set's published
    # summary statistics (`load_breast_cancer().DESCR`): public, not node data.
    scaler = LogRangeScaler(low=bunch.data.min(axis=0), high=bunch.data.max(axis=0))
    pool = LabeledArrays(scaler(bunch.data), bunch.target.astype(np.int64))
    columns = {str(name): bunch.data[:, j] for j, name in enumerate(bunch.feature_names)}
    names = tuple(str(name) for name in bunch.feature_names)
    return SourceData(
        pool=pool,
        test=None,
        num_classes=2,
        kind="tabular",
        columns=columns,
        feature_names=names,
        ranges=dict.fromkeys(names, (-1.0, 1.0)),  # LogRangeScaler's codomain
    )


def _sklearn_digits() -> SourceData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 images with values 0..16: scale to [0, 1] with the public maximum.
    images = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    pool = LabeledArrays(images, bunch.target.astype(np.int64))
    return SourceData(
        pool=pool,
        test=None,
        num_classes=10,
        kind="image",
        feature_names=("gray",),
        ranges={"gray": (0.0, 1.0)},
    )


def _idx_folder(folder: Path, scaling: FeatureScaling) -> SourceData:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected MNIST-style IDX files in it)")
    train = find_idx_pair(folder, "train")
    if train is None:
        raise DataError(
            f"{folder}: no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz] pair found"
        )
    pool = _idx_images(*train, scaling)
    test_pair = find_idx_pair(folder, "t10k")
    test = _idx_images(*test_pair, scaling) if test_pair else None
    num_classes = int(max(pool.y.max(), test.y.max() if test else 0)) + 1
    return SourceData(
        pool=pool,
        test=test,
        num_classes=num_classes,
        kind="image",
        feature_names=("gray",),
        ranges={"gray": scaling.range_of(0)},
    )


def _idx_images(images_path: Path, labels_path: Path, scaling: FeatureScaling) -> LabeledArrays:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected a 3-d image array, got shape {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
        )
    x = scaling.scale_images((images.astype(np.float32) / 255.0)[:, None, :, :])
    return LabeledArrays(x, labels.astype(np.int64))


# ---------------------------------------------------------------- node files

_FORMAT_OF_SUFFIX = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def _node_files(config: DataConfig, folder: Path) -> SourceData:
    """One prepared dataset per node file, through the node onboarding's own code path.

    Imported here, not at the top: `consortia.client.onboarding` itself
    imports `common` modules, and only the 'files' source needs it.
    """
    from consortia.client.onboarding.prepare import prepare

    assert config.files is not None and config.schema_file is not None  # DataConfig
    schema_path = Path(config.schema_file).expanduser()
    if not schema_path.is_file():
        raise DataError(
            f"{schema_path}: no such file (simulation.data.schema_file, the dataset.toml the "
            "node files follow; relative to the scenario file's folder)"
        )
    template = read_toml(schema_path)
    nodes = []
    for name in config.files:
        node_file = folder / Path(name).expanduser()
        if not node_file.is_file():
            raise DataError(
                f"{node_file}: no such file (listed in simulation.data.files"
                + (f", relative to {folder}" if config.path is not None else "")
                + ")"
            )
        prepared = prepare(_node_spec(template, schema_path, node_file))
        nodes.append(prepared)
    shapes = {p.feature_shape for p in nodes}
    if len(shapes) > 1:  # pragma: no cover - one schema fixes the columns and their encoding
        raise DataError(f"{schema_path}: the node files give different feature shapes {shapes}")
    splits = tuple((p.train, p.test) for p in nodes)
    spec = _node_spec(template, schema_path, folder / Path(config.files[0]).expanduser())
    return SourceData(
        pool=concat([part for split in splits for part in split]),
        test=None,
        num_classes=max(p.num_classes for p in nodes),
        kind="tabular",
        nodes=splits,
        feature_names=nodes[0].feature_names,
        # Standardised per node, the features have no common public scale.
        ranges={} if spec.standardize else spec.feature_ranges(),
    )


def _node_spec(template: dict[str, Any], schema_path: Path, node_file: Path) -> DatasetSpec:
    """The schema with `[source] path` set to one node's file (format from the schema or suffix).

    A real node's dataset.toml can serve as the template as it is: its own
    `path`, if any, is replaced by each node's file.
    """
    from consortia.client.onboarding.schema import TABLE_FORMATS, DatasetSpec

    data = copy.deepcopy(template)
    source = data.get("source")
    source = dict(source) if isinstance(source, dict) else {}
    fmt = source.get("format") or _FORMAT_OF_SUFFIX.get(node_file.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"{node_file}: cannot tell CSV from Parquet by the name; set [source] format "
            f"in {schema_path}"
        )
    if fmt not in TABLE_FORMATS:
        raise ConfigError(
            f"{schema_path}: [source] format = '{fmt}': the 'files' source reads one CSV or "
            "Parquet file per node; use 'csv' or 'parquet'"
        )
    source.update(format=fmt, path=str(node_file))
    data["source"] = source
    spec = validate_model(DatasetSpec, data, str(schema_path))
    return spec.resolved(schema_path.parent)
