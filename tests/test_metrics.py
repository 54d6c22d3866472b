"""The Prometheus endpoints' pieces, without a federation: the server, both collectors,
the worker's figures file. A real deployed job is scraped in tests/test_deployment.py."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from federation import free_port
from prometheus import assert_refused_from_outside, families, value
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample

from consortia.client.ledger import PrivacyLedger, ledger_path
from consortia.client.node_audit import node_audit_log
from consortia.client.node_config import load_node_config
from consortia.client.node_metrics import NodeCollector
from consortia.client.worker_metrics import (
    MessageKind,
    WorkerMetrics,
    read_worker_metrics,
    write_worker_metrics,
)
from consortia.common.errors import ConfigError, FederationError
from consortia.common.metrics_http import MetricsConfig, MetricsServer, metrics_app
from consortia.common.privacy import Release
from consortia.common.protocol import FailureKind, RefusalCode
from consortia.common.versions import Mismatch, SoftwareVersions, version_mismatches
from consortia.server.coordinator.config import load_coordinator_config
from consortia.server.coordinator.metrics import CoordinatorCollector, run_figures
from consortia.server.outputs.metrics_file import MetricsFile
from consortia.server.rounds.run_log import NodeFailure, RoundRecord


def exposition(collector: Any) -> dict[str, list[Sample]]:
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return families(generate_latest(registry).decode())


# ------------------------------------------------------------------ the endpoint


def _wsgi(app: Any, peer: str, path: str = "/metrics") -> tuple[str, bytes]:
    seen: dict[str, str] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"] = status

    environ = {"REMOTE_ADDR": peer, "PATH_INFO": path, "REQUEST_METHOD": "GET"}
    body = b"".join(app(environ, start_response))
    return seen["status"], body


def test_the_endpoint_answers_allowed_networks_only() -> None:
    app = metrics_app(CollectorRegistry(), ("127.0.0.0/8", "::1/128"))
    assert _wsgi(app, "127.0.0.1")[0] == "200 OK"
    assert _wsgi(app, "::1")[0] == "200 OK"
    assert _wsgi(app, "::ffff:127.0.0.1")[0] == "200 OK"  # IPv4 on a dual-stack socket
    assert _wsgi(app, "192.0.2.7")[0].startswith("403")
    assert _wsgi(app, "10.1.2.3")[0].startswith("403")
    assert _wsgi(app, "")[0].startswith("403")
    assert _wsgi(app, "127.0.0.1", "/")[0].startswith("404")
    wider = metrics_app(CollectorRegistry(), ("10.0.0.0/8",))
    assert _wsgi(wider, "10.1.2.3")[0] == "200 OK"


def test_a_served_endpoint_is_bound_to_localhost_and_refuses_other_addresses() -> None:
    port = free_port()
    server = MetricsServer(MetricsConfig(port=port), CollectorRegistry(), "test")
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
        assert_refused_from_outside(port)
        taken = MetricsServer(MetricsConfig(port=port), CollectorRegistry(), "second")
        with pytest.raises(FederationError, match="already in use"):
            taken.start()
    finally:
        server.stop()


def test_metrics_ports_are_their_own(tmp_path: Path) -> None:
    (tmp_path / "coordinator.toml").write_text(
        'state_dir = "s"\nport = 9093\n[metrics]\nport = 9093\n'
    )
    with pytest.raises(ConfigError, match="SuperLink's port"):
        load_coordinator_config(tmp_path / "coordinator.toml")
    (tmp_path / "node.toml").write_text(
        'name = "n"\nstate_dir = "s"\nruntime_port = 9094\n[metrics]\nport = 9094\n'
    )
    with pytest.raises(ConfigError, match="runtime_port"):
        load_node_config(tmp_path / "node.toml")
    (tmp_path / "bad.toml").write_text(
        'name = "n"\nstate_dir = "s"\n[metrics]\nport = 9100\nallow = ["everyone"]\n'
    )
    with pytest.raises(ConfigError, match="not a network"):
        load_node_config(tmp_path / "bad.toml")


# ------------------------------------------------------------------ coordinator


def _run_folder(root: Path, run: int, rounds: list[RoundRecord], final: bool = False) -> Path:
    folder = root / "runs" / f"run-{run}"
    folder.mkdir(parents=True)
    metrics = MetricsFile(rounds=rounds).model_dump(mode="json")
    if final:
        metrics["final"] = {"model": "model/round-002.safetensors"}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    manifest = {"config": {"name": "cancer-study", "rounds": 3}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _rounds() -> list[RoundRecord]:
    refused = NodeFailure(
        node="north",
        reason="over budget",
        refusal=RefusalCode.BUDGET_EXHAUSTED,
        kind=FailureKind.REFUSED,
    )
    foreign = NodeFailure(
        node="east", reason="?", refusal="a-code-of-a-newer-node", kind=FailureKind.REFUSED
    )
    silent = NodeFailure(
        node="west", reason="no train reply within 60 s", kind=FailureKind.NO_REPLY
    )
    return [
        RoundRecord(
            round=1,
            epsilon={"st-mary": 0.3, "north": 0.0},
            participants=["st-mary", "south"],
            failures=[refused, silent],
            accuracy_per_node={"st-mary": 0.8, "south": 0.7},
            seconds=1.5,
        ),
        RoundRecord(
            round=2,
            epsilon={"st-mary": 0.42, "north": 0.0},
            participants=["st-mary"],
            failures=[foreign],
            seconds=42.0,
        ),
    ]


def test_run_figures_count_rounds_replies_failures_and_refusals(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path, 7, _rounds())
    figures = run_figures(folder)
    assert figures is not None
    assert (figures.run, figures.job, figures.rounds_planned) == ("7", "cancer-study", 3)
    assert figures.round_seconds == (1.5, 42.0)
    assert figures.aggregated == 3
    # Used updates (3), evaluate answers (2), the refusals (2); the silent node sent nothing.
    assert figures.replies == 7
    assert figures.failures == {FailureKind.REFUSED: 2, FailureKind.NO_REPLY: 1}
    assert figures.refusals == {RefusalCode.BUDGET_EXHAUSTED: 1, RefusalCode.UNKNOWN: 1}
    assert figures.epsilon == {"st-mary": 0.42, "north": 0.0}
    assert not figures.finished


def test_run_figures_of_old_records_and_of_runs_without_a_record(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "run-3"
    folder.mkdir(parents=True)
    old = {"round": 1, "epsilon": None, "failures": [{"node": "a", "reason": "node error: x"}]}
    (folder / "metrics.json").write_text(json.dumps({"rounds": [old]}))
    figures = run_figures(folder)
    assert figures is not None
    assert (figures.rounds, figures.round_seconds) == (1, ())  # a round without its time
    assert figures.failures == {FailureKind.ERROR_REPLY: 1}  # the kind its reason tells
    assert figures.epsilon is None  # trained without DP: no ε series, never a 0
    assert figures.job == ""  # no manifest: an empty label, not a failed scrape
    (tmp_path / "runs" / "run-4").mkdir()  # a statistics run: stats.json, no metrics.json
    assert run_figures(tmp_path / "runs" / "run-4") is None


def test_the_coordinator_collector_serves_conventional_series(tmp_path: Path) -> None:
    _run_folder(tmp_path, 7, _rounds(), final=True)
    (tmp_path / "coordinator.toml").write_text('name = "hub"\nstate_dir = "."\nport = 9093\n')
    config = load_coordinator_config(tmp_path / "coordinator.toml")
    served = exposition(CoordinatorCollector(config, _superlink_down))
    up = "consortia_coordinator_superlink_up"
    assert value(served[up], up) == 0
    assert "consortia_coordinator_node_online" not in served
    run = {"run": "7", "job": "cancer-study"}
    rounds = served["consortia_coordinator_rounds_completed"]
    assert value(rounds, "consortia_coordinator_rounds_completed_total", **run) == 2
    duration = served["consortia_coordinator_round_duration_seconds"]
    name = "consortia_coordinator_round_duration_seconds"
    assert value(duration, f"{name}_count", **run) == 2
    assert value(duration, f"{name}_sum", **run) == 43.5
    assert value(duration, f"{name}_bucket", le="2.5", **run) == 1
    assert value(duration, f"{name}_bucket", le="+Inf", **run) == 2
    refusals = served["consortia_coordinator_refusals"]
    total = "consortia_coordinator_refusals_total"
    assert value(refusals, total, code="budget-exhausted", **run) == 1
    assert value(refusals, total, code="unknown", **run) == 1
    failures = served["consortia_coordinator_node_failures"]
    assert value(failures, "consortia_coordinator_node_failures_total", kind="no-reply") == 1
    epsilon = served["consortia_coordinator_epsilon"]
    assert value(epsilon, "consortia_coordinator_epsilon", node="st-mary", **run) == 0.42
    finished = "consortia_coordinator_run_finished"
    assert value(served[finished], finished, **run) == 1
    assert all(family.startswith("consortia_coordinator") for family in served)
    assert value(exposition(CoordinatorCollector(config, dict))[up], up) == 1


def _superlink_down() -> dict[int, str]:
    raise FederationError("cannot reach the coordinator")


# ------------------------------------------------------------------ node


def test_message_kinds_are_the_types_the_clientapp_answers() -> None:
    from flwr.app import MessageType

    from consortia.common.secagg.wire import MESSAGE_ACTION as SECAGG
    from consortia.common.statistics import MESSAGE_ACTION as STATISTICS

    answered = {
        MessageType.TRAIN,
        f"{MessageType.TRAIN}.{SECAGG}",
        MessageType.EVALUATE,
        MessageType.QUERY,
        f"{MessageType.QUERY}.{STATISTICS}",
    }
    assert {str(kind) for kind in MessageKind} - {"other"} == answered
    assert MessageKind.of("train.something-else") == MessageKind.OTHER


def test_worker_figures_add_a_secure_rounds_stages_up() -> None:
    figures = WorkerMetrics()
    figures.handled("query", "completed", 0.1, run_id=5, server_round=None)
    # Round 1's SecAgg+ stages: the setup names the round, the later ones may not.
    for seconds, named in ((0.5, 1), (2.0, 1), (0.25, None)):
        figures.handled("train.secagg", "completed", seconds, run_id=5, server_round=named)
    figures.handled("train.secagg", "completed", 1.0, run_id=5, server_round=2)
    figures.handled("evaluate", "failed", 0.3, run_id=5, server_round=2)
    assert figures.training_rounds == 2
    assert figures.training_seconds == pytest.approx(3.75)
    assert (figures.last_round, figures.last_round_seconds) == ("5/2", 1.0)
    figures.handled("train", "completed", 0.5, run_id=6, server_round=2)  # next run, same round
    assert (figures.training_rounds, figures.last_round) == (3, "6/2")
    assert figures.messages[MessageKind.TRAIN_SECAGG] == {"completed": 4}
    assert figures.messages[MessageKind.EVALUATE] == {"failed": 1}


def test_the_node_collector_reads_ledger_audit_log_and_worker_figures(tmp_path: Path) -> None:
    node_toml = tmp_path / "node.toml"
    node_toml.write_text('name = "st-mary"\nstate_dir = "state"\n[metrics]\nport = 9101\n')
    config = load_node_config(node_toml)
    collector = NodeCollector(config)
    served = exposition(collector)
    assert "consortia_node_messages" not in served  # no worker figures yet: no series
    assert value(served["consortia_node_info"], "consortia_node_info", node="st-mary") == 1
    config.state_dir.mkdir()
    with PrivacyLedger(ledger_path(config.state_dir)) as ledger:
        ledger.register_dataset("cancer", 8.0, 1e-5)
        release = Release(noise_multiplier=1.1, sample_rate=0.05, steps=40)
        entry = ledger.record_release("cancer", release, run_id="9", server_round=1)
    audit = node_audit_log(config)
    audit.append("node.refusal", code="budget-exhausted", reason="over", run_id="9")
    audit.append("privacy.spend", dataset="cancer", ledger_seq=1)
    figures = WorkerMetrics(device="cpu")
    figures.handled("train", "completed", 2.5, run_id=9, server_round=1)
    write_worker_metrics(config.worker_metrics_file, figures)
    served = exposition(collector)
    remaining = served["consortia_node_epsilon_remaining"]
    left = value(remaining, "consortia_node_epsilon_remaining", dataset="cancer")
    assert left == pytest.approx(8.0 - entry.epsilon)
    assert value(served["consortia_node_releases"], "consortia_node_releases_total") == 1
    refusals = served["consortia_node_refusals"]
    assert value(refusals, "consortia_node_refusals_total", code="budget-exhausted") == 1
    messages = served["consortia_node_messages"]
    handled = value(messages, "consortia_node_messages_total", type="train", outcome="completed")
    assert handled == 1
    training = served["consortia_node_round_training_seconds"]
    assert value(training, "consortia_node_round_training_seconds_count") == 1
    assert value(training, "consortia_node_round_training_seconds_sum") == 2.5
    device = served["consortia_node_device_info"]
    assert value(device, "consortia_node_device_info", device="cpu") == 1
    # The log is read on from where the last scrape stopped: new refusals add up, none twice.
    audit.append("node.refusal", code="dp-required", reason="no DP", run_id="10")
    audit.append("node.refusal", code="budget-exhausted", reason="over", run_id="10")
    refusals = exposition(collector)["consortia_node_refusals"]
    assert value(refusals, "consortia_node_refusals_total", code="budget-exhausted") == 2
    assert value(refusals, "consortia_node_refusals_total", code="dp-required") == 1
    assert read_worker_metrics(config.worker_metrics_file) == figures


# ------------------------------------------------------------------ versions


def test_versions_must_match_for_consortia_and_flower_only() -> None:
    here = SoftwareVersions(consortia="0.1.0", consortia_revision="a", flwr="1.42.0", torch="2.4")
    assert version_mismatches(here, here) == []
    other_torch = here.model_copy(update={"torch": "2.5"})
    assert [w for w, _ in version_mismatches(here, other_torch)] == [Mismatch.WARNING]
    other_flower = here.model_copy(update={"flwr": "1.41.0"})
    ((weight, text),) = version_mismatches(here, other_flower)
    assert weight == Mismatch.PROBLEM and "Flower 1.42.0 here, 1.41.0 there" in text
    other_build = here.model_copy(update={"consortia_revision": "b"})
    assert [w for w, _ in version_mismatches(here, other_build)] == [Mismatch.WARNING]
