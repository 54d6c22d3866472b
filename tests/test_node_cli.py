"""`consortia node data add` on bad input, through the real command line.

A node operator who gets the data or the config wrong must see exit code 2
and one message that names the file (and the row and column, where there is
one) and says how to fix it; never a Python traceback, and nothing left
registered. The bad datasets are the ones `test_onboarding` checks at the
registry level, here seen from the terminal.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import CliRunner, one_cli_error
from test_onboarding import BAD_DATASETS, _csv_dataset, _rows

DATASET = "cardio"

# How the message says to fix each bad dataset of `BAD_DATASETS`.
FIX_HINTS = {
    "wrong column count": "fix the row",
    "string in a numeric column": "add it to 'missing_values' in [source]",
    "label outside the mapping": "correct it or map it to a class id",
    "out-of-range value": "widen 'min'/'max' of column 'age'",
    "unknown category": "add it to 'categories' of column 'cp'",
}


def _write_node_toml(folder: Path, body: str = "") -> Path:
    path = folder / "node.toml"
    path.write_text(f'name = "st-mary"\nstate_dir = "state"\nserve = ["{DATASET}"]\n{body}')
    return path


def _add(
    cli: CliRunner, folder: Path, spec: Path, node_toml: Path
) -> subprocess.CompletedProcess[str]:
    return cli(
        "node", "data", "add", DATASET, "--config", str(spec), "--node", str(node_toml), cwd=folder
    )


def _assert_nothing_registered(cli: CliRunner, folder: Path, node_toml: Path) -> None:
    listed = cli("node", "data", "list", "--node", str(node_toml), cwd=folder)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "dataset" in listed.stdout and DATASET not in listed.stdout  # an empty table
    state = folder / "state"
    assert not state.exists() or not any(state.rglob("*")), sorted(state.rglob("*"))


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_rows_give_one_precise_message(
    tmp_path: Path, consortia_cli: CliRunner, case: str
) -> None:
    edit, fragments = BAD_DATASETS[case]
    spec = _csv_dataset(tmp_path, rows=edit(_rows()))
    node_toml = _write_node_toml(tmp_path)
    message = one_cli_error(_add(consortia_cli, tmp_path, spec, node_toml), nothing_on_stdout=True)
    assert f"dataset '{DATASET}' was not registered" in message
    assert str(tmp_path / "data.csv") in message  # the file, by its full path
    for fragment in fragments:  # row, column, what is wrong
        assert fragment in message
    assert FIX_HINTS[case] in message
    _assert_nothing_registered(consortia_cli, tmp_path, node_toml)


def test_empty_file(tmp_path: Path, consortia_cli: CliRunner) -> None:
    spec = _csv_dataset(tmp_path)
    (tmp_path / "data.csv").write_bytes(b"")
    node_toml = _write_node_toml(tmp_path)
    message = one_cli_error(_add(consortia_cli, tmp_path, spec, node_toml), nothing_on_stdout=True)
    assert f"{tmp_path / 'data.csv'}: the file is empty" in message
    assert "export the data again or fix 'source.path'" in message
    _assert_nothing_registered(consortia_cli, tmp_path, node_toml)


def test_missing_data_file(tmp_path: Path, consortia_cli: CliRunner) -> None:
    spec = _csv_dataset(tmp_path)
    (tmp_path / "data.csv").unlink()
    node_toml = _write_node_toml(tmp_path)
    message = one_cli_error(_add(consortia_cli, tmp_path, spec, node_toml), nothing_on_stdout=True)
    assert f"{tmp_path / 'data.csv'}: no such file; fix 'source.path'" in message
    _assert_nothing_registered(consortia_cli, tmp_path, node_toml)


def test_missing_schema_file(tmp_path: Path, consortia_cli: CliRunner) -> None:
    node_toml = _write_node_toml(tmp_path)
    message = one_cli_error(
        _add(consortia_cli, tmp_path, tmp_path / "dataset.toml", node_toml), nothing_on_stdout=True
    )
    assert f"{tmp_path / 'dataset.toml'}: no such file" in message
    _assert_nothing_registered(consortia_cli, tmp_path, node_toml)


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        pytest.param(
            'serv = ["cardio"]\n',
            ["serv: unknown key", "allowed here:", "serve", "state_dir"],
            id="unknown key",
        ),
        pytest.param(
            "[policy]\nepsilon_budgt = 2.0\n",
            ["policy.epsilon_budgt: unknown key", "allowed here:", "epsilon_budget"],
            id="unknown policy key",
        ),
        pytest.param(
            'runtime_port = "auto"\n',
            ["runtime_port: Input should be a valid integer"],
            id="wrong type",
        ),
        pytest.param(
            '[policy]\nepsilon_budget = "lots"\n',
            ["policy.epsilon_budget: Input should be a valid number"],
            id="wrong policy type",
        ),
    ],
)
def test_malformed_node_toml_names_the_file_and_key(
    tmp_path: Path, consortia_cli: CliRunner, body: str, fragments: list[str]
) -> None:
    spec = _csv_dataset(tmp_path)
    node_toml = _write_node_toml(tmp_path, body)
    message = one_cli_error(_add(consortia_cli, tmp_path, spec, node_toml), nothing_on_stdout=True)
    assert f"{node_toml}: " in message
    for fragment in fragments:
        assert fragment in message
    assert not (tmp_path / "state").exists()


def test_state_dir_that_is_a_file_is_one_clear_error(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    (tmp_path / "state").write_text("not a folder")
    node_toml = _write_node_toml(tmp_path)
    listed = consortia_cli("node", "data", "list", "--node", str(node_toml), cwd=tmp_path)
    assert listed.returncode == 2 and "is a file" in listed.stderr
    assert "Traceback" not in listed.stderr


def test_insecure_with_root_certificates_is_refused_before_connecting(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    """Flower would take `insecure` and open plain HTTP, whatever CA node.toml names.

    Every command that reads node.toml refuses it; `data list` stands in for
    `start` here, since the refusal is the same and a `start` that were let
    through would keep retrying an unreachable coordinator.
    """
    (tmp_path / "ca.crt").write_text("a CA certificate\n")
    node_toml = _write_node_toml(
        tmp_path,
        '[superlink]\naddress = "127.0.0.1:9"\ninsecure = true\nroot_certificates = "ca.crt"\n',
    )
    listed = consortia_cli("node", "data", "list", "--node", str(node_toml), cwd=tmp_path)
    message = one_cli_error(listed, nothing_on_stdout=True)
    assert f"{node_toml}: superlink: " in message
    assert "insecure = true cannot be combined with root_certificates" in message
