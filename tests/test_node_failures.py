"""Why a node or a job stopped, in one line that names the cause and the fix.

Flower says "[code: 2004] Failed to activate SuperNode" for a node whose key
the coordinator does not know, nothing at all (exit code 0) for a node it
removed, and retries forever, "Connection attempt failed", for a node
without TLS pointed at a TLS coordinator; a job every node refuses ended in
a traceback and "unhandled exception in the ServerApp". Each is one `error:`
line now, with exit code 2 (a node) or 1 (a job).

The cause-finding is tested in-process first (a TLS and a plain server on
127.0.0.1, the watcher fed Flower's lines); then once for real, against one
coordinator shared by the module (`slow`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliRunner
from consortium import Consortium, cancer_sites, start_consortium
from federation import free_port, write_job, write_node_toml

from consortia.client.link_probe import speaks_tls, tls_mismatch
from consortia.client.node_config import SuperLinkConfig
from consortia.client.supernode_service import ConnectionWatcher
from consortia.common.audit import AuditLog
from consortia.common.flower_log import user_errors_in_one_line
from consortia.common.pki import create_ca, issue_server_certificate

# ------------------------------------------------------------------ the probe


@contextlib.contextmanager
def _server(tls_dir: Path | None) -> Iterator[str]:
    """A server on 127.0.0.1 that answers every connection (TLS with `tls_dir`), until exit."""
    listener = socket.create_server(("127.0.0.1", 0))
    context = None
    if tls_dir is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls_dir / "server.crt", tls_dir / "server.key")
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), connection:
                if context is not None:
                    connection.settimeout(5)
                    with context.wrap_socket(connection, server_side=True) as secure:
                        secure.recv(1)
                else:
                    connection.recv(4096)
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    create_ca(root / "ca")
    issue_server_certificate(root / "ca", root / "server", ["localhost"], ["127.0.0.1"])
    return root / "server"


def test_the_probe_tells_tls_from_plain_http_and_silence(pki: Path) -> None:
    with _server(pki) as tls, _server(None) as plain:
        assert speaks_tls(tls) is True
        assert speaks_tls(plain) is False
        assert "speaks TLS, but node.toml's [superlink] sets insecure = true" in str(
            tls_mismatch(tls, insecure=True)
        )
        assert "does not speak TLS" in str(tls_mismatch(plain, insecure=False))
        assert tls_mismatch(tls, insecure=False) is None
        assert tls_mismatch(plain, insecure=True) is None
    closed = f"127.0.0.1:{free_port()}"
    assert speaks_tls(closed) is None  # down, not mismatched: Flower keeps retrying
    assert tls_mismatch(closed, insecure=True) is None


def test_a_retrying_node_is_stopped_once_the_probe_finds_a_tls_mismatch(
    tmp_path: Path, pki: Path
) -> None:
    stopped = threading.Event()
    with _server(pki) as tls:
        watcher = ConnectionWatcher(
            AuditLog(tmp_path / "audit.jsonl", "n"),
            tls,
            link=SuperLinkConfig(address=tls, insecure=True),
            stop=stopped.set,
        )
        watcher.see("WARNING :   Connection attempt failed, retrying in 1.23 seconds\n")
        assert stopped.wait(timeout=30)
    assert watcher.cause(0) == watcher.mismatch and "speaks TLS" in str(watcher.mismatch)


def _watched(tmp_path: Path, *lines: str) -> ConnectionWatcher:
    watcher = ConnectionWatcher(AuditLog(tmp_path / "audit.jsonl", "n"), "fl.example:9093")
    for line in lines:
        watcher.see(line)
    return watcher


def test_the_causes_flower_leaves_unsaid(tmp_path: Path) -> None:
    refused = _watched(
        tmp_path,
        "ERROR :   Exit Code: 305\n",
        "Failed to initialize the connection to the SuperLink.\n",
        "[code: 2004] Failed to activate SuperNode\n",
    )
    assert "refused this node's key: it is not enrolled" in str(refused.cause(1))
    assert "consortia node keys show" in str(refused.cause(1))
    removed = _watched(tmp_path, "INFO :      SuperNode ID: 7\n")
    assert "ended this node's session" in str(removed.cause(0))  # Flower's exit code 0
    assert removed.cause(1) is None  # a crash after joining: Flower's own output says why
    untrusted = _watched(tmp_path, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed\n")
    assert "does not chain to the system's CAs" in str(untrusted.cause(1))
    assert _watched(tmp_path, "INFO : Starting Flower SuperNode\n").cause(1) is None


def test_a_user_error_ending_the_server_app_is_one_log_line() -> None:
    import io
    import logging

    from flwr.common.logger import log

    from consortia.common.errors import FederationError

    user_errors_in_one_line()
    user_errors_in_one_line()  # installed once, however often asked
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # formats a record's traceback, as Flower's does
    logging.getLogger("flwr").addHandler(handler)
    try:

        def end(exc: Exception) -> str:
            try:
                raise exc
            except Exception as raised:  # as flwr.superlink.runtime.run_serverapp logs it
                log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=raised)
            log(logging.ERROR, "Exit Code: 201\nAn unhandled exception occurred in the ServerApp.")
            output, _ = stream.getvalue(), stream.truncate(0)
            stream.seek(0)
            return output

        reason = "round 1: no node returned a usable update (model-not-allowed)"
        output = end(FederationError(reason))
        assert output == f"error: {reason}\n"
        output = end(RuntimeError("a bug"))
        assert "Traceback" in output and "unhandled exception" in output  # a bug keeps both
    finally:
        logging.getLogger("flwr").removeHandler(handler)


# ------------------------------------------------------------------ for real

STRICT = "strict"  # an enrolled node whose policy refuses the jobs below


@pytest.fixture(scope="module")
def consortium(
    tmp_path_factory: pytest.TempPathFactory, consortia_cli: CliRunner
) -> Iterator[tuple[Consortium, Path]]:
    fed = Consortium(tmp_path_factory.mktemp("failures"))
    (node_toml,) = cancer_sites(
        fed, (STRICT,), 1.0, cli=consortia_cli, policies={STRICT: 'models = ["mlp"]\n'}
    ).values()
    try:
        start_consortium(fed, {STRICT: node_toml})
        yield fed, node_toml
    finally:
        fed.stop()


def _node_toml(fed: Consortium, name: str, *, tls: bool) -> Path:
    site = fed.root / name
    site.mkdir()
    return write_node_toml(site, name, fed.port, 1.0, root_certificates=fed.ca if tls else None)


def _one_error(fed: Consortium, log: str) -> str:
    text = (fed.root / f"{log}.log").read_text(errors="replace")
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


@pytest.mark.slow
def test_an_unenrolled_node_says_so_and_exits_2(consortium: tuple[Consortium, Path]) -> None:
    from consortia.common.node_keys import init_node_keys

    fed, _ = consortium
    node_toml = _node_toml(fed, "intruder", tls=True)
    init_node_keys(node_toml.parent / "state" / "keys")
    assert fed.start_node(node_toml, "intruder").wait(timeout=120) == 2
    assert "refused this node's key: it is not enrolled" in _one_error(fed, "intruder")


@pytest.mark.slow
def test_a_removed_node_says_why_it_stopped_and_exits_2(
    consortium: tuple[Consortium, Path],
) -> None:
    fed, _ = consortium
    node_toml = _node_toml(fed, "leaver", tls=True)
    fed.enroll("leaver", node_toml)
    process = fed.start_node(node_toml, "leaver")
    deadline = time.monotonic() + 120
    while "SuperNode ID:" not in (fed.root / "leaver.log").read_text(errors="replace"):
        assert time.monotonic() < deadline and process.poll() is None, "it never connected"
        time.sleep(0.5)
    removed = fed.consortia("coordinator", "nodes", "remove", "leaver", "--config", str(fed.config))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert process.wait(timeout=120) == 2  # was 0, and silent
    assert "ended this node's session" in _one_error(fed, "leaver")


@pytest.mark.slow
def test_a_node_without_tls_at_a_tls_coordinator_stops_with_the_cause(
    consortium: tuple[Consortium, Path],
) -> None:
    fed, _ = consortium
    node_toml = _node_toml(fed, "plain", tls=False)
    process = fed.start_node(node_toml, "plain")
    assert process.wait(timeout=120) == 2  # Flower alone retries forever
    assert "speaks TLS, but node.toml's [superlink] sets insecure = true" in _one_error(
        fed, "plain"
    )


@pytest.mark.slow
def test_a_job_every_node_refuses_fails_in_one_line(consortium: tuple[Consortium, Path]) -> None:
    fed, _ = consortium
    job = write_job(fed.root / "refused.toml", 0.5, min_nodes=1, rounds=1)  # logreg; it allows mlp
    result = fed.submit(job)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "model-not-allowed" in output
    assert "Traceback" not in output and "unhandled exception" not in output, output
    assert "error: " in output


def test_a_401_inside_a_port_or_a_timing_is_no_refusal(tmp_path: Path) -> None:
    """Flower's lines carry random ports and timings: only an HTTP 401 is a refused key."""
    quiet = _watched(
        tmp_path / "quiet",
        "INFO :      Starting Flower SuperNode on 127.0.0.1:54017\n",
        "WARNING :   Connection attempt failed, retrying in 0.401 seconds\n",
    )
    assert not quiet.refused
    refused = _watched(
        tmp_path / "refused",
        "ERROR : Client error '401 Unauthorized' for url 'https://127.0.0.1:9093/x'\n",
    )
    assert refused.refused
