"""Category columns: numbers matched by value across sites, text by text, and drop_first."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from consortia.client.onboarding import (
    DatasetRegistry,
    fingerprint,
    load_spec,
    prepare,
    quality_report,
)
from consortia.common.errors import ConfigError, DataError

COLUMNS = """
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
name = "stage"
type = "category"
categories = ["1", "2", "3"]
{stage_extra}

[[columns]]
name = "outcome"
type = "category"
categories = ["0", "1"]
label = true
"""


def _table(n: int = 48, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    stage = rng.integers(1, 4, n)
    return pd.DataFrame(
        {
            "age": rng.uniform(30, 80, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "stage": stage,
            "outcome": (stage + rng.integers(0, 2, n) > 2).astype(int),
        }
    )


def _site(folder: Path, cells: dict[str, list[str]], stage_extra: str = "") -> Path:
    """One site's CSV (cells written as given) and its dataset.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join(cells)]
    lines += [",".join(row) for row in zip(*cells.values(), strict=True)]
    (folder / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    schema = folder / "dataset.toml"
    schema.write_text(
        '[source]\nformat = "csv"\npath = "data.csv"\n' + COLUMNS.format(stage_extra=stage_extra),
        encoding="utf-8",
    )
    return schema


def _cells(table: pd.DataFrame, stage: list[str], outcome: list[str]) -> dict[str, list[str]]:
    return {
        "age": [f"{v:.1f}" for v in table["age"]],
        "sex": list(table["sex"]),
        "stage": stage,
        "outcome": outcome,
    }


def test_sites_writing_1_and_1_0_onboard_to_one_encoding(tmp_path: Path) -> None:
    """Site A writes the categories as 1, 2, 3; site B as 1.0, 02, ' 3 ' and friends.

    Both register, with the same one-hot columns and the same values record
    by record; site B's quality report says what was matched by number.
    """
    table = _table()
    plain = [str(v) for v in table["stage"]]
    spelled = {1: "1.0", 2: "02", 3: " 3.00 "}  # ' 3.00 ': spaces are trimmed, as always
    respelled = [spelled[v] if k % 3 else str(v) for k, v in enumerate(table["stage"])]
    outcome = [str(v) for v in table["outcome"]]
    outcome_b = [f"{v}.0" if k % 2 else str(v) for k, v in enumerate(table["outcome"])]
    site_a = _site(tmp_path / "a", _cells(table, plain, outcome))
    site_b = _site(tmp_path / "b", _cells(table, respelled, outcome_b))

    registry = DatasetRegistry(tmp_path / "state-b")
    registration = registry.add("cohort", site_b)  # rejected every '1.0' before
    a, b = prepare(load_spec(site_a)), prepare(load_spec(site_b))
    assert a.feature_names == b.feature_names == registration.feature_names
    assert a.feature_names == ("age", "sex=F", "sex=M", "stage=1", "stage=2", "stage=3")
    for left, right in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(left.x, right.x)
        np.testing.assert_array_equal(left.y, right.y)
    # The same content, however written: as with numbers, `1.0` fingerprints as `1`.
    assert fingerprint(load_spec(site_a)) == fingerprint(load_spec(site_b))
    stage = b.train.x[:, 3:]
    assert set(stage.sum(axis=1)) == {1.0}  # every record in exactly one stage column

    report = registry.quality("cohort")
    assert report.normalised_per_column == {
        "stage": sum(v != p for v, p in zip(respelled, plain, strict=True)),
        "outcome": sum(v != p for v, p in zip(outcome_b, outcome, strict=True)),
    }
    assert report.invalid_per_column["stage"] == 0
    assert quality_report(load_spec(site_a)).normalised_per_column == {}
    console = Console(record=True, width=200)
    report.render(console)
    count = report.normalised_per_column["stage"]
    assert f"column 'stage': {count} values written otherwise" in console.export_text()


def test_text_categories_still_match_by_text(tmp_path: Path) -> None:
    """category_kind = "text", or categories that are not all distinct numbers: '1.0' is not
    '1', and the error keeps saying how to fix it."""
    table = _table()
    respelled = ["1.0" if v == 1 else str(v) for v in table["stage"]]
    outcome = [str(v) for v in table["outcome"]]
    site = _site(tmp_path / "text", _cells(table, respelled, outcome), 'category_kind = "text"')
    with pytest.raises(DataError, match=r"value '1.0' is not one of the allowed categories"):
        prepare(load_spec(site))
    spec = load_spec(site)
    assert [c.numeric_categories for c in spec.columns] == [False, False, False, True]

    padded = _site(
        tmp_path / "padded",
        _cells(table, ["01" if v == 1 else str(v) for v in table["stage"]], outcome),
    )
    text = padded.read_text().replace('categories = ["1", "2", "3"]', 'categories = ["1", "01"]')
    padded.write_text(text)
    spec = load_spec(padded)  # "1" and "01" are one number: the column stays text
    assert not spec.columns[2].numeric_categories
    with pytest.raises(DataError, match=r"value '2' is not one of the allowed categories"):
        prepare(spec)


# Computed with the code before numeric category matching (commit 33f67ce): a dataset whose
# category cells are written exactly as declared keeps its fingerprint and its encoding.
GOLDEN_FINGERPRINT = "e0920f4b199bcfe8c8d8156312692b24195f325aef8858f1ec8c2e3b9a9f116f"
GOLDEN_PREPARED = "fabc54f240284111a159a61a748fa2e902f2e5d7a34b683ca230fc94b2842e07"


def _golden_dataset(folder: Path) -> Path:
    table = _table(n=40, seed=7)
    stage = [str(v) for v in table["stage"]]
    stage[5] = ""  # a missing value, imputed with the train split's most frequent category
    cells = _cells(table, stage, [str(v) for v in table["outcome"]])
    schema = _site(folder, cells)
    schema.write_text('missing = "impute"\n' + schema.read_text(encoding="utf-8"))
    return schema


def test_exactly_written_categories_keep_fingerprint_and_encoding(tmp_path: Path) -> None:
    spec = load_spec(_golden_dataset(tmp_path))
    assert fingerprint(spec) == GOLDEN_FINGERPRINT
    prepared = prepare(spec)
    digest = hashlib.sha256()
    for array in (prepared.train.x, prepared.train.y, prepared.test.x, prepared.test.y):
        digest.update(np.ascontiguousarray(array).tobytes())
    assert digest.hexdigest() == GOLDEN_PREPARED
    assert prepared.feature_names == ("age", "sex=F", "sex=M", "stage=1", "stage=2", "stage=3")


def test_drop_first_leaves_out_the_reference_category(tmp_path: Path) -> None:
    table = _table()
    stage = [str(v) for v in table["stage"]]
    outcome = [str(v) for v in table["outcome"]]
    full = prepare(load_spec(_site(tmp_path / "full", _cells(table, stage, outcome))))
    schema = _site(tmp_path / "coded", _cells(table, stage, outcome), "drop_first = true")
    spec = load_spec(schema)
    coded = prepare(spec)
    assert coded.feature_names == ("age", "sex=F", "sex=M", "stage=2", "stage=3")
    np.testing.assert_array_equal(coded.train.x, np.delete(full.train.x, 3, axis=1))
    reference = full.train.x[:, 3] == 1  # stage 1: the all-zero row of the stage columns
    assert reference.any() and not coded.train.x[reference, 3:].any()
    assert coded.train.x[~reference, 3:].sum(axis=1).tolist() == [1.0] * int((~reference).sum())
    assert set(spec.feature_ranges()) == set(coded.feature_names)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ('category_kind = "number"\ncategories = ["low", "high"]', "needs every category"),
        ('category_kind = "number"\ncategories = ["1", "1.0"]', "no two equal"),
        ('category_kind = "word"\ncategories = ["1", "2"]', "category_kind"),
        ('type = "float"\ncategory_kind = "text"', "'category_kind' says how values match"),
        ('type = "float"\ndrop_first = true', "'drop_first' applies to category feature"),
        ('categories = ["1"]\ndrop_first = true', "would leave no column"),
    ],
)
def test_category_settings_are_checked(tmp_path: Path, extra: str, match: str) -> None:
    lines = extra.splitlines()
    column = '[[columns]]\nname = "x"\n'
    if not any(line.startswith("type") for line in lines):
        column += 'type = "category"\n'
    column += "\n".join(lines)
    schema = tmp_path / "dataset.toml"
    schema.write_text(
        f'[source]\nformat = "csv"\npath = "d.csv"\n\n{column}\n\n'
        '[[columns]]\nname = "y"\ntype = "int"\nlabel = true\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=match):
        load_spec(schema)


def test_drop_first_on_the_label_is_refused(tmp_path: Path) -> None:
    table = _table()
    schema = _site(tmp_path, _cells(table, ["1"] * len(table), ["0"] * len(table)))
    text = schema.read_text().replace("label = true", "label = true\ndrop_first = true")
    schema.write_text(text)
    with pytest.raises(ConfigError, match="'drop_first' applies to category feature"):
        load_spec(schema)
