"""Data onboarding: the less common paths of each source format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from consortia.client.onboarding import (
    DatasetRegistry,
    fingerprint,
    inspect,
    load_spec,
    prepare,
    validate,
)
from consortia.common.errors import DataError

TABLE_COLUMNS = """
[[columns]]
name = "id"
type = "category"
ignore = true

[[columns]]
name = "dose"
type = "float"

[[columns]]
name = "visits"
type = "int"

[[columns]]
name = "outcome"
type = "category"
categories = ["healthy", "sick"]
label = true
"""


def _schema(folder: Path, source: str, columns: str = TABLE_COLUMNS, extra: str = "") -> Path:
    path = folder / "dataset.toml"
    path.write_text(f"{extra}\n[source]\n{source}\n{columns}", encoding="utf-8")
    return path


def _table_text(n: int = 20) -> str:
    lines = ["id,dose,visits,outcome"]
    lines += [f"p{i},{i * 0.5},{i % 4},{'sick' if i % 3 == 0 else 'healthy'}" for i in range(n)]
    return "\n".join(lines) + "\n"


def _problem_lines(error: pytest.ExceptionInfo[DataError]) -> list[str]:
    return [line for line in str(error.value).splitlines() if line.startswith("  - ")]


def test_table_canonical_form_ignores_layout_but_not_values(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text(_table_text())
    spec = load_spec(_schema(tmp_path, 'format = "csv"\npath = "data.csv"'))
    base = fingerprint(spec)
    # Quotes, spaces around cells, "1" vs "1.0", blank lines, column order: same content.
    lines = _table_text().splitlines()
    reordered = ["outcome,visits,dose,id"]
    for line in lines[1:]:
        i, dose, visits, outcome = line.split(",")
        reordered.append(f'"{outcome}", {float(visits)} ,{dose},{i}\n')
    data.write_text("\n".join(reordered) + "\n")
    assert fingerprint(spec) == base
    # An ignored column is still content.
    data.write_text(_table_text().replace("p7,", "p77,"))
    assert fingerprint(spec) != base


def test_ignored_column_and_whole_numbers(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text(_table_text().replace(",3,", ",3.0,").replace("p5,2.5,1,", "p5,2.5,1.5,"))
    spec = load_spec(_schema(tmp_path, 'format = "csv"\npath = "data.csv"'))
    with pytest.raises(DataError) as caught:
        validate(spec)
    (line,) = _problem_lines(caught)
    assert "row 7, column 'visits': value '1.5' is not a whole number" in line
    data.write_text(_table_text())
    prepared = prepare(spec)
    assert prepared.feature_names == ("dose", "visits")  # 'id' is ignored
    assert prepared.num_classes == 2  # the label's categories, in declared order


def test_header_line_in_a_file_declared_without_header(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(_table_text())
    spec = load_spec(_schema(tmp_path, 'format = "csv"\npath = "data.csv"\nheader = false'))
    with pytest.raises(DataError) as caught:
        validate(spec)
    (line,) = _problem_lines(caught)
    assert "row 1: holds the column names; set header = true" in line


def test_tab_delimited_file_with_extra_column(tmp_path: Path) -> None:
    text = _table_text().replace(",", "\t").replace("outcome\n", "outcome\tnote\n", 1)
    text = "\n".join(line + "\tx" if i else line for i, line in enumerate(text.splitlines()))
    (tmp_path / "data.tsv").write_text(text + "\n")
    spec = load_spec(_schema(tmp_path, 'format = "csv"\npath = "data.tsv"\ndelimiter = "\\t"'))
    with pytest.raises(DataError, match=r"row 1, column 'note': in the file but not declared"):
        validate(spec)


def test_parquet_string_in_a_numeric_column(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "dose": ["1.5", "lots", None, "2"],
            "visits": [1, 2, 3, 4],
            "outcome": ["sick", "healthy", "sick", "unsure"],
        }
    )
    frame.to_parquet(tmp_path / "data.parquet")
    spec = load_spec(_schema(tmp_path, 'format = "parquet"\npath = "data.parquet"'))
    with pytest.raises(DataError) as caught:
        validate(spec)
    lines = _problem_lines(caught)
    assert "data.parquet: row 2, column 'dose': value 'lots' is not a number" in lines[0]
    assert "row 4, column 'outcome': value 'unsure' is not one of the allowed" in lines[1]
    report = inspect(spec)
    assert len(report.problems) == 2


def test_npz_problems_and_missing_values(tmp_path: Path) -> None:
    x = np.arange(24, dtype=np.float64).reshape(12, 2)
    x[3, 1] = np.nan
    np.savez(tmp_path / "data.npz", x=x, y=np.array([0, 1] * 6))
    spec_path = _schema(tmp_path, 'format = "npz"\npath = "data.npz"', columns="")
    dropped = prepare(load_spec(spec_path))
    assert len(dropped.train) + len(dropped.test) == 11
    imputed = prepare(
        load_spec(_schema(tmp_path, 'format = "npz"\npath = "data.npz"', "", 'missing = "impute"'))
    )
    assert len(imputed.train) + len(imputed.test) == 12 and not np.isnan(imputed.train.x).any()

    np.savez(tmp_path / "bad.npz", x=x[:4], y=np.array([0, -1, 1, 9]))
    bad = _schema(tmp_path, 'format = "npz"\npath = "bad.npz"', "", "num_classes = 3")
    with pytest.raises(DataError) as caught:
        validate(load_spec(bad))
    lines = _problem_lines(caught)
    assert "row 2, column 'y': label '-1' is not a class id" in lines[0]
    assert "row 4, column 'y': label '9' is not a class id below num_classes = 3" in lines[1]

    np.savez(tmp_path / "text.npz", features=x[:4], y=np.array(["a", "b", "a", "b"]))
    text = _schema(tmp_path, 'format = "npz"\npath = "text.npz"', "")
    with pytest.raises(DataError, match=r"no array named 'x' .*set 'features_key'"):
        validate(load_spec(text))


def test_image_folder_problems(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for k in range(3):
            Image.new("L", (4, 4), color=40 * k).save(root / label / f"{k}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    (root / "readme.txt").write_text("hello")
    (root / ".DS_Store").write_bytes(b"")  # hidden files are skipped
    mapping = '[label_mapping]\n"cat" = 0'
    spec = load_spec(
        _schema(tmp_path, 'format = "image_folder"\npath = "images"\nsize = [2, 2]', mapping)
    )
    registry = DatasetRegistry(tmp_path / "state")
    with pytest.raises(DataError) as caught:
        registry.add("pets", tmp_path / "dataset.toml")
    text = str(caught.value)
    assert "3 problems" in text
    assert "readme.txt: is not inside a class sub-folder" in text
    assert "broken.png: cannot be decoded as an image" in text
    assert "class folder 'dog' is not in [label_mapping]" in text
    assert registry.list() == []
    assert inspect(spec).records.x.shape == (6, 1, 2, 2)


def test_image_folder_without_one_usable_image_lists_its_problems(tmp_path: Path) -> None:
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "notes.txt").write_text("not an image")
    spec = load_spec(
        _schema(tmp_path, 'format = "image_folder"\npath = "images"\nsize = [2, 2]', "")
    )
    with pytest.raises(DataError, match=r"1 problem\n.*notes.txt: is not a PNG or JPEG image"):
        validate(spec)  # a list of problems, not numpy failing on an empty array


def test_unstratified_split_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(_table_text(50))
    spec_path = _schema(
        tmp_path,
        'format = "csv"\npath = "data.csv"\n'
        "[split]\nstratified = false\ntest_fraction = 0.3\nseed = 4",
    )
    first, second = prepare(load_spec(spec_path)), prepare(load_spec(spec_path))
    assert len(first.test) == 15
    np.testing.assert_array_equal(first.test.x, second.test.x)
