"""Deployment, for real: `consortia coordinator start` and three `consortia node start`
SuperNodes on 127.0.0.1, with TLS (a CA from `consortia provision`) and node
authentication (keys made on the nodes, enrolled by public key), each node
with its own registered CSV dataset, SQLite ledger, policy and audit log.
Jobs go in through `consortia job submit`.

No mocks: processes, HTTPS, SQLite files. The refusals (unenrolled key,
removed node, a node trusting another CA) run against the same coordinator.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliRunner
from consortium import Consortium, cancer_sites, run_id_of, start_consortium
from federation import add_site, write_job
from sklearn.datasets import load_breast_cancer

from consortia.client.ledger import PrivacyLedger, ledger_path
from consortia.common.audit import verify
from consortia.common.privacy import epsilon, opacus_epsilon

pytestmark = pytest.mark.slow

NODES = ("st-mary", "riverside", "northgate")
BUDGET = 1.0


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, consortia_cli: CliRunner
) -> Iterator[tuple[Consortium, dict[str, Path]]]:
    consortium = Consortium(tmp_path_factory.mktemp("deployment"))
    node_tomls = cancer_sites(consortium, NODES, BUDGET, cli=consortia_cli)
    try:
        start_consortium(consortium, node_tomls)
        yield consortium, node_tomls
    finally:
        consortium.stop()


def _ledger_entries(node_toml: Path) -> list[object]:
    with PrivacyLedger(ledger_path(node_toml.parent / "state")) as ledger:
        ledger.verify("cancer")
        return list(ledger.history("cancer"))


def test_job_trains_and_ledgers_hold_the_composed_epsilon(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    fed, node_tomls = federation
    result = fed.submit(write_job(fed.root / "job.toml", 0.6))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = fed.state / "runs" / f"run-{run_id_of(result)}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["final"]["accuracy"] > 0.6
    assert (run_dir / metrics["final"]["model"]).is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert sorted(manifest["data_fingerprints"]) == sorted(NODES)
    assert (run_dir / "job.toml").read_text() == (fed.root / "job.toml").read_text()
    for name, node_toml in node_tomls.items():
        entries = _ledger_entries(node_toml)
        assert len(entries) == 2  # one release per round, recorded before each update left
        history = [entry.release for entry in entries]  # type: ignore[attr-defined]
        composed = epsilon(history, 1e-5)
        assert entries[-1].epsilon == composed  # type: ignore[attr-defined]
        assert composed == pytest.approx(opacus_epsilon(history, 1e-5, "rdp"), rel=1e-9)
        assert metrics["final"]["epsilon"][name] == pytest.approx(composed)
        assert composed <= 0.6
        node_audit = node_toml.parent / "state" / "audit.jsonl"
        assert verify(node_audit).ok
        spends = [e for e in fed.audit_events(node_audit) if e["event"] == "privacy.spend"]
        assert len(spends) == 2
    assert verify(fed.audit_log).ok
    events = fed.audit_events()
    connected = {e["details"]["node"] for e in events if e["event"] == "node.connected"}
    assert connected == set(NODES)
    assert any(e["event"] == "job.submitted" for e in events)
    run = str(run_id_of(result))
    of_run = [e["event"] for e in events if e["details"].get("run_id") == run]
    assert of_run == [
        "job.started",
        "round.started",
        "round.aggregated",
        "round.started",
        "round.aggregated",
        "job.finished",
    ]
    listed = fed.consortia("job", "list", "--config", str(fed.config))
    assert run in listed.stdout and "completed" in listed.stdout, listed.stdout + listed.stderr
    status = fed.consortia("job", "status", run, "--config", str(fed.config))
    assert "finished (completed)" in status.stdout and "rounds completed: 2" in status.stdout
    logs = fed.consortia("job", "logs", run, "--config", str(fed.config))
    assert "round 2 accuracy=" in logs.stdout, logs.stdout + logs.stderr


def test_job_over_budget_is_refused_and_trains_nothing(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    fed, node_tomls = federation
    before = {name: len(_ledger_entries(toml)) for name, toml in node_tomls.items()}
    result = fed.submit(write_job(fed.root / "greedy.toml", 3.0))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "budget-exhausted" in output
    assert "no node returned a usable update" in output
    after = {name: len(_ledger_entries(toml)) for name, toml in node_tomls.items()}
    assert after == before
    for toml in node_tomls.values():
        log = (fed.root / f"{toml.parent.name}.log").read_text()
        assert "budget-exhausted" in log
        node_events = fed.audit_events(toml.parent / "state" / "audit.jsonl")
        assert any(e["event"] == "node.refusal" for e in node_events)
    failed = [e for e in fed.audit_events() if e["event"] == "job.failed"]
    assert failed and "budget-exhausted" in str(failed[-1]["details"]["reason"])


def _refused_site(fed: Consortium, name: str, root_certificates: Path) -> Path:
    """A node with data and a key of its own, not (or no longer) admitted."""
    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    return add_site(
        fed.root / name,
        name,
        data.data[:60],
        data.target[:60],
        names,
        superlink_port=fed.port,
        budget=BUDGET,
        root_certificates=root_certificates,
    )


def _wait_exit(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    return int(process.wait(timeout=timeout))


def test_unenrolled_key_is_refused_and_audited(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    from consortia.common.node_keys import init_node_keys

    fed, _ = federation
    node_toml = _refused_site(fed, "intruder", fed.ca)
    keys = init_node_keys(node_toml.parent / "state" / "keys")
    assert _wait_exit(fed.start_node(node_toml, "intruder")) != 0
    refused = [e for e in fed.audit_events() if e["event"] == "node.connection_refused"]
    assert any(e["details"]["key_fingerprint"] == keys.public.fingerprint for e in refused)
    node_events = fed.audit_events(node_toml.parent / "state" / "audit.jsonl")
    assert "node.connection_refused" in [e["event"] for e in node_events]


def test_removed_node_can_no_longer_connect(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    fed, _ = federation
    node_toml = _refused_site(fed, "leaver", fed.ca)
    keys = fed.enroll("leaver", node_toml)
    process = fed.start_node(node_toml, "leaver")
    deadline = time.monotonic() + 90
    while not any(
        e["event"] == "node.connected" and e["details"]["node"] == "leaver"
        for e in fed.audit_events()
    ):
        assert time.monotonic() < deadline, "the enrolled node never connected"
        time.sleep(0.5)
    removed = fed.consortia("coordinator", "nodes", "remove", "leaver", "--config", str(fed.config))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    _wait_exit(process)  # refused on its next request, the coordinator not restarted
    events = fed.audit_events()
    assert any(e["event"] == "node.removed" and e["details"]["node"] == "leaver" for e in events)
    refused = [e for e in events if e["event"] == "node.connection_refused"]
    assert any(e["details"]["key_fingerprint"] == keys.public.fingerprint for e in refused)
    node_events = fed.audit_events(node_toml.parent / "state" / "audit.jsonl")
    assert "node.disconnected" in [e["event"] for e in node_events]
    listed = fed.consortia("coordinator", "nodes", "list", "--config", str(fed.config))
    assert "leaver" not in listed.stdout


def test_node_trusting_another_ca_refuses_the_coordinator(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    from consortia.common.pki import create_ca

    fed, _ = federation
    other = create_ca(fed.root / "other-ca", "another consortium")
    node_toml = _refused_site(fed, "stranger", other.certificate)
    fed.enroll("stranger", node_toml)
    assert _wait_exit(fed.start_node(node_toml, "stranger")) != 0
    node_events = fed.audit_events(node_toml.parent / "state" / "audit.jsonl")
    assert "coordinator.untrusted" in [e["event"] for e in node_events]
    submitted = fed.consortia(
        "job",
        "list",
        "--coordinator",
        f"127.0.0.1:{fed.port}",
        "--root-certificates",
        str(other.certificate),
    )
    assert submitted.returncode == 2
    assert "not trusted" in submitted.stderr and "Traceback" not in submitted.stderr


def test_job_stop_ends_a_running_job(federation: tuple[Consortium, dict[str, Path]]) -> None:
    fed, _ = federation
    job = write_job(fed.root / "long.toml", 0.2, name="long", rounds=20)
    submitted = fed.consortia("job", "submit", str(job), "--config", str(fed.config))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run = str(run_id_of(submitted))
    stopped = fed.consortia("job", "stop", run, "--config", str(fed.config))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 60
    while (
        "finished"
        not in (status := fed.consortia("job", "status", run, "--config", str(fed.config))).stdout
    ):
        assert time.monotonic() < deadline, status.stdout + status.stderr
        time.sleep(1)
    assert "stopped" in status.stdout
    assert any(e["event"] == "job.stop_requested" for e in fed.audit_events())
