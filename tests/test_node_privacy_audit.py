"""`consortia node audit`: a deployed node attacks a global model with its own records.

The node is real (node.toml, a registered CSV, its ledger and audit log);
the command line runs in a subprocess, as an operator would run it. The
records are random features with random labels, so a model can fit its
training records only by memorising them: an unmistakable membership
signal for the attacks to find, and none in an untrained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliRunner, one_cli_error
from federation import add_site, write_job

from consortia.client.onboarding.registry import DatasetRegistry
from consortia.client.training import train_locally
from consortia.common.config_io import load_job
from consortia.common.models import build_model
from consortia.server.outputs.model_files import model_file_bytes

RECORDS = 600


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(node.toml, job.toml) of a node whose dataset 'cancer' holds random labels."""
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    rows = rng.uniform(0, 100, size=(RECORDS, 20))
    labels = rng.integers(0, 2, size=RECORDS)
    names = [f"x{i:02d}" for i in range(20)]
    node_toml = add_site(
        root / "clinic", "clinic", rows, labels, names, superlink_port=9, budget=3.0
    )
    job = write_job(root / "job.toml", 1.0, model="mlp", rounds=10, local_epochs=3)
    job.write_text(job.read_text().replace('name = "mlp"', 'name = "mlp"\nhidden = [256]'))
    return node_toml, job


def _model_file(site: tuple[Path, Path], folder: Path, epochs: int) -> Path:
    """A 'global model' trained without DP for `epochs` on the node's train split (0: untrained)."""
    node_toml, job_toml = site
    job = load_job(job_toml).config
    data = DatasetRegistry(node_toml.parent / "state").load("cancer")
    model = build_model(job.model, data.feature_shape, data.num_classes, seed=1)
    if epochs:
        training = job.training.model_copy(
            update={"local_epochs": epochs, "optimizer": "adam", "learning_rate": 0.01}
        )
        train_locally(model, data.train, training, None, seed=1, device=torch.device("cpu"))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    path = folder / "round-010.safetensors"
    path.write_bytes(model_file_bytes(state))
    return path


def _audit(cli: CliRunner, site: tuple[Path, Path], model: Path) -> tuple[str, dict]:  # type: ignore[type-arg]
    node_toml, job = site
    result = cli(
        "node", "audit", str(model), "--job", str(job), "--node", str(node_toml),
        "--shadows", "4", cwd=node_toml.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    log = node_toml.parent / "state" / "audit.jsonl"
    entry = json.loads(log.read_text().splitlines()[-1])  # where the audit was written
    assert entry["event"] == "privacy.audited"
    return result.stdout, json.loads(Path(entry["details"]["file"]).read_text())


def test_a_memorising_model_is_caught_and_an_untrained_one_is_not(
    site: tuple[Path, Path], consortia_cli: CliRunner, tmp_path: Path
) -> None:
    (tmp_path / "fit").mkdir()
    (tmp_path / "fresh").mkdir()
    out, memorised = _audit(consortia_cli, site, _model_file(site, tmp_path / "fit", 300))
    loss = memorised["audit"]["attacks"][0]
    assert loss["attack"] == "loss threshold" and loss["auc"] > 0.8, memorised
    assert loss["epsilon_lower_bound"] > 0.5
    assert memorised["audit"]["claimed_epsilon"] == 0.0  # nothing accounted in the ledger
    assert memorised["audit"]["round"] == 10 and memorised["dataset"] == "cancer"
    assert "above the claimed 0" in out  # the audit flags a model trained outside the ledger

    _, fresh = _audit(consortia_cli, site, _model_file(site, tmp_path / "fresh", 0))
    for attack in fresh["audit"]["attacks"]:
        assert attack["auc"] < 0.65, fresh
    node_toml = site[0]
    events = [
        json.loads(x) for x in (node_toml.parent / "state" / "audit.jsonl").read_text().splitlines()
    ]
    audited = [e for e in events if e["event"] == "privacy.audited"]
    assert len(audited) == 2 and audited[0]["details"]["dataset"] == "cancer"


def test_a_file_that_is_not_the_jobs_model_is_refused_in_one_line(
    site: tuple[Path, Path], consortia_cli: CliRunner, tmp_path: Path
) -> None:
    node_toml, job = site
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"not a model")
    result = consortia_cli(
        "node", "audit", str(junk), "--job", str(job), "--node", str(node_toml), cwd=tmp_path
    )
    assert result.returncode == 2 and "not a safetensors model file" in one_cli_error(result)
    other = tmp_path / "logreg.toml"
    other.write_text(job.read_text().replace('name = "mlp"', 'name = "logreg"'))
    (tmp_path / "fit").mkdir()
    model = _model_file(site, tmp_path / "fit", 1)
    result = consortia_cli(
        "node", "audit", str(model), "--job", str(other), "--node", str(node_toml), cwd=tmp_path
    )
    assert result.returncode == 2 and "does not fit the job's model" in one_cli_error(result)
    result = consortia_cli(
        "node", "audit", str(tmp_path), "--job", str(job), "--node", str(node_toml), cwd=tmp_path
    )  # a folder, not a file
    assert result.returncode == 2 and "cannot be read" in one_cli_error(result)
    elsewhere = tmp_path / "other-dataset.toml"
    elsewhere.write_text(job.read_text().replace('dataset = "cancer"', 'dataset = "cardio"'))
    result = consortia_cli(
        "node", "audit", str(model), "--job", str(elsewhere), "--node", str(node_toml), cwd=tmp_path
    )
    assert result.returncode == 2 and "dataset-not-served" in one_cli_error(result)
