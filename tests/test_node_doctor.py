"""`consortia node doctor`'s pieces without a coordinator: the signed node check, the
gatekeeper's answer to it, the clock verdicts, and `coordinator status`'s certificate
warning. The doctor against a real coordinator, with injected faults, is in
tests/test_deployment.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

from conftest import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import TIMESTAMP_HEADER

from consortia.client.node_doctor import Verdict, _clock
from consortia.common.audit import AuditLog
from consortia.common.node_check import (
    NODE_CHECK_PATH,
    NodeCheckAnswer,
    signed_headers,
    signing_key,
)
from consortia.common.node_keys import NodeKeys, init_node_keys
from consortia.common.pki import create_ca, issue_server_certificate
from consortia.server.coordinator.gatekeeper import Gatekeeper


def _private_key(keys: NodeKeys) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def test_a_signed_check_names_the_key_and_refuses_forgeries(tmp_path: Path) -> None:
    keys = init_node_keys(tmp_path / "keys")
    headers = signed_headers(_private_key(keys))
    now = dt.datetime.now(dt.UTC)
    assert signing_key(headers, now) == keys.public.pem  # the bytes enrollment stores
    other = init_node_keys(tmp_path / "other")
    forged = {**signed_headers(_private_key(other)), "flwr-public-key": headers["flwr-public-key"]}
    assert "does not verify" in str(signing_key(forged, now))
    assert "not a signed request" in str(signing_key({}, now))
    ahead = now - dt.timedelta(seconds=30)  # the node's clock 30 s ahead of this one
    assert "30 s ahead of the coordinator's clock" in str(signing_key(headers, ahead))
    assert signing_key(headers, now + dt.timedelta(seconds=200)) == keys.public.pem  # behind: ok
    assert isinstance(signing_key({**headers, TIMESTAMP_HEADER: "yesterday"}, now), str)


def _check(gate: Gatekeeper, headers: dict[str, str], peer: str) -> tuple[int, NodeCheckAnswer]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "path": NODE_CHECK_PATH, "client": (peer, 5000), "headers": raw}
    asyncio.run(gate(scope, receive, send))
    return int(sent[0]["status"]), NodeCheckAnswer.model_validate_json(sent[1]["body"])


async def _never_flower(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the node check must not reach Flower")


def test_the_gatekeeper_answers_a_node_check_itself(tmp_path: Path) -> None:
    enrolled, stranger = init_node_keys(tmp_path / "a"), init_node_keys(tmp_path / "b")
    audit = AuditLog(tmp_path / "audit.jsonl", "coordinator")
    gate = Gatekeeper(
        _never_flower, ("127.0.0.0/8",), audit, lambda: {enrolled.public.pem: "st-mary"}
    )
    status, answer = _check(gate, signed_headers(_private_key(enrolled)), "198.51.100.4")
    assert status == 200 and answer.enrolled and answer.node == "st-mary"
    assert answer.versions is not None and answer.versions.flwr
    assert abs((answer.time_utc - dt.datetime.now(dt.UTC)).total_seconds()) < 5
    status, answer = _check(gate, signed_headers(_private_key(stranger)), "198.51.100.5")
    assert status == 403 and not answer.enrolled
    assert answer.versions is None and answer.node is None  # nothing for a stranger
    status, answer = _check(gate, {}, "198.51.100.6")
    assert status == 401 and answer.versions is None and answer.time_utc  # its clock only
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["details"]["enrolled"]) for e in events] == [
        ("node.checked", True),
        ("node.checked", False),
    ]
    assert events[0]["details"]["key_fingerprint"] == enrolled.public.fingerprint


def test_the_clock_verdict_follows_flowers_window() -> None:
    assert _clock(0.3).verdict == Verdict.OK
    assert _clock(30.0).verdict == Verdict.WARNING  # behind: Flower still accepts it
    ahead = _clock(-4.0)  # ahead: Flower refuses past 5 s; the doctor warns with margin
    assert ahead.verdict == Verdict.PROBLEM
    assert "4.0 s ahead of the coordinator's" in ahead.text and "NTP" in ahead.text


def test_coordinator_status_warns_of_a_certificate_expiring_within_30_days(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    create_ca(tmp_path / "ca")
    issue_server_certificate(tmp_path / "ca", tmp_path / "tls", ["localhost"], [], days=10)
    (tmp_path / "coordinator.toml").write_text(
        'state_dir = "state"\nport = 9093\n[tls]\ncertfile = "tls/server.crt"\n'
        'keyfile = "tls/server.key"\nca_certfile = "tls/ca.crt"\n'
    )
    result = consortia_cli("coordinator", "status", "--config", "coordinator.toml", cwd=tmp_path)
    assert result.returncode == 1  # not running, as before
    output = " ".join(result.stdout.split())
    assert "warning: the coordinator's certificate" in output
    assert "expires on" in output and "consortia provision coordinator" in output
    assert "consortium CA certificate" not in output  # the CA has ten years left
