"""Shipped scenarios, the per-node 'files' source and `consortia simulate --data`.

Everything here runs without Ray except one small real MNIST run; the CLI
error tests stop before the simulation engine starts (about a second each).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import CliRunner, one_cli_error

from consortia.common.config import ScenarioConfig
from consortia.common.config_io import LoadedScenario, bundled_scenarios, load_scenario
from consortia.common.errors import ConfigError, DataError
from consortia.common.models import build_model
from consortia.server.outputs.manifest import Manifest, build_manifest, config_sha256
from consortia.server.outputs.resume import config_of
from consortia.server.outputs.run_outputs import RunOutputs
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.simulations.lab import LAB
from consortia.simulations.node_data import (
    centralized_test_data,
    scenario_with_data,
    simulated_node_data,
    source_of,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIO_FILES = sorted((REPO_ROOT / "simulations").glob("*.toml"))
NEW_SCENARIOS = ("mnist-10-nodes-dirichlet", "digits-100-nodes", "mnist-1000-nodes")


# ------------------------------------------------------------ shipped scenarios


def test_every_shipped_scenario_file_validates() -> None:
    names = {path.stem for path in SCENARIO_FILES}
    assert names >= {"hospitals-breast-cancer", "clinics-digits", *NEW_SCENARIOS}
    assert set(bundled_scenarios()) == names  # every file ships in the package
    for path in SCENARIO_FILES:
        assert isinstance(load_scenario(path).config, ScenarioConfig), path
        assert load_scenario(path.stem).config == load_scenario(path).config


def test_new_scenarios_say_what_they_promise() -> None:
    mnist10 = load_scenario("mnist-10-nodes-dirichlet").config
    assert (mnist10.simulation.nodes, mnist10.simulation.data.source) == (10, "idx")
    assert mnist10.simulation.partition.method == "dirichlet"
    assert mnist10.simulation.partition.alpha == 0.5
    digits = load_scenario("digits-100-nodes").config
    assert (digits.simulation.nodes, digits.simulation.data.source) == (100, "digits")
    assert digits.clients_per_round is not None and digits.clients_per_round < 100
    mnist1000 = load_scenario("mnist-1000-nodes").config
    assert mnist1000.simulation.nodes == 1000
    assert mnist1000.clients_per_round == 1000  # the scale scenario: every device, every round
    for config in (mnist10, digits, mnist1000):
        assert config.privacy.enabled and config.privacy.target_epsilon is not None
    # The MNIST location is not shipped: it comes from --data.
    assert mnist10.simulation.data.path is None and mnist1000.simulation.data.path is None


def test_digits_100_nodes_hold_two_classes_each() -> None:
    loaded = scenario_with_data(load_scenario("digits-100-nodes"))
    sim, seed = loaded.config.simulation, loaded.config.seed
    nodes = [simulated_node_data(sim, seed, i) for i in range(sim.nodes)]
    for node in nodes:
        assert len(np.unique(np.concatenate([node.train.y, node.test.y]))) == 2
    assert sum(len(n.train) + len(n.test) for n in nodes) == 1797


def test_mnist_scenarios_with_data(mnist_dir: Path) -> None:
    for name in ("mnist-10-nodes-dirichlet", "mnist-1000-nodes"):
        loaded = scenario_with_data(load_scenario(name), mnist_dir)
        config = loaded.config
        assert config.simulation.data.path == str(mnist_dir)
        source = source_of(config.simulation)
        build_model(config.model, source.feature_shape, source.num_classes, config.seed)
    sim, seed = config.simulation, config.seed  # mnist-1000-nodes: 60 records each
    nodes = [simulated_node_data(sim, seed, i) for i in range(sim.nodes)]
    assert {len(n.train) + len(n.test) for n in nodes} == {60}
    assert len(centralized_test_data(sim, seed)) == 10_000  # MNIST's t10k


def test_mnist_scenario_without_data_fails_at_run_time() -> None:
    loaded = load_scenario("mnist-10-nodes-dirichlet")  # validates without a path
    with pytest.raises(DataError, match=r"has no data path: pass `consortia simulate .* --data"):
        scenario_with_data(loaded)
    with pytest.raises(DataError, match="has no data path"):
        source_of(loaded.config.simulation)


# ------------------------------------------------------------ --data, paths


def test_data_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mnist").mkdir()
    monkeypatch.chdir(tmp_path)
    loaded = scenario_with_data(load_scenario("mnist-10-nodes-dirichlet"), Path("mnist"))
    assert loaded.config.simulation.data.path == str(tmp_path / "mnist")
    # Nothing else of the job changes.
    assert loaded.config.job() == load_scenario("mnist-10-nodes-dirichlet").config.job()


def test_paths_in_a_scenario_file_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in ("lab", "mnist", "other"):
        (tmp_path / folder).mkdir()
    path = tmp_path / "lab" / "s.toml"
    path.write_text('[simulation.data]\nsource = "idx"\npath = "../mnist"\n')
    monkeypatch.chdir(tmp_path / "lab")
    loaded = scenario_with_data(load_scenario(path.name))
    assert loaded.config.simulation.data.path == str(tmp_path / "mnist")
    # --data wins over the file's path.
    other = scenario_with_data(load_scenario(path.name), tmp_path / "other")
    assert other.config.simulation.data.path == str(tmp_path / "other")


def test_data_option_with_a_bundled_source_is_an_error() -> None:
    with pytest.raises(ConfigError, match="bundled 'breast_cancer' data: drop --data"):
        scenario_with_data(load_scenario(None), Path("/data"))


def test_path_with_a_bundled_source_is_rejected_by_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[simulation.data]\nsource = "digits"\npath = "x"\n')
    with pytest.raises(ConfigError, match="takes no 'path'"):
        load_scenario(path)


# ------------------------------------------------------------ 'files' source

SCHEMA = """
[split]
test_fraction = 0.25
seed = 3

[[columns]]
name = "age"
type = "float"
min = 0
max = 120

[[columns]]
name = "smoker"
type = "category"
categories = ["no", "yes"]

[[columns]]
name = "outcome"
type = "int"
min = 0
max = 1
label = true
"""


def _clinic_table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n).round(1)
    return pd.DataFrame(
        {
            "age": age,
            "smoker": rng.choice(["no", "yes"], n),
            "outcome": (age > 55).astype(int),
        }
    )


def _files_scenario(folder: Path, nodes: int = 3, data_block: str = "", extra: str = "") -> Path:
    """A consortium of `nodes` clinics, the first ones as CSV, the last as Parquet."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    names = []
    for i, rows in enumerate([40, 64, 52, 30][:nodes]):
        table = _clinic_table(rows, seed=i)
        if i == nodes - 1:
            name = f"clinic-{i}.parquet"
            table.to_parquet(folder / "data" / name)
        else:
            name = f"clinic-{i}.csv"
            table.to_csv(folder / "data" / name, index=False)
        names.append(name)
    (folder / "schema.toml").write_text(SCHEMA)
    files = ", ".join(f'"{n}"' for n in names)
    path = folder / "scenario.toml"
    path.write_text(
        f'[model]\nname = "logreg"\n\n[simulation]\nnodes = {nodes}\n{extra}\n'
        f'[simulation.data]\nsource = "files"\npath = "data"\nschema_file = "schema.toml"\n'
        f"files = [{files}]\n{data_block}"
    )
    return path


def test_files_source_gives_each_node_its_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _files_scenario(tmp_path / "consortium")
    monkeypatch.chdir(tmp_path)  # paths resolve from the scenario's folder, not from here
    loaded = scenario_with_data(load_scenario(path))
    data = loaded.config.simulation.data
    assert data.path == str(tmp_path / "consortium" / "data")
    assert data.schema_file == str(tmp_path / "consortium" / "schema.toml")
    monkeypatch.chdir(tmp_path / "consortium" / "data")  # e.g. a Ray actor elsewhere
    sim = loaded.config.simulation
    for i, rows in enumerate([40, 64, 52]):
        node = simulated_node_data(sim, 0, i)
        assert len(node.train) + len(node.test) == rows
        assert len(node.test) == round(rows * 0.25)  # the schema's [split]
        assert node.feature_shape == (3,)  # age + one-hot smoker
        assert node.num_classes == 2
    table = _clinic_table(64, seed=1)
    node = simulated_node_data(sim, 0, 1)
    assert sorted(np.concatenate([node.train.x[:, 0], node.test.x[:, 0]])) == pytest.approx(
        sorted(table["age"])
    )
    assert len(centralized_test_data(sim, 0)) == sum(round(r * 0.25) for r in (40, 64, 52))


def test_files_source_reads_from_the_data_option(tmp_path: Path) -> None:
    path = _files_scenario(tmp_path / "a")
    moved = tmp_path / "moved"
    (tmp_path / "a" / "data").rename(moved)
    loaded = scenario_with_data(load_scenario(path), moved)
    assert len(simulated_node_data(loaded.config.simulation, 0, 2).train) > 0


@pytest.mark.parametrize(
    ("extra", "data_block", "error", "match"),
    [
        ("", "", None, None),
        (
            "",
            "test_fraction = 0.3\n",
            ConfigError,
            "splits each node's file with the schema's \\[split\\]",
        ),
        ("", "max_records = 10\n", ConfigError, "uses each node's whole file"),
        (
            '[simulation.partition]\nmethod = "iid"\n',
            "",
            DataError,
            "already partitioned .* remove \\[simulation.partition\\]",
        ),
    ],
)
def test_files_source_settings(
    tmp_path: Path, extra: str, data_block: str, error: type[Exception] | None, match: str | None
) -> None:
    path = _files_scenario(tmp_path, extra=extra, data_block=data_block)
    if error is None:
        scenario_with_data(load_scenario(path))
        return
    with pytest.raises(error, match=match):
        scenario_with_data(load_scenario(path))


def _manifest_json(loaded: LoadedScenario, folder: Path) -> dict[str, Any]:
    """manifest.json as a run of `loaded` writes it (one stand-in node per simulated node)."""
    sim = loaded.config.simulation
    roster = Roster(
        nodes=tuple(
            NodeEntry(
                node_id=i + 1,
                name=sim.node_name(i),
                data_fingerprint="0" * 64,
                feature_shape=(3,),
                num_classes=2,
            )
            for i in range(sim.nodes)
        )
    )
    manifest = build_manifest(
        folder.name,
        loaded.config,
        loaded.source,
        loaded.source_sha256,
        roster,
        "arch",
        feature_scaling=LAB.feature_scaling(loaded.config),  # as the lab hands it in
    )
    RunOutputs(folder).write_manifest(manifest)
    written: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return written


def test_files_manifest_records_only_the_settings_the_run_used(tmp_path: Path) -> None:
    """A 'files' run is partitioned by its files and split by the schema's [split]: its
    manifest leaves out the default partition and test_fraction it never applied."""
    loaded = scenario_with_data(load_scenario(_files_scenario(tmp_path / "consortium")))
    written = _manifest_json(loaded, tmp_path / "run-files")
    simulation = written["config"]["simulation"]
    assert "partition" not in simulation
    assert "test_fraction" not in simulation["data"] and "max_records" not in simulation["data"]
    assert simulation["data"]["source"] == "files" and len(simulation["data"]["files"]) == 3
    # Nothing a resume reads is lost: the manifest's config is the run's config again.
    again = config_of(Manifest.model_validate(written), tmp_path / "run-files").config
    assert again == loaded.config
    assert written["config_sha256"] == config_sha256(loaded.config)
    assert written["feature_scaling"]["kind"] == "none"  # the schema: no standardize

    other = load_scenario("hospitals-breast-cancer")
    kept = _manifest_json(other, tmp_path / "run-bundled")["config"]["simulation"]
    assert kept["partition"]["method"] == other.config.simulation.partition.method
    assert kept["data"]["test_fraction"] == other.config.simulation.data.test_fraction


def test_files_source_count_must_match_nodes(tmp_path: Path) -> None:
    path = _files_scenario(tmp_path)
    path.write_text(path.read_text().replace("nodes = 3", "nodes = 4"))
    with pytest.raises(DataError, match=r"lists 3 files but simulation.nodes is 4"):
        scenario_with_data(load_scenario(path))


def test_files_source_errors_name_the_file(tmp_path: Path) -> None:
    path = _files_scenario(tmp_path)
    loaded = scenario_with_data(load_scenario(path))
    (tmp_path / "data" / "clinic-1.csv").write_text("age,smoker,outcome\n30,maybe,0\n")
    with pytest.raises(DataError, match=r"clinic-1.csv.*maybe"):
        source_of(loaded.config.simulation)
    (tmp_path / "data" / "clinic-1.csv").unlink()
    with pytest.raises(DataError, match=r"clinic-1.csv: no such file \(listed in simulation.data"):
        source_of(loaded.config.simulation)


def test_files_source_schema_must_describe_a_table(tmp_path: Path) -> None:
    path = _files_scenario(tmp_path)
    (tmp_path / "schema.toml").write_text('[source]\nformat = "npz"\n' + SCHEMA)
    with pytest.raises(ConfigError, match="reads one CSV or Parquet file per node"):
        source_of(scenario_with_data(load_scenario(path)).config.simulation)
    (tmp_path / "schema.toml").unlink()
    with pytest.raises(DataError, match=r"no such file \(simulation.data.schema_file"):
        source_of(scenario_with_data(load_scenario(path)).config.simulation)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ('source = "files"\nschema_file = "s.toml"\n', "needs 'files'"),
        ('source = "files"\nfiles = ["a.csv"]\n', "needs 'schema_file'"),
        ('source = "files"\nfiles = ["a.csv", "a.csv"]\nschema_file = "s.toml"\n', "twice"),
        ('source = "idx"\nfiles = ["a.csv"]\n', "takes no 'files'"),
    ],
)
def test_files_keys_are_checked_on_load(tmp_path: Path, block: str, match: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(f"[simulation.data]\n{block}")
    with pytest.raises(ConfigError, match=match):
        load_scenario(path)


# ------------------------------------------------------------ the command line


def test_cli_data_errors_are_one_message(tmp_path: Path, consortia_cli: CliRunner) -> None:
    mnist10 = str(REPO_ROOT / "simulations" / "mnist-10-nodes-dirichlet.toml")
    message = one_cli_error(consortia_cli("simulate", mnist10, cwd=tmp_path))
    assert "source = 'idx' has no data path: pass `consortia simulate SCENARIO --data" in message
    message = one_cli_error(consortia_cli("simulate", "--data", str(tmp_path), cwd=tmp_path))
    assert "bundled 'breast_cancer' data: drop --data" in message
    message = one_cli_error(
        consortia_cli("simulate", mnist10, "--data", str(tmp_path / "nope"), cwd=tmp_path)
    )
    assert f"{tmp_path / 'nope'}: no such folder" in message
    bad = _files_scenario(tmp_path / "files")
    bad.write_text(bad.read_text().replace("nodes = 3", "nodes = 2"))
    message = one_cli_error(consortia_cli("simulate", str(bad), cwd=tmp_path))
    assert "lists 3 files but simulation.nodes is 2" in message
    assert not (tmp_path / "runs").exists()
    help_text = consortia_cli("simulate", "--help", cwd=tmp_path).stdout
    assert "--data" in help_text


@pytest.mark.slow
@pytest.mark.ray
def test_mnist_scenario_runs_with_data_option(
    tmp_path: Path, mnist_dir: Path, consortia_cli: CliRunner
) -> None:
    """The shipped MNIST scenario, cut to 1 round on 2,000 records, through the real CLI.

    `--data` is given relative to the working directory: the Ray actors must
    get it as an absolute path.
    """
    text = (REPO_ROOT / "simulations" / "mnist-10-nodes-dirichlet.toml").read_text()
    text = text.replace("test_fraction = 0.1", "test_fraction = 0.1\nmax_records = 2000")
    text = text.replace("min_records = 500", "min_records = 20")
    scenario = tmp_path / "mnist-small.toml"
    scenario.write_text(text)
    data = os.path.relpath(mnist_dir, tmp_path)
    result = consortia_cli(
        "simulate", scenario.name, "--data", data, "--rounds", "1", "--out", "run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1]
    assert len(metrics["rounds"][0]["epsilon"]) == 10
    assert metrics["final"]["accuracy"] > 0.15  # above chance after one round
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["simulation"]["data"]["path"] == str(mnist_dir)
