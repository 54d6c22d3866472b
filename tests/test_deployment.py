"""Deployment, for real: `consortia coordinator start` and three `consortia node start`
SuperNodes on 127.0.0.1, with TLS (a CA from `consortia provision`) and node
authentication (keys made on the nodes, enrolled by public key), each node
with its own registered CSV dataset, SQLite ledger, policy and audit log.
Jobs go in through `consortia job submit`.

No mocks: processes, HTTPS, SQLite files. The refusals (unenrolled key,
removed node, a node trusting another CA) run against the same coordinator.
So do the operations checks: both Prometheus endpoints (the coordinator's
and the nodes', scraped while the first job runs) and `consortia node
doctor` on a healthy node and on each injected fault.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CliRunner
from consortium import Consortium, cancer_sites, run_id_of, start_consortium
from federation import add_site, write_job
from prometheus import assert_refused_from_outside, sample, scrape
from prometheus_client.samples import Sample
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
    consortium = Consortium(tmp_path_factory.mktemp("deployment"), metrics=True)
    node_tomls = cancer_sites(consortium, NODES, BUDGET, cli=consortia_cli, metrics=True)
    try:
        start_consortium(consortium, node_tomls)
        yield consortium, node_tomls
    finally:
        consortium.stop()


def _ledger_entries(node_toml: Path) -> list[object]:
    with PrivacyLedger(ledger_path(node_toml.parent / "state")) as ledger:
        ledger.verify("cancer")
        return list(ledger.history("cancer"))


def _node_metrics_url(node_toml: Path) -> str:
    from consortia.client.node_config import load_node_config

    metrics = load_node_config(node_toml).metrics
    assert metrics is not None
    return metrics.url


class Scraper:
    """Scrapes endpoints every 0.25 s in a thread (while a job runs); keeps every scrape."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.scrapes: dict[str, list[dict[str, list[Sample]]]] = {url: [] for url in urls}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for url in self.urls:
                self.scrapes[url].append(scrape(url))


def test_job_trains_and_ledgers_hold_the_composed_epsilon(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    fed, node_tomls = federation
    coordinator_url = f"http://127.0.0.1:{fed.metrics_port}/metrics"
    node_url = _node_metrics_url(node_tomls["st-mary"])
    with Scraper([coordinator_url, node_url]) as during:
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
    _coordinator_metrics_follow_the_run(during.scrapes[coordinator_url], run, metrics, fed)
    _node_metrics_follow_the_run(during.scrapes[node_url], node_tomls["st-mary"])


def _coordinator_metrics_follow_the_run(
    seen: list[dict[str, list[Sample]]], run: str, metrics: dict[str, Any], fed: Consortium
) -> None:
    """Scraped during the job: the round count grew live; after it, every figure is the record's."""
    labels = {"run": run, "job": "cancer-0.6"}
    rounds = "consortia_coordinator_rounds_completed_total"
    live = [sample(scraped, rounds, **labels) for scraped in seen]
    assert 1 in live, live  # a scrape between the two rounds saw the first one
    served = scrape(f"http://127.0.0.1:{fed.metrics_port}/metrics")
    assert sample(served, rounds, **labels) == 2
    assert sample(served, "consortia_coordinator_rounds_planned", **labels) == 2
    assert sample(served, "consortia_coordinator_run_finished", **labels) == 1
    duration = "consortia_coordinator_round_duration_seconds"
    assert sample(served, f"{duration}_count", **labels) == 2
    seconds = sum(r["seconds"] for r in metrics["rounds"])
    assert sample(served, f"{duration}_sum", **labels) == pytest.approx(seconds)
    assert all(not r["failures"] for r in metrics["rounds"])
    # Per round: three updates used and three federated-evaluation answers.
    assert sample(served, "consortia_coordinator_replies_total", **labels) == 12
    assert sample(served, "consortia_coordinator_updates_aggregated_total", **labels) == 6
    for node, spent in metrics["final"]["epsilon"].items():
        assert sample(served, "consortia_coordinator_epsilon", node=node, **labels) == spent
    assert sample(served, "consortia_coordinator_superlink_up") == 1
    assert sample(served, "consortia_coordinator_nodes_enrolled") == 3
    assert sample(served, "consortia_coordinator_nodes_online") == 3
    online = served["consortia_coordinator_node_online"]
    assert {s.labels["node"] for s in online if s.value == 1} == set(NODES)


def _node_metrics_follow_the_run(seen: list[dict[str, list[Sample]]], node_toml: Path) -> None:
    """The node's endpoint: messages counted as they came, spend as its ledger holds it."""
    handled = "consortia_node_messages_total"
    trained = [sample(s, handled, type="train", outcome="completed") for s in seen]
    assert 1 in trained, trained  # seen between the two rounds
    served = scrape(_node_metrics_url(node_toml))
    assert sample(served, handled, type="train", outcome="completed") == 2
    assert sample(served, handled, type="evaluate", outcome="completed") == 2
    assert sample(served, "consortia_node_round_training_seconds_count") == 2
    assert (sample(served, "consortia_node_round_training_seconds_sum") or 0) > 0
    with PrivacyLedger(ledger_path(node_toml.parent / "state")) as ledger:
        budget = ledger.budget("cancer")
    spent = sample(served, "consortia_node_epsilon_spent", dataset="cancer")
    assert spent == budget.epsilon_spent
    left = sample(served, "consortia_node_epsilon_remaining", dataset="cancer")
    assert left == pytest.approx(budget.epsilon_remaining)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert sample(served, "consortia_node_device_info", device=device) == 1
    assert sample(served, "consortia_node_refusals_total") is None  # none yet
    # Bound to 127.0.0.1: a request to this machine's other address is refused.
    from consortia.client.node_config import load_node_config

    metrics = load_node_config(node_toml).metrics
    assert metrics is not None
    assert_refused_from_outside(metrics.port)


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
    for toml in node_tomls.values():  # each node's endpoint counts its refusals by code
        node_events = fed.audit_events(toml.parent / "state" / "audit.jsonl")
        codes = [e["details"]["code"] for e in node_events if e["event"] == "node.refusal"]
        served = scrape(_node_metrics_url(toml))
        counted = sample(served, "consortia_node_refusals_total", code="budget-exhausted")
        assert counted == codes.count("budget-exhausted") >= 1


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


# ------------------------------------------------------------------ node doctor


def _doctor(fed: Consortium, node_toml: Path, *args: str) -> tuple[int, list[str]]:
    """`consortia node doctor`: its exit code and its lines (each finding is one line)."""
    done = fed.consortia("node", "doctor", "--node", str(node_toml), *args)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines()


def _line(lines: list[str], start: str) -> str:
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, "\n".join(lines)
    return found[0]


def test_doctor_passes_a_healthy_node(federation: tuple[Consortium, dict[str, Path]]) -> None:
    fed, node_tomls = federation
    code, lines = _doctor(fed, node_tomls["st-mary"])
    assert code == 0, "\n".join(lines)
    assert not [line for line in lines if line.startswith("problem")]
    assert "chains to" in _line(lines, "ok      certificate:")
    assert "enrolled this key as st-mary" in _line(lines, "ok      enrollment:")
    assert _line(lines, "ok      clock:")
    assert "as there" in _line(lines, "ok      versions:")
    assert "unchanged since registration" in _line(lines, "ok      dataset cancer:")
    assert _line(lines, "ok      GPU:")  # this machine's: a GPU that works, or none
    assert lines[-1] == "node st-mary: 0 problem(s), 0 warning(s)"


def test_doctor_names_an_unenrolled_key_and_a_changed_dataset(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    from consortia.common.node_keys import init_node_keys

    fed, _ = federation
    node_toml = _refused_site(fed, "newcomer", fed.ca)
    init_node_keys(node_toml.parent / "state" / "keys")  # made, never enrolled
    export = node_toml.parent / "data" / "export.csv"
    rows = export.read_text().splitlines()
    export.write_text("\n".join([rows[0], rows[2], rows[1], *rows[3:]]) + "\n")  # reordered
    code, lines = _doctor(fed, node_toml, "--device", "cpu")
    assert code == 1
    enrollment = _line(lines, "problem enrollment:")
    assert "does not accept this node's key" in enrollment
    assert "consortia node keys show" in enrollment  # the fix
    dataset = _line(lines, "problem dataset cancer:")
    assert "changed since dataset 'cancer' was registered" in dataset
    assert "--replace" in dataset and "restore the registered file" in dataset
    assert lines[-1].startswith("node newcomer: 2 problem(s)")


def test_doctor_names_a_coordinator_certificate_from_another_ca(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    from consortia.common.pki import create_ca

    fed, node_tomls = federation
    other = create_ca(fed.root / "doctor-other-ca", "another consortium")
    node_toml = _variant(node_tomls["st-mary"], "wrong-ca", root_certificates=other.certificate)
    code, lines = _doctor(fed, node_toml, "--device", "cpu")
    assert code == 1
    certificate = _line(lines, "problem certificate:")
    assert "issued by 'CN=consortia CA'" in certificate
    assert f"does not chain to {other.certificate}" in certificate
    assert "set [superlink] root_certificates in node.toml" in certificate  # the fix
    assert "skipped enrollment" in "\n".join(lines)  # an untrusted peer is not asked


def test_doctor_names_an_expired_coordinator_certificate(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    fed, node_tomls = federation
    cert, key = _expired_certificate(fed.root / "pki" / "ca", fed.root / "expired")
    with _tls_server(cert, key) as port:
        node_toml = _variant(node_tomls["st-mary"], "expired", address=f"127.0.0.1:{port}")
        code, lines = _doctor(fed, node_toml, "--device", "cpu")
    assert code == 1
    certificate = _line(lines, "problem certificate:")
    assert "the coordinator's certificate expired on" in certificate
    assert "`consortia provision coordinator`" in certificate  # the fix


def _variant(node_toml: Path, name: str, **superlink: object) -> Path:
    """A copy of `node_toml` beside it (same state folder) with [superlink] keys replaced."""
    text = node_toml.read_text()
    for key, setting in superlink.items():
        lines = text.splitlines()
        text = "\n".join(
            f'{key} = "{setting}"' if line.startswith(f"{key} = ") else line for line in lines
        )
    variant = node_toml.with_name(f"{name}.toml")
    variant.write_text(text + "\n")
    return variant


def _expired_certificate(ca_dir: Path, out: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 issued by the consortium's own CA, expired a month ago."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from consortia.common.pki import load_ca

    ca_cert, ca_key = load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now - dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir()
    (out / "server.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (out / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out / "server.crt", out / "server.key"


@contextlib.contextmanager
def _tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS listener on 127.0.0.1 presenting `cert`: handshakes, then hangs up."""
    import socket
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(5)
            with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
