"""`consortia coordinator start`: flower-superlink as a supervised, locked-down service.

The service process stays in the foreground (as systemd or a container
expects), starts Flower's SuperLink through `consortia.server.coordinator.
superlink` (the SuperLink plus the gatekeeper), appends its output to
`<state_dir>/logs/coordinator.log`, records start and stop in the audit log,
re-registers enrolled node keys the SuperLink database lacks (for instance
after the database was restored from a backup), and on SIGTERM/SIGINT stops
the SuperLink and everything it started.

With a `[metrics]` block it also serves Prometheus metrics on a port of its
own (`consortia.server.coordinator.metrics`), started before the SuperLink
so that a taken port fails the start.

What is switched on, always: TLS with the coordinator's certificate,
SuperNode authentication (only enrolled keys join), a persistent state
database, no runtime dependency installation, no telemetry, and the codeguard
(the ServerApp loads from the installed consortia, never from a FAB).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from consortia.common.atomic import write_bytes_atomic
from consortia.common.codeguard import guarded_environment
from consortia.common.errors import ConfigError, FederationError
from consortia.common.metrics_http import MetricsServer
from consortia.common.parent_death import supervised
from consortia.common.ports import check_port_free, port_holders
from consortia.server.coordinator.config import (
    CoordinatorConfig,
    audit_log,
    load_coordinator_config,
)

CONFIG_ENV = "CONSORTIA_COORDINATOR_CONFIG"
_READY_TIMEOUT_S = 60.0


def coordinator_from_environment() -> CoordinatorConfig | None:
    """The coordinator this process serves, when started under `consortia coordinator start`."""
    path = os.environ.get(CONFIG_ENV)
    return load_coordinator_config(Path(path)) if path else None


def running_pid(config: CoordinatorConfig) -> int | None:
    """The pid of this coordinator's live service process, if there is one."""
    try:
        pid = int(config.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def superlink_command(config: CoordinatorConfig, insecure: bool) -> list[str]:
    """The SuperLink command line: persistent database, TLS and node authentication."""
    command = [
        sys.executable,
        "-m",
        "consortia.server.coordinator.superlink",
        "--database",
        str(config.database),
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        return [*command, "--insecure"]
    assert config.tls is not None  # checked by `check_start`
    return [
        *command,
        "--ssl-certfile",
        str(config.tls.certfile),
        "--ssl-keyfile",
        str(config.tls.keyfile),
        "--ssl-ca-certfile",
        str(config.tls.ca_certfile),
        "--enable-supernode-auth",
    ]


def check_start(config: CoordinatorConfig, source: Path, insecure: bool) -> None:
    """Refuse an unsafe or ambiguous start before anything is launched."""
    if insecure and config.tls is not None:
        raise ConfigError(
            f"{source} configures [tls] but --insecure was given; drop --insecure (or the "
            "[tls] block, for local development)"
        )
    if not insecure and config.tls is None:
        raise ConfigError(
            f"{source} has no [tls] block: create certificates with `consortia provision ca` "
            "and `consortia provision coordinator`, or pass --insecure (local development "
            "only: no encryption, no node authentication)"
        )
    if config.tls is not None:
        from consortia.common.pki import check_server_certificate

        check_server_certificate(config.tls.certfile, config.tls.keyfile, config.tls.ca_certfile)
    pid = running_pid(config)
    if pid is not None:
        raise FederationError(
            f"coordinator {config.name} is already running (pid {pid}, {config.pid_file})"
        )


def serve(config_path: Path, insecure: bool, announce: Callable[[str], None]) -> int:
    """Run the coordinator until SIGTERM/SIGINT or the SuperLink's exit; its exit code."""
    config = load_coordinator_config(config_path)
    check_start(config, config_path, insecure)
    # Not in `check_start`: the port is checked only right before it is taken.
    check_port_free(config.host, config.port, f"coordinator {config.name}")
    config.logs_dir.mkdir(parents=True, exist_ok=True)
    (config.state_dir / "flwr-home").mkdir(parents=True, exist_ok=True)
    env = guarded_environment(
        {
            **os.environ,
            CONFIG_ENV: str(config_path.resolve()),
            "FLWR_HOME": str(config.state_dir / "flwr-home"),
        }
    )
    audit = audit_log(config)
    log_path = config.logs_dir / "coordinator.log"
    metrics = _metrics_server(config)  # bound before the SuperLink starts: a taken port fails here
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            supervised(superlink_command(config, insecure)),  # ends if this service is killed
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    write_bytes_atomic(config.pid_file, f"{os.getpid()}\n".encode())
    stop = _forward_signals(process)
    try:
        _wait_ready(config, process, log_path)
        audit.append(
            "coordinator.started",
            address=f"{config.host}:{config.port}",
            tls=not insecure,
            node_authentication=not insecure,
            pid=process.pid,
        )
        announce(
            f"coordinator {config.name} listening on {config.host}:{config.port} "
            f"({'INSECURE, local development only' if insecure else 'TLS, node authentication'})"
            f"; log: {log_path}"
        )
        if config.metrics is not None:
            announce(f"coordinator {config.name}: Prometheus metrics at {config.metrics.url}")
        if not insecure:
            _restore_enrollment(config)
        code = process.wait()
    finally:
        _stop(process)
        if metrics is not None:
            metrics.stop()
        config.pid_file.unlink(missing_ok=True)
        audit.append("coordinator.stopped", exit_code=process.returncode, signal=stop.get("sig"))
    return 0 if stop.get("sig") else int(code)


def _metrics_server(config: CoordinatorConfig) -> MetricsServer | None:
    """The `[metrics]` endpoint, serving (None without the block)."""
    if config.metrics is None:
        return None
    from consortia.server.coordinator.metrics import CoordinatorCollector, control_node_states

    collector = CoordinatorCollector(config, control_node_states(config))
    server = MetricsServer(config.metrics, collector, f"coordinator {config.name}")
    server.start()
    return server


def _wait_ready(config: CoordinatorConfig, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the SuperLink accepts connections; fail with its last log lines if it dies."""
    host, port = config.local_address.rsplit(":", 1)
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise FederationError(f"flower-superlink exited with {process.returncode}:\n{tail}")
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
            if s.connect_ex((host.strip("[]"), int(port))) == 0:
                _check_listener(config, process)
                return
        time.sleep(0.2)
    raise FederationError(f"flower-superlink did not open {config.local_address} in 60 s")


def _check_listener(config: CoordinatorConfig, process: subprocess.Popen[bytes]) -> None:
    """The port answers: make sure it is this SuperLink that answers, not another process.

    Another process can take the port between the check before the start and
    the SuperLink's bind; the SuperLink then exits, which its log alone would say.
    """
    holders = port_holders(config.port)
    if process.poll() is None and (not holders or process.pid in {h.pid for h in holders}):
        return
    held = ", ".join(map(str, holders)) or "another process"
    raise FederationError(
        f"coordinator {config.name}: port {config.port} is held by {held}, not by this "
        "coordinator's SuperLink; stop that process and start again"
    )


def _restore_enrollment(config: CoordinatorConfig) -> None:
    """Register enrolled keys the SuperLink does not know (its database was replaced)."""
    from consortia.server.coordinator.control import Control
    from consortia.server.coordinator.enrollment import Enrollment, admin_target

    with Control(admin_target(config)) as control:
        Enrollment(config).reconcile(control)


def _forward_signals(process: subprocess.Popen[bytes]) -> dict[str, int]:
    """SIGTERM/SIGINT to the service stop the SuperLink (and the service after it)."""
    received: dict[str, int] = {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        received["sig"] = signum
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return received


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the SuperLink's process group; the SuperExec it started stops with it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
