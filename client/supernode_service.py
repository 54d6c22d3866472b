"""`consortia node start`: flower-supernode and consortia's ClientApp worker, supervised.

The service runs Flower's SuperNode, through `consortia.client.supernode_launcher`
(its fixed waits shortened, `poll_interval_s` during a job) with `--isolation process`,
and beside it `consortia.client.clientapp_worker`, the one long-lived
process that runs the ClientApp for every message (see that module for why).
Both get the codeguard environment (`consortia.common.codeguard`). `--stock`
(a benchmark and debugging switch) runs Flower's own path instead: a bare
flower-supernode whose SuperExec starts one `flwr-clientapp` per message.

Both processes' output is passed through unchanged, a line at a time. The
SuperNode's is also read for the three facts an auditor of the node asks
about: the node joined the coordinator (Flower logs its node id), the
coordinator refused the node's key (not enrolled, or removed), or the node
refused the coordinator (its certificate does not chain to the CA this node
trusts). Each lands in the node's audit log.

With a `[metrics]` block in node.toml the service also serves the node's
Prometheus metrics (`consortia.client.node_metrics`) while it runs, and the
worker keeps its figures for it in the state folder (`--metrics-file`).

SIGTERM/SIGINT stop both. The node lives as long as its SuperNode: when it
exits, the worker is stopped; a worker that dies on its own (a crash, the
OOM killer) is restarted, with a growing pause if it keeps dying. A service
killed outright (SIGKILL) takes both with it: the SuperNode gets SIGTERM from
the kernel (`consortia.common.parent_death`) and signs off, the worker
watches this process's pid.

A node restarted after a kill finds the SuperLink still counting its old
session as active for up to a minute, and its activation refused (HTTP 412):
the service then starts the SuperNode again every few seconds until that
session lapses, saying why in one line (`supervise`, `SessionMark`).

The same facts end the service with one line naming the cause and the fix
(`NodeStoppedError`, exit code 2), where Flower says only "[code: 2004]
Failed to activate SuperNode" or, for a node the coordinator removed,
nothing at all (its SuperNode ends itself "gracefully", exit code 0). A
failed connection attempt also has the coordinator's port probed
(`consortia.client.link_probe`): a node without TLS pointed at a TLS
coordinator, which Flower would retry forever, is stopped with the cause;
a coordinator that is merely down is still waited for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from consortia.client.link_probe import tls_mismatch
from consortia.client.node_audit import node_audit_log
from consortia.client.node_config import NODE_CONFIG_KEY, NodeConfig, SuperLinkConfig
from consortia.client.node_session import OpenSession, SessionMark
from consortia.common.audit import AuditLog
from consortia.common.codeguard import guarded_environment
from consortia.common.errors import ConfigError, FederationError
from consortia.common.metrics_http import MetricsServer
from consortia.common.parent_death import supervised

# Flower's own log lines, and what each means for the audit trail.
_JOINED = "SuperNode ID:"
_UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")
# The SuperLink refused the activation: a key it does not know (HTTP 412 when it knows
# none such, as for an unenrolled or removed key), or this node's previous session
# still active (also 412); `supervise` tells them apart by the node's `SessionMark`.
_ACTIVATION_REFUSED = "Failed to activate SuperNode"
# httpx words a 401 "Client error '401 Unauthorized' for url …"; a bare "401" would match
# port numbers and timings in unrelated lines (54017, 0.401 s).
_REFUSED = ("Invalid SuperNode authentication", "401 Unauthorized")
_ACTIVATION_RETRY_S = 5.0
_RETRYING = "Connection attempt failed"  # Flower's warning before each reconnection wait
_PROBE_EVERY_S = 5.0  # at most one probe of the coordinator's port per this many seconds
_ACTIVATION_SLACK_S = 15.0  # beyond Flower's heartbeat window: a late last heartbeat, clocks

_WORKER_STOP_S = 10.0  # SIGTERM, then SIGKILL after this long
_RESTART_FIRST_S = 1.0
_RESTART_MAX_S = 30.0
_RESTART_HEALTHY_S = 60.0  # a worker that ran this long restarts after the shortest pause


@dataclass(frozen=True)
class NodeCommands:
    """The processes of a node: the SuperNode, and the worker (None on Flower's stock path)."""

    supernode: list[str]
    worker: list[str] | None


def node_commands(
    config: NodeConfig,
    node_toml: Path,
    auth_private_key: Path | None,
    *,
    stock: bool = False,
) -> NodeCommands:
    """The command lines `consortia node start` runs for `config`.

    `auth_private_key` is None only for an insecure (plain HTTP) link.
    """
    link = config.superlink
    args = ["--superlink", link.address]
    if link.insecure:
        args.append("--insecure")
    else:
        if link.root_certificates is not None:
            args += ["--root-certificates", str(link.root_certificates)]
        if auth_private_key is not None:
            args += ["--auth-supernode-private-key", str(auth_private_key)]
    args += ["--node-config", f'{NODE_CONFIG_KEY}="{node_toml.resolve()}"']
    args += ["--port", str(config.runtime_port)]
    if stock:
        executable = shutil.which("flower-supernode")
        if executable is None:
            raise ConfigError(
                "flower-supernode is not on PATH; install consortia in this environment"
            )
        return NodeCommands([executable, *args], None)
    poll = ["--poll-interval-s", repr(config.poll_interval_s)]
    heartbeat = ["--heartbeat-interval-s", repr(link.heartbeat_interval_s)]
    launcher = [sys.executable, "-m", "consortia.client.supernode_launcher", *poll, *heartbeat]
    supernode = [*launcher, *args]
    worker = [
        sys.executable,
        "-m",
        "consortia.client.clientapp_worker",
        "--runtime-api-address",
        f"127.0.0.1:{config.runtime_port}",
        *poll,
    ]
    if config.metrics is not None:
        worker += ["--metrics-file", str(config.worker_metrics_file)]
    return NodeCommands([*supernode, "--isolation", "process"], worker)


class NodeStoppedError(FederationError):
    """The SuperNode ended for a reason the node's operator must act on (named in the message)."""


def supervise(config: NodeConfig, commands: NodeCommands) -> int:
    """Run the node's processes until the SuperNode exits or the service is stopped.

    A SuperNode whose activation is refused while this node's last session
    was never signed off (`SessionMark`) is started again every few seconds
    until the SuperLink lets that session lapse (its missed heartbeats, about a
    minute); the node says so in one line. Returns the SuperNode's exit code
    (0 when stopped by a signal). Raises `NodeStoppedError` when it ended for
    a known cause (see the module).
    """
    audit = node_audit_log(config)
    env = guarded_environment()
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the node's log as they are written
    output = _Output()
    session = SessionMark(config.state_dir)
    watcher = ConnectionWatcher(audit, config.superlink.address, session, link=config.superlink)
    supernode = _SuperNode(commands.supernode, env, output, watcher)
    watcher.stop = supernode.stop  # a TLS mismatch ends the SuperNode (Flower would retry forever)
    worker = (
        None
        if commands.worker is None
        else _Worker([*commands.worker, "--parent-pid", str(os.getpid())], env, output)
    )
    stopped: dict[str, int] = {}

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopped["signal"] = signum
        supernode.stop()
        if worker is not None:
            worker.stop(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with _metrics_endpoint(config):
        return _supervised(supernode, worker, watcher, session, output, stopped)


@contextlib.contextmanager
def _metrics_endpoint(config: NodeConfig) -> Iterator[None]:
    """The node's `[metrics]` endpoint serves while the node runs (nothing without the block)."""
    if config.metrics is None:
        yield
        return
    from consortia.client.node_metrics import NodeCollector

    server = MetricsServer(config.metrics, NodeCollector(config), f"node {config.name}")
    server.start()
    try:
        yield
    finally:
        server.stop()


def _supervised(
    supernode: _SuperNode,
    worker: _Worker | None,
    watcher: ConnectionWatcher,
    session: SessionMark,
    output: _Output,
    stopped: dict[str, int],
) -> int:
    """`supervise`'s loop, once its processes and signal handlers are set up."""
    if worker is not None:
        worker.start()
    deadline: float | None = None
    waited_from = 0.0
    while True:
        code = supernode.run()
        previous = session.unfinished()
        if stopped or watcher.joined or not watcher.activation_refused or previous is None:
            break
        now = time.monotonic()
        if deadline is None:
            waited_from = now
            deadline = now + previous.window_s + _ACTIVATION_SLACK_S
            output.echo_line(_still_active_line(previous, deadline - now))
        if now >= deadline:
            output.echo_line(
                f"consortia node: activation still refused after {now - waited_from:.0f} s, "
                "past Flower's heartbeat window: the coordinator does not accept this node's "
                "key (not enrolled, or removed); ask its operator\n"
            )
            break
        watcher.deferred(previous)
        if supernode.pause(_ACTIVATION_RETRY_S):
            break  # stopped meanwhile
    if watcher.joined and code != -signal.SIGKILL:
        session.closed()  # the SuperNode ended by itself: it signed off first
    if worker is not None:
        worker.stop(wait=True)
    watcher.finish(code, stopped.get("signal"))
    if stopped:
        return 0
    cause = watcher.cause(code)
    if cause is not None:
        raise NodeStoppedError(cause)
    return code


def _still_active_line(previous: OpenSession, wait_s: float) -> str:
    return (
        "consortia node: the coordinator refused to activate this node because its previous "
        f"session (node id {previous.node_id}) still counts as active: that session ended "
        "without signing off (killed or crashed), and Flower keeps it until its heartbeats "
        f"lapse (up to {previous.window_s:.0f} s); retrying every {_ACTIVATION_RETRY_S:g} s "
        f"for up to {wait_s:.0f} s\n"
    )


class _SuperNode:
    """The SuperNode process: one attempt at a time, its output echoed and watched."""

    def __init__(
        self, command: list[str], env: dict[str, str], output: _Output, watcher: ConnectionWatcher
    ) -> None:
        self.command = command
        self.env = env
        self.output = output
        self.watcher = watcher
        self._process: subprocess.Popen[bytes] | None = None
        # A plain flag: `stop` runs in a signal handler on the main thread, which may be
        # inside `pause` (a lock there, as in threading.Event, could deadlock).
        self._stopping = False

    def run(self) -> int:
        """Start the SuperNode, wait for it to end; its exit code."""
        self.watcher.attempt()
        process = subprocess.Popen(
            supervised(self.command),  # ends if this service is killed
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        self._process = process
        if self._stopping:  # a stop that came before there was a process to end
            self._terminate(process)
        assert process.stdout is not None
        reader = threading.Thread(
            target=self.watcher.follow, args=(self.output.echo(process.stdout),), daemon=True
        )
        reader.start()
        code = process.wait()
        # On Flower's stock path the SuperExec shares the SuperNode's session and pipe: end them.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        reader.join(timeout=10)
        return code

    def pause(self, seconds: float) -> bool:
        """Wait before the next attempt; True if the service was stopped meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        return self._stopping

    def stop(self) -> None:
        self._stopping = True
        if self._process is not None:
            self._terminate(self._process)

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)


class _Output:
    """The node's stdout, shared by the readers of its processes: whole lines, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def echo(self, stream: Iterable[bytes]) -> Iterable[str]:
        """Each line of `stream`, passed on to this process's stdout."""
        for raw in stream:
            with self._lock:
                sys.stdout.buffer.write(raw)
                sys.stdout.flush()
            yield raw.decode("utf-8", errors="replace")

    def drain(self, stream: IO[bytes]) -> None:
        for _ in self.echo(stream):
            pass

    def echo_line(self, line: str) -> None:
        """A line of the service's own."""
        with self._lock:
            sys.stdout.write(line)
            sys.stdout.flush()


class _Worker:
    """The ClientApp worker process: started, restarted if it dies on its own, stopped."""

    def __init__(self, command: list[str], env: dict[str, str], output: _Output) -> None:
        self.command = command
        self.env = env
        self.output = output
        self._stopping = threading.Event()
        self._lock = threading.RLock()  # also taken by the signal handler, on the main thread
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="clientapp-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        pause = _RESTART_FIRST_S
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                process = subprocess.Popen(
                    self.command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,
                )
                self._process = process
            started = time.monotonic()
            assert process.stdout is not None
            self.output.drain(process.stdout)
            code = process.wait()
            if self._stopping.is_set():
                return
            pause = _RESTART_FIRST_S if time.monotonic() - started > _RESTART_HEALTHY_S else pause
            self.output.echo_line(
                f"consortia node: the ClientApp worker exited (code {code}); "
                f"restarting it in {pause:g} s\n"
            )
            if self._stopping.wait(pause):
                return
            pause = min(pause * 2, _RESTART_MAX_S)

    def stop(self, *, wait: bool) -> None:
        """SIGTERM the worker; with `wait`, until it exits (SIGKILL after a grace period)."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        if not wait:
            return
        try:
            process.wait(timeout=_WORKER_STOP_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self._thread.join(timeout=_WORKER_STOP_S)


class ConnectionWatcher:
    """Turns the SuperNode's log lines into node-side audit entries, and notes its session."""

    def __init__(
        self,
        audit: AuditLog,
        coordinator: str,
        session: SessionMark | None = None,
        *,
        link: SuperLinkConfig | None = None,
        stop: Callable[[], None] | None = None,
    ) -> None:
        """`link` (how the node reaches the coordinator) enables the probe of the
        coordinator's port after a failed connection attempt; `stop` ends the
        SuperNode when the probe finds a TLS mismatch."""
        self.audit = audit
        self.coordinator = coordinator
        self.session = session
        self.link = link
        self.stop = stop
        self.mismatch: str | None = None
        self._probing = threading.Lock()
        self._last_probe = -_PROBE_EVERY_S
        self.untrusted = False
        self.refused = False
        self.joined = False
        self.activation_refused = False  # by the current attempt; recorded once it is settled
        self._deferred = False

    def attempt(self) -> None:
        """A new SuperNode process starts; a refused activation before it is settled."""
        self._settle_activation()
        self.activation_refused = False

    def follow(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.see(line)

    def see(self, line: str) -> None:
        if _RETRYING in line:
            self._probe_soon()
        if _JOINED in line:
            node_id = line.split(_JOINED, 1)[1].strip()
            self.joined = True
            self.audit.append("node.connected", coordinator=self.coordinator, node_id=node_id)
            if self.session is not None:
                interval = (self.link or SuperLinkConfig()).heartbeat_interval_s
                self.session.opened(self.coordinator, node_id, interval)
        elif not self.untrusted and any(marker in line for marker in _UNTRUSTED):
            self.untrusted = True
            self.audit.append(
                "coordinator.untrusted",
                coordinator=self.coordinator,
                reason="its TLS certificate does not chain to this node's root certificates",
            )
        elif _ACTIVATION_REFUSED in line:
            self.activation_refused = True
        elif not self.refused and any(marker in line for marker in _REFUSED):
            self._refused()

    def deferred(self, previous: OpenSession) -> None:
        """The refused activation is waited out: this node's last session is still open."""
        self.activation_refused = False
        if self._deferred:
            return
        self._deferred = True
        self.audit.append(
            "node.connection_deferred",
            coordinator=self.coordinator,
            previous_node_id=previous.node_id,
            reason="the coordinator still counts this node's previous session as active (it "
            "ended without signing off); retrying until its heartbeats lapse",
        )

    def _settle_activation(self) -> None:
        if self.activation_refused and not self.refused:
            self._refused()

    def _refused(self) -> None:
        self.refused = True
        self.audit.append(
            "node.connection_refused",
            coordinator=self.coordinator,
            reason="the coordinator refused this node's key (not enrolled, or removed)",
        )

    def finish(self, exit_code: int, stop_signal: int | None) -> None:
        self._settle_activation()
        if self.joined and stop_signal is None:
            # Flower ends a SuperNode "gracefully" when the SuperLink stops accepting its
            # key mid-session: the coordinator removed it (or shut down).
            self.audit.append(
                "node.disconnected",
                coordinator=self.coordinator,
                reason="the coordinator ended this node's session (node removed, or shut down)",
            )
        self.audit.append("node.stopped", exit_code=exit_code, signal=stop_signal)

    def _probe_soon(self) -> None:
        """Probe the coordinator's port in the background (not blocking the output)."""
        now = time.monotonic()
        if self.link is None or self.mismatch or now - self._last_probe < _PROBE_EVERY_S:
            return
        self._last_probe = now
        threading.Thread(target=self._probe, name="link-probe", daemon=True).start()

    def _probe(self) -> None:
        if self.link is None or not self._probing.acquire(blocking=False):
            return
        try:
            mismatch = tls_mismatch(self.link.address, self.link.insecure)
        finally:
            self._probing.release()
        if mismatch is not None and self.mismatch is None:
            self.mismatch = mismatch
            if self.stop is not None:
                self.stop()  # Flower would retry forever

    def cause(self, exit_code: int) -> str | None:
        """Why the SuperNode ended, as one sentence with the fix; None if not known."""
        self._settle_activation()  # a refused activation not waited out is a refused key
        where = f"the coordinator at {self.coordinator}"
        if self.mismatch is not None:
            return self.mismatch
        if self.untrusted:
            trusted = (
                "the system's CAs"
                if self.link is None or self.link.root_certificates is None
                else str(self.link.root_certificates)
            )
            return (
                f"{where} presented a TLS certificate that does not chain to {trusted}; set "
                "[superlink] root_certificates in node.toml to the consortium's ca.crt"
            )
        if self.joined and exit_code == 0:
            # Flower's SuperNode ends itself, exit code 0, on a 401 from the SuperLink mid-
            # session (flwr/supercore/retry/http_retry.py); a coordinator that is down is
            # retried instead. So: the node's key is no longer enrolled.
            return (
                f"{where} ended this node's session: it no longer accepts the node's key (the "
                "node was removed, or its enrollment lost); ask its operator to enroll the "
                "node's public key again (`consortia node keys show` prints it), then restart"
            )
        if self.refused and not self.joined:
            return (
                f"{where} refused this node's key: it is not enrolled (or was removed). Send "
                "the public key `consortia node keys show` prints to the coordinator's operator, "
                "compare fingerprints with them, and start the node once they have enrolled it"
            )
        if exit_code != 0 and not self.joined and self.link is not None:
            # Flower gives up at once on a TLS error (a TLS node, a plain coordinator).
            return tls_mismatch(self.link.address, self.link.insecure)
        return None
