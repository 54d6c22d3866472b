"""The coordinator service's pieces, without processes: config, gatekeeper, job FABs, CLI errors.

The real service (SuperLink, TLS, node authentication, jobs) is exercised
end to end in tests/test_deployment.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import CliRunner

from consortia.common.audit import AuditLog, verify
from consortia.common.errors import ConfigError
from consortia.common.node_keys import init_node_keys
from consortia.common.pki import create_ca, issue_server_certificate
from consortia.server.coordinator.config import load_coordinator_config
from consortia.server.coordinator.gatekeeper import Gatekeeper
from consortia.server.coordinator.jobs import JOB_TOML_KEY, build_job_fab
from consortia.server.coordinator.service import check_start, superlink_command


def _config(tmp_path: Path, tls: bool = True, extra: str = "") -> Path:
    text = f'name = "c"\nstate_dir = "state"\nport = 9999\n{extra}\n'
    if tls:
        create_ca(tmp_path / "ca")
        issue_server_certificate(tmp_path / "ca", tmp_path / "tls", ["localhost"], ["127.0.0.1"])
        text += (
            '[tls]\ncertfile = "tls/server.crt"\nkeyfile = "tls/server.key"\n'
            'ca_certfile = "tls/ca.crt"\n'
        )
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- config


def test_start_refuses_without_tls_unless_insecure(tmp_path: Path) -> None:
    path = _config(tmp_path, tls=False)
    config = load_coordinator_config(path)
    with pytest.raises(ConfigError, match="no \\[tls\\] block"):
        check_start(config, path, insecure=False)
    check_start(config, path, insecure=True)
    assert "--insecure" in superlink_command(config, insecure=True)


def test_start_refuses_insecure_with_tls_configured(tmp_path: Path) -> None:
    path = _config(tmp_path)
    config = load_coordinator_config(path)
    with pytest.raises(ConfigError, match="drop --insecure"):
        check_start(config, path, insecure=True)
    check_start(config, path, insecure=False)
    command = superlink_command(config, insecure=False)
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert command[command.index("--database") + 1] == str(config.state_dir / "superlink.db")


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        'state_dir = "s"\n[tls]\ncertfile = "nope.crt"\nkeyfile = "k"\nca_certfile = "c"\n'
    )
    with pytest.raises(ConfigError, match=r"tls\.certfile = 'nope\.crt': no such file"):
        load_coordinator_config(path)


def test_bad_admin_network_is_refused(tmp_path: Path) -> None:
    path = _config(tmp_path, tls=False, extra='admin_networks = ["10.0.0.0/33"]')
    with pytest.raises(ConfigError, match="is not a network"):
        load_coordinator_config(path)


# ------------------------------------------------------------ gatekeeper


def _call(gate: Gatekeeper, path: str, peer: str, headers: list[Any] | None = None) -> int:
    """One HTTP request through the gatekeeper; returns the status the client sees."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "path": path, "client": (peer, 5000), "headers": headers or []}
    asyncio.run(gate(scope, receive, send))
    return int(sent[0]["status"])


def _downstream(status: int):  # type: ignore[no-untyped-def]
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


def test_gatekeeper_admits_admin_paths_only_from_admin_networks(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", "coordinator")
    gate = Gatekeeper(_downstream(200), ("127.0.0.0/8",), audit, dict)
    assert _call(gate, "/v1/control/start-run", "203.0.113.9") == 403
    assert _call(gate, "/v1/runtime/pull-messages", "203.0.113.9") == 403
    assert _call(gate, "/v1/control/start-run", "127.0.0.1") == 200
    assert _call(gate, "/v1/fleet/pull-messages", "203.0.113.9") == 200
    assert _call(gate, "/health", "203.0.113.9") == 200
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["admin.refused", "admin.refused", "job.submitted"]
    assert events[0]["details"] == {"path": "/v1/control/start-run", "peer": "203.0.113.9"}
    assert verify(tmp_path / "audit.jsonl").ok


def test_gatekeeper_audits_node_connections_and_refusals(tmp_path: Path) -> None:
    keys = init_node_keys(tmp_path / "keys")
    pem = keys.public.pem
    header = [(b"flwr-public-key", base64.b64encode(pem))]
    audit = AuditLog(tmp_path / "audit.jsonl", "coordinator")
    joined = Gatekeeper(_downstream(200), ("127.0.0.0/8",), audit, lambda: {pem: "st-mary"})
    _call(joined, "/v1/fleet/activate-node", "198.51.100.4", header)
    refused = Gatekeeper(_downstream(401), ("127.0.0.0/8",), audit, dict)
    _call(refused, "/v1/fleet/pull-messages", "198.51.100.5", header)
    _call(refused, "/v1/fleet/pull-messages", "198.51.100.5", header)  # a retry: not repeated
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["node.connected", "node.connection_refused"]
    assert events[0]["details"]["node"] == "st-mary"
    assert events[0]["details"]["key_fingerprint"] == keys.public.fingerprint
    assert events[1]["details"]["node"] is None
    assert events[1]["details"]["key_fingerprint"] == keys.public.fingerprint


def test_gatekeeper_tells_a_still_active_node_from_a_refused_key(tmp_path: Path) -> None:
    """Flower answers 412 to an activation both for an unknown key and for a node still online."""
    enrolled, stranger = init_node_keys(tmp_path / "a"), init_node_keys(tmp_path / "b")
    audit = AuditLog(tmp_path / "audit.jsonl", "coordinator")
    gate = Gatekeeper(
        _downstream(412), ("127.0.0.0/8",), audit, lambda: {enrolled.public.pem: "st-mary"}
    )
    for keys in (enrolled, stranger):
        header = [(b"flwr-public-key", base64.b64encode(keys.public.pem))]
        assert _call(gate, "/v1/fleet/activate-node", "198.51.100.4", header) == 412
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["node.connection_deferred", "node.connection_refused"]
    deferred, refused = (e["details"] for e in events)
    assert deferred["node"] == "st-mary" and "still counts as active" in deferred["reason"]
    assert refused["node"] is None and refused["reason"] == "key not enrolled (or removed)"
    assert "authentication failed" not in json.dumps(events)


# ------------------------------------------------------------------ jobs


def test_job_fab_carries_the_job_text_and_no_code() -> None:
    text = 'name = "é \\"quoted\\""\nrounds = 3\n# a comment with \\\\ and \t tab\n'
    fab, digest = build_job_fab(text, "jobs/x.toml")
    files = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert [f for f in files if not f.startswith(".info/")] == ["pyproject.toml"]
    project = tomllib.loads(zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode())
    assert project["project"]["dependencies"] == []
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "consortia.server.app:app",
        "clientapp": "consortia.client.app:app",
    }
    assert project["tool"]["flwr"]["app"]["config"][JOB_TOML_KEY] == text
    assert len(digest) == 64


# ------------------------------------------------------------------- CLI


def test_submit_to_an_unreachable_coordinator_is_one_message(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    job = tmp_path / "job.toml"
    job.write_text('name = "j"\ndataset = "cancer"\nrounds = 1\n')
    result = consortia_cli(
        "job", "submit", str(job), "--coordinator", "127.0.0.1:9", "--insecure", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "cannot reach the coordinator" in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_refuses_a_malformed_job_before_connecting(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    job = tmp_path / "job.toml"
    job.write_text('name = "j"\nrounds = "many"\n')
    result = consortia_cli(
        "job", "submit", str(job), "--coordinator", "127.0.0.1:9", "--insecure", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "rounds" in result.stderr and "Traceback" not in result.stderr


def test_start_without_tls_is_refused_by_the_cli(tmp_path: Path, consortia_cli: CliRunner) -> None:
    path = _config(tmp_path, tls=False)
    result = consortia_cli("coordinator", "start", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "--insecure" in result.stderr and "Traceback" not in result.stderr
