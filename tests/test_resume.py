"""A simulation SIGKILLed in the middle of a round, then resumed, ends as if never interrupted.

Real processes, no mocks: `consortia simulate` (Flower's simulation engine
on Ray, Opacus on every virtual node) of a 3-round FedAdam scenario, so the
server optimiser's moments must survive the kill as well as the model.

1. The scenario runs to its end: the reference.
2. It runs again in a fresh folder; the moment metrics.json lists round 2
   (written after round 2's checkpoint and model file, right before round
   3's messages go out) the whole process tree — the CLI, Ray's raylet, GCS
   and workers — is SIGKILLed: round 3 is in progress, nothing is flushed.
3. `consortia simulate --resume DIR` continues after round 2.

The interrupted run starts a Ray of its own (the kill takes it down with the
CLI); the reference and the resumed run join the test worker's shared Ray
(tests/conftest.py): where the virtual nodes run is not part of the results.

The resumed run must write the same model bytes for every round, the same
final model sha256, and the same metrics (timings aside) — including every
node's ε, which needs the virtual nodes' privacy history back. Rounds 1-2
of the two runs also show that the simulation is deterministic run to run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT, CliRunner
from federation import descendants, kill_tree
from safetensors.torch import load_file

from consortia.common.config_io import load_scenario
from consortia.common.models import build_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds processes in /proc"),
]

ROUNDS = 3


def _scenario(folder: Path) -> Path:
    """The default scenario, shortened to 3 rounds, with FedAdam (server state that matters)."""
    text = (REPO_ROOT / "simulations" / "hospitals-breast-cancer.toml").read_text()
    text = text.replace("rounds = 10", f"rounds = {ROUNDS}").replace(
        'name = "fedavg"', 'name = "fedadam"'
    )
    text = text.replace('name = "hospitals-breast-cancer"', 'name = "resume-fedadam"')
    path = folder / "resume-fedadam.toml"
    path.write_text(text)
    assert 'name = "fedadam"' in text and f"rounds = {ROUNDS}" in text
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rounds_listed(metrics: Path) -> list[int]:
    try:
        return [r["round"] for r in json.loads(metrics.read_text())["rounds"]]
    except (OSError, ValueError, KeyError):
        return []


def _without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    rounds = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics["rounds"]]
    return {"rounds": rounds, "final": metrics["final"]}


def _kill_after_round_two(work: Path, scenario: Path, run: Path) -> None:
    """Start the simulation, SIGKILL its whole tree once round 2 is on record."""
    log = (work / "interrupted.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "consortia.cli.main", "simulate", str(scenario), "--out", str(run)],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "120"},
    )
    try:
        deadline = time.monotonic() + 500
        while 2 not in _rounds_listed(run / "metrics.json"):
            if process.poll() is not None or time.monotonic() > deadline:
                output = (work / "interrupted.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"round 2 never finished (rc {process.returncode}):\n{output}")
            time.sleep(0.01)
        tree = {process.pid, *descendants([process.pid])}
        assert len(tree) > 3, "expected the CLI and Ray's processes"
    finally:
        kill_tree(process)
        log.close()
    assert not descendants([process.pid])


def test_sigkill_mid_round_then_resume_ends_on_the_same_model(
    tmp_path: Path, consortia_cli: CliRunner, shared_ray: str
) -> None:
    scenario = _scenario(tmp_path)
    reference = tmp_path / "reference"
    on_shared_ray = ("--ray-address", shared_ray)
    done = consortia_cli(
        "simulate", str(scenario), "--out", str(reference), *on_shared_ray, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "interrupted"
    _kill_after_round_two(tmp_path, scenario, run)
    # Killed inside round 3: rounds 1-2 complete on disk, nothing of round 3, no final.
    assert sorted(p.name for p in (run / "checkpoints").glob("*.safetensors")) == [
        "round-001.safetensors",
        "round-002.safetensors",
    ]
    assert json.loads((run / "metrics.json").read_text())["final"] is None

    resumed = consortia_cli("simulate", "--resume", str(run), *on_shared_ray, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"after round 2 of {ROUNDS}" in resumed.stdout

    for server_round in range(1, ROUNDS + 1):
        name = f"model/round-{server_round:03d}.safetensors"
        assert _sha256(run / name) == _sha256(reference / name), name
    expected = json.loads((reference / "metrics.json").read_text())
    got = json.loads((run / "metrics.json").read_text())
    assert got["final"]["model_sha256"] == expected["final"]["model_sha256"]
    assert got["final"]["model_sha256"] == _sha256(run / f"model/round-{ROUNDS:03d}.safetensors")
    assert _without_timings(got) == _without_timings(expected)
    assert 0 < got["final"]["epsilon_max"] <= 1.0
    # The run's manifest is the one it started with (created_utc included).
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["strategy"]["name"] == "fedadam"

    again = consortia_cli("simulate", "--resume", str(run), cwd=tmp_path)
    assert again.returncode == 2 and "already finished" in again.stderr

    exported = consortia_cli(
        "models", "export", str(run), "--out", str(tmp_path / "final.pt"), cwd=tmp_path
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    config = load_scenario(scenario).config
    model = build_model(config.model, (30,), 2, config.seed)
    model.load_state_dict(torch.load(tmp_path / "final.pt"))
    final = load_file(run / f"model/round-{ROUNDS:03d}.safetensors")
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
