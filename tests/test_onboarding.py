"""A node's data onboarding: schema, validation, preparation, fingerprint, registry."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from consortia.client.onboarding import (
    DatasetRegistry,
    QualityReport,
    check_unchanged,
    fingerprint,
    inspect,
    load_spec,
    prepare,
    quality_report,
)
from consortia.common.arrays import LabeledArrays
from consortia.common.errors import ConfigError, DataError
from consortia.common.partition import train_test_split

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("age", "sex", "cp", "chol", "grade")

SCHEMA_COLUMNS = """
[[columns]]
name = "age"
type = "float"
min = 0
max = 120

[[columns]]
name = "sex"
type = "category"
categories = ["F", "M"]

[[columns]]
name = "cp"
type = "category"
categories = ["typical", "atypical", "none"]

[[columns]]
name = "chol"
type = "float"

[[columns]]
name = "grade"
type = "int"
label = true

[label_mapping]
"0" = 0
"1" = 1
"2" = 1
"3" = 1
"4" = 1
"""


def _rows(n: int = 60, seed: int = 0) -> list[list[str]]:
    """A small cardiology-like table with '?' markers for missing values."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = f"{rng.uniform(30, 80):.1f}" if i % 9 != 4 else "?"
        sex = str(rng.choice(["F", "M"])) if i % 11 != 6 else "?"
        cp = str(rng.choice(["typical", "atypical", "none"]))
        chol = f"{rng.normal(240, 40):.0f}"
        grade = str(i % 5)
        rows.append([age, sex, cp, chol, grade])
    return rows


def _write_csv(
    path: Path, rows: list[list[str]], *, header: bool = True, newline: str = "\n"
) -> Path:
    lines = ([",".join(COLUMNS)] if header else []) + [",".join(r) for r in rows]
    path.write_bytes((newline.join(lines) + newline).encode("utf-8"))
    return path


def _write_schema(
    folder: Path, source: str, extra: str = "", columns: str = SCHEMA_COLUMNS
) -> Path:
    path = folder / "dataset.toml"
    path.write_text(f"{extra}\n[source]\n{source}\n{columns}", encoding="utf-8")
    return path


def _csv_dataset(tmp_path: Path, rows: list[list[str]] | None = None, **kwargs: object) -> Path:
    _write_csv(tmp_path / "data.csv", _rows() if rows is None else rows)
    source = 'format = "csv"\npath = "data.csv"\nmissing_values = ["?", ""]'
    return _write_schema(tmp_path, source, **kwargs)  # type: ignore[arg-type]


def _registry_is_empty(registry: DatasetRegistry) -> bool:
    return registry.list() == [] and (
        not registry.root.exists() or not any(registry.root.iterdir())
    )


# ------------------------------------------------------------------ happy paths


def test_csv_with_header_registers_with_report_and_mapping(tmp_path: Path) -> None:
    spec_path = _csv_dataset(tmp_path, extra='missing = "impute"')
    registry = DatasetRegistry(tmp_path / "state")
    registration = registry.add("cardio", spec_path)

    folder = tmp_path / "state" / "datasets" / "cardio"
    assert sorted(p.name for p in folder.iterdir()) == [
        "quality.json",
        "registration.json",
        "spec.toml",
    ]
    assert (folder / "spec.toml").read_bytes() == spec_path.read_bytes()
    assert registry.get("cardio") == registration
    assert [r.name for r in registry.list()] == ["cardio"]
    assert registration.registered_at.utcoffset() is not None
    assert registration.records == 60 and registration.num_classes == 2
    assert registration.train_records + registration.test_records == 60
    assert registration.feature_names == (
        "age", "sex=F", "sex=M", "cp=typical", "cp=atypical", "cp=none", "chol",
    )  # fmt: skip

    report = registry.quality("cardio")
    rows = _rows()
    assert report.records == 60
    assert report.missing_per_column["age"] == sum(r[0] == "?" for r in rows)
    assert report.missing_per_column["sex"] == sum(r[1] == "?" for r in rows)
    assert report.missing_per_column["chol"] == 0
    # Label mapping 1-4 -> 1: grades are i % 5, so one record in five is class 0.
    assert report.class_counts == {0: 12, 1: 48}
    assert report.label_counts == {"0": 12, "1": 12, "2": 12, "3": 12, "4": 12}
    assert report.duplicate_rows == 0

    prepared = registry.load("cardio")
    assert prepared.train.x.dtype == np.float32 and prepared.train.y.dtype == np.int64
    assert set(np.unique(np.concatenate([prepared.train.y, prepared.test.y]))) == {0, 1}
    assert not np.isnan(prepared.train.x).any() and not np.isnan(prepared.test.x).any()
    # One-hot columns hold exactly one 1 per record per category column.
    np.testing.assert_array_equal(prepared.train.x[:, 1:3].sum(axis=1), 1.0)
    assert registry.check("cardio").records == 60


def test_csv_without_header_and_parquet_read_the_same_content(tmp_path: Path) -> None:
    rows = _rows()
    for folder in "abc":
        (tmp_path / folder).mkdir()
    with_header = _csv_dataset(tmp_path / "a")
    _write_csv(tmp_path / "b" / "data.csv", rows, header=False)
    without_header = _write_schema(
        tmp_path / "b", 'format = "csv"\npath = "data.csv"\nheader = false\nmissing_values = ["?"]'
    )
    frame = pd.DataFrame(
        {
            "age": [None if r[0] == "?" else float(r[0]) for r in rows],
            "sex": [None if r[1] == "?" else r[1] for r in rows],
            "cp": [r[2] for r in rows],
            "chol": [float(r[3]) for r in rows],
            "grade": [int(r[4]) for r in rows],
        }
    )
    frame.to_parquet(tmp_path / "c" / "data.parquet")
    parquet = _write_schema(tmp_path / "c", 'format = "parquet"\npath = "data.parquet"')

    specs = [load_spec(p) for p in (with_header, without_header, parquet)]
    assert len({fingerprint(spec) for spec in specs}) == 1
    prepared = [prepare(spec) for spec in specs]
    for other in prepared[1:]:
        np.testing.assert_array_equal(other.train.x, prepared[0].train.x)
        np.testing.assert_array_equal(other.test.y, prepared[0].test.y)
    registry = DatasetRegistry(tmp_path / "state")
    assert registry.add("parquet-set", parquet).records == 60 - sum(
        r[0] == "?" or r[1] == "?" for r in rows
    )  # missing = "drop" by default


def test_npz_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = np.arange(40) % 2
    np.savez(tmp_path / "data.npz", feats=x, target=y)
    spec_path = _write_schema(
        tmp_path,
        'format = "npz"\npath = "data.npz"\nfeatures_key = "feats"\nlabels_key = "target"',
        columns="",
    )
    registration = DatasetRegistry(tmp_path / "state").add("npz-set", spec_path)
    assert registration.fingerprint == LabeledArrays(x, y).fingerprint()
    assert registration.feature_names == ("feats[0]", "feats[1]", "feats[2]")
    prepared = prepare(load_spec(spec_path))
    assert len(prepared.train) + len(prepared.test) == 40 and prepared.num_classes == 2


def _idx_bytes(values: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, values.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in values.shape)
    return header + values.tobytes()


def test_idx_source_gzipped_or_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(30, 5, 4), dtype=np.uint8)
    labels = (np.arange(30) % 3).astype(np.uint8)
    (tmp_path / "img.idx").write_bytes(_idx_bytes(images))
    (tmp_path / "lab.idx").write_bytes(_idx_bytes(labels))
    (tmp_path / "img.idx.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (tmp_path / "lab.idx.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    plain = _write_schema(
        tmp_path, 'format = "idx"\nimages = "img.idx"\nlabels = "lab.idx"', columns=""
    )
    spec = load_spec(plain)
    zipped = spec.model_copy(
        update={
            "source": spec.source.model_copy(
                update={"images": tmp_path / "img.idx.gz", "labels": tmp_path / "lab.idx.gz"}
            )
        }
    )
    assert fingerprint(spec) == fingerprint(zipped) == LabeledArrays(images, labels).fingerprint()
    prepared = prepare(spec)
    assert prepared.feature_shape == (1, 5, 4) and prepared.num_classes == 3
    assert prepared.train.x.min() >= 0.0 and prepared.train.x.max() <= 1.0


def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True)
        for k in range(5):
            pixels = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(root / label / f"{k}.png")
    return root


def test_image_folder_source(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    spec_path = _write_schema(
        tmp_path,
        'format = "image_folder"\npath = "images"\nmode = "rgb"\nsize = [4, 3]',
        extra="standardize = true",
        columns="",
    )
    spec = load_spec(spec_path)
    before = fingerprint(spec)
    prepared = prepare(spec)
    assert prepared.feature_shape == (3, 4, 3) and prepared.num_classes == 2
    assert prepared.feature_names == ("red", "green", "blue")
    assert prepared.mean is not None and prepared.mean.shape == (3,)
    report = quality_report(spec)
    assert report.class_counts == {0: 5, 1: 5} and report.records == 10

    image = np.asarray(Image.open(root / "benign" / "2.png")).copy()
    image[0, 0, 0] ^= 1
    Image.fromarray(image, mode="RGB").save(root / "benign" / "2.png")
    assert fingerprint(spec) != before


# ----------------------------------------------------------------- bad datasets


def _replace_cell(rows: list[list[str]], index: int, column: int, value: str) -> list[list[str]]:
    rows = [list(r) for r in rows]
    rows[index][column] = value
    return rows


BAD_DATASETS = {
    # name: (rows edit, [fragments the message must contain])
    "wrong column count": (
        lambda rows: [*rows[:6], [*rows[6], "99"], *rows[7:]],
        ["data.csv", "row 8", "6 fields where the header has 5 columns"],
    ),
    "string in a numeric column": (
        lambda rows: _replace_cell(rows, 9, 3, "high"),
        ["data.csv", "row 11", "column 'chol'", "'high' is not a number"],
    ),
    "label outside the mapping": (
        lambda rows: _replace_cell(rows, 14, 4, "7"),
        ["data.csv", "row 16", "column 'grade'", "label '7' is not in [label_mapping]"],
    ),
    "out-of-range value": (
        lambda rows: _replace_cell(rows, 2, 0, "430"),
        ["data.csv", "row 4", "column 'age'", "'430' is outside the allowed range [0, 120]"],
    ),
    "unknown category": (
        lambda rows: _replace_cell(rows, 20, 2, "sometimes"),
        ["data.csv", "row 22", "column 'cp'", "'sometimes' is not one of the allowed categories"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_data_is_one_precise_error_and_nothing_is_registered(tmp_path: Path, case: str) -> None:
    edit, fragments = BAD_DATASETS[case]
    spec_path = _csv_dataset(tmp_path, rows=edit(_rows()))
    registry = DatasetRegistry(tmp_path / "state")
    with pytest.raises(DataError) as caught:
        registry.add("cardio", spec_path)
    message = str(caught.value)
    assert "dataset 'cardio' was not registered" in message
    assert "1 problem" in message
    for fragment in fragments:
        assert fragment in message
    assert "; " in message.split("\n")[1]  # every problem says how to fix it
    assert _registry_is_empty(registry)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    spec_path = _csv_dataset(tmp_path)
    registry = DatasetRegistry(tmp_path / "state")
    (tmp_path / "data.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.csv: the file is empty"):
        registry.add("cardio", spec_path)
    (tmp_path / "data.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(DataError, match="has a header line but no data rows"):
        registry.add("cardio", spec_path)
    (tmp_path / "data.csv").unlink()
    with pytest.raises(DataError, match=r"data\.csv: no such file; fix 'source.path'"):
        registry.add("cardio", spec_path)
    assert _registry_is_empty(registry)


def test_no_records_left_after_dropping_missing_values(tmp_path: Path) -> None:
    rows = [[r[0], "?", *r[2:]] for r in _rows()]
    registry = DatasetRegistry(tmp_path / "state")
    with pytest.raises(DataError, match=r"no records left .*column 'sex', in 60 of 60"):
        registry.add("cardio", _csv_dataset(tmp_path, rows=rows))
    assert _registry_is_empty(registry)


def test_all_problems_are_collected_and_capped(tmp_path: Path) -> None:
    rows = _rows()
    for i in range(30):
        rows[i][3] = "n/a"
    rows[40] = rows[40][:4]
    with pytest.raises(DataError) as caught:
        inspect(load_spec(_csv_dataset(tmp_path, rows=rows))).raise_if_problems()
    lines = str(caught.value).splitlines()
    assert lines[0] == "data check failed: 31 problems"
    assert len(lines) == 1 + 20 + 1 and lines[-1].startswith("  ... and 11 more")
    assert "row 2, column 'chol'" in lines[1]  # ordered by row


def test_header_mismatch_suggests_header_false(tmp_path: Path) -> None:
    _write_csv(tmp_path / "data.csv", _rows(), header=False)
    spec = load_spec(_write_schema(tmp_path, 'format = "csv"\npath = "data.csv"'))
    with pytest.raises(DataError, match="set header = false"):
        inspect(spec).raise_if_problems()


def test_schema_needs_exactly_one_label(tmp_path: Path) -> None:
    no_label = SCHEMA_COLUMNS.replace("label = true", "")
    with pytest.raises(ConfigError, match=r"dataset\.toml: columns: .*exactly one column"):
        load_spec(_csv_dataset(tmp_path, columns=no_label))
    two = SCHEMA_COLUMNS.replace('categories = ["F", "M"]', 'categories = ["F", "M"]\nlabel = true')
    with pytest.raises(ConfigError, match=r"found 2 \(sex, grade\)"):
        load_spec(_csv_dataset(tmp_path, columns=two))
    with pytest.raises(ConfigError, match=r"source.csv.delimeter: unknown key"):
        load_spec(_write_schema(tmp_path, 'format = "csv"\npath = "x"\ndelimeter = ";"'))


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_is_canonical_and_sees_changes(tmp_path: Path) -> None:
    spec = load_spec(_csv_dataset(tmp_path))
    data = tmp_path / "data.csv"
    lf = fingerprint(spec)
    _write_csv(data, _rows(), newline="\r\n")
    assert fingerprint(spec) == lf
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes().rstrip(b"\r\n"))  # BOM, no final EOL
    assert fingerprint(spec) == lf
    _write_csv(data, _replace_cell(_rows(), 30, 3, str(int(_rows()[30][3]) + 1)))
    assert fingerprint(spec) != lf


def test_check_detects_a_changed_file(tmp_path: Path) -> None:
    spec_path = _csv_dataset(tmp_path)
    registry = DatasetRegistry(tmp_path / "state")
    registration = registry.add("cardio", spec_path)
    _write_csv(tmp_path / "data.csv", _rows(), newline="\r\n")
    registry.check("cardio")  # same content
    _write_csv(tmp_path / "data.csv", _replace_cell(_rows(), 5, 0, "55.5"))
    with pytest.raises(
        DataError, match=r"changed since dataset 'cardio' was registered.*--replace"
    ):
        registry.check("cardio")
    with pytest.raises(DataError, match="re-register the dataset to accept it"):
        check_unchanged(registration.fingerprint, registration.spec)
    with pytest.raises(DataError, match="changed since"):
        registry.load("cardio")
    replaced = registry.add("cardio", spec_path, replace=True)
    assert replaced.fingerprint != registration.fingerprint
    registry.check("cardio")


# ----------------------------------------------------------------- preparation


def test_split_and_standardisation_are_deterministic_and_train_only(tmp_path: Path) -> None:
    raw_spec = load_spec(_csv_dataset(tmp_path, extra='missing = "impute"'))
    std_spec = raw_spec.model_copy(update={"standardize": True})
    raw, std = prepare(raw_spec), prepare(std_spec)
    again = prepare(std_spec)
    np.testing.assert_array_equal(std.train.x, again.train.x)
    np.testing.assert_array_equal(std.test.y, again.test.y)
    np.testing.assert_array_equal(raw.test.y, std.test.y)

    numeric = [0, 6]  # age, chol; the one-hot columns are left as they are
    mean = raw.train.x[:, numeric].astype(np.float64).mean(axis=0)
    std_dev = raw.train.x[:, numeric].astype(np.float64).std(axis=0)
    np.testing.assert_allclose(std.mean[numeric], mean, rtol=1e-6)
    np.testing.assert_allclose(
        std.test.x[:, numeric], (raw.test.x[:, numeric] - mean) / std_dev, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(std.test.x[:, 1:6], raw.test.x[:, 1:6])
    np.testing.assert_allclose(std.train.x[:, numeric].mean(axis=0), 0.0, atol=1e-5)

    # Imputation uses the train split's median only: pick a seed that puts a
    # record with a missing age in the test split.
    rows = _rows()
    labels = np.array([0 if int(r[4]) == 0 else 1 for r in rows])
    ages = np.array([np.nan if r[0] == "?" else float(r[0]) for r in rows])
    seed = next(s for s in range(100) if np.isnan(ages[train_test_split(labels, 0.2, s)[1]]).any())
    train, test = train_test_split(labels, 0.2, seed)
    seeded = prepare(
        raw_spec.model_copy(update={"split": raw_spec.split.model_copy(update={"seed": seed})})
    )
    np.testing.assert_allclose(
        seeded.test.x[np.isnan(ages[test]), 0], np.nanmedian(ages[train]), rtol=1e-6
    )
    assert np.nanmedian(ages[train]) != np.nanmedian(ages)

    other_seed = raw_spec.model_copy(
        update={"split": raw_spec.split.model_copy(update={"seed": 5})}
    )
    assert not np.array_equal(prepare(other_seed).test.x, raw.test.x)


# -------------------------------------------------------------------- registry


def test_registry_names_and_replacement(tmp_path: Path) -> None:
    spec_path = _csv_dataset(tmp_path)
    registry = DatasetRegistry(tmp_path / "state")
    for bad in ("Cardio", "-x", "a" * 65, "a/b", ""):
        with pytest.raises(DataError, match="not a valid dataset name"):
            registry.add(bad, spec_path)
    registry.add("cardio_2024", spec_path)
    with pytest.raises(DataError, match="already registered"):
        registry.add("cardio_2024", spec_path)
    registry.add("cardio_2024", spec_path, replace=True)
    assert [p.name for p in registry.root.iterdir()] == ["cardio_2024"]  # no leftovers
    with pytest.raises(DataError, match=r"no dataset named 'other' .*registered: cardio_2024"):
        registry.get("other")
    # The same records under a second name would start a second privacy budget.
    with pytest.raises(DataError, match="identical to the registered dataset 'cardio_2024'"):
        registry.add("cardio_copy", spec_path)
    assert [r.name for r in registry.list()] == ["cardio_2024"]


def test_quality_report_json_and_render(tmp_path: Path) -> None:
    report = quality_report(load_spec(_csv_dataset(tmp_path)), dataset="cardio")
    path = tmp_path / "out" / "quality.json"
    report.write_report(path)
    assert QualityReport.read(path) == report
    console = Console(file=io.StringIO(), width=120, record=True)
    report.render(console)
    text = console.export_text()
    for fragment in ("Data quality: cardio", "chol", "Class balance", "stays on this node"):
        assert fragment in text


def test_example_schema_is_valid() -> None:
    spec = load_spec(REPO_ROOT / "client" / "onboarding" / "example-dataset.toml")
    assert spec.source.format == "csv" and spec.declared_num_classes() == 2
    assert spec.label_column is not None and spec.label_column.name == "diagnosis"
