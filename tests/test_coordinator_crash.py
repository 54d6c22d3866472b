"""SIGKILL of the coordinator mid-round, restart, `consortia job resume` -> the same final model.

Real processes throughout: `consortia coordinator start` (TLS, node
authentication, persistent SuperLink database), three `consortia node
start` nodes, `consortia job submit`. The same job is run once without
interruption; then again, and the coordinator's whole process tree is
killed while round 2 trains. After a restart the run resumes from its last
complete checkpoint (round 1) and must end with the same model bytes: the
coordinator restores its model, strategy and RNG state, and each node's
noise key makes the re-asked round 2 the identical release.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from consortium import Consortium, cancer_sites, run_id_of, start_consortium
from federation import kill_tree

from consortia.common.audit import verify

pytestmark = pytest.mark.slow

NODES = ("st-mary", "riverside", "northgate")


@pytest.fixture()
def consortium(tmp_path: Path) -> Iterator[Consortium]:
    fed = Consortium(tmp_path)
    node_tomls = cancer_sites(fed, NODES, 50.0, seed=1)
    try:
        start_consortium(fed, node_tomls)
        yield fed
    finally:
        fed.stop()


def _job(path: Path) -> Path:
    """Fixed noise (no calibration against a history that the crash lengthens), FedAdam state."""
    path.write_text(
        'name = "resume"\ndataset = "cancer"\nmin_nodes = 3\nseed = 11\nrounds = 2\n'
        'evaluation = "none"\n\n[model]\nname = "logreg"\n\n'
        "[training]\nbatch_size = 64\nlearning_rate = 1.0\n\n"
        "[privacy]\nnoise_multiplier = 1.0\ndelta = 1e-5\nmax_grad_norm = 1.0\n\n"
        '[strategy]\nname = "fedadam"\neta = 0.05\n'
    )
    return path


def _final_sha(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    return str(metrics["final"]["model_sha256"])


def test_coordinator_sigkill_then_resume_gives_the_same_model(consortium: Consortium) -> None:
    fed = consortium
    job = _job(fed.root / "job.toml")
    whole = fed.submit(job)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    expected = _final_sha(fed.state / "runs" / f"run-{run_id_of(whole)}")

    coordinator = fed.processes[0]
    submitted = fed.consortia("job", "submit", str(job), "--config", str(fed.config))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = run_id_of(submitted)
    run_dir = fed.state / "runs" / f"run-{run_id}"
    deadline = time.monotonic() + 300
    while not _training_round_2(fed, run_id):
        assert time.monotonic() < deadline, "round 2 never started"
        time.sleep(0.2)
    kill_tree(coordinator)  # SuperLink, SuperExec and the run's ServerApp, mid-round

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["round-001.safetensors"]
    fed.start_coordinator()
    resumed = fed.consortia("job", "resume", str(run_id), "--config", str(fed.config), "--wait")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _final_sha(run_dir) == expected
    assert verify(fed.audit_log).ok
    events = [e["event"] for e in fed.audit_events()]
    assert "job.resumed" in events


def _training_round_2(fed: Consortium, run_id: int) -> bool:
    """Round 1 is aggregated and checkpointed, and a node admitted round 2 of this run."""
    aggregated = any(
        e["event"] == "round.aggregated"
        and e["details"].get("run_id") == str(run_id)
        and e["details"].get("round") == 1
        for e in fed.audit_events()
    )
    if not aggregated:
        return False
    logs = [(fed.root / f"{name}.log").read_text(errors="replace") for name in NODES]
    return any(f"run {run_id} round 2: admitted" in log for log in logs)
