"""Services that take their children with them, and a start that says what holds its port.

`consortia coordinator start` and `consortia node start` run Flower's
processes in sessions of their own. Killed with SIGKILL, a service can stop
nothing itself: the kernel's parent-death signal must (Linux). And a
coordinator whose port is taken must refuse to start, in the terminal,
naming the process that holds it, where it once announced "listening on…"
and then died with "address already in use" in its log only.

Real processes on 127.0.0.1 (TLS, node authentication); every one a test
starts is ended at its end.
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

import pytest
from consortium import Consortium, cancer_sites, start_consortium
from federation import descendants

from consortia.common.errors import FederationError
from consortia.common.ports import check_port_free

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal and /proc are Linux's"
)


def _alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead


def _wait(what: str, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s: {what}"
        time.sleep(0.1)


def _port_answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------ pieces


def test_a_supervised_child_ends_when_its_parent_is_killed() -> None:
    parent_code = (
        "import subprocess, sys, time\n"
        "from consortia.common.parent_death import supervised\n"
        "child = subprocess.Popen(\n"
        "    supervised([sys.executable, '-c', 'import time; time.sleep(600)']),\n"
        "    start_new_session=True,\n"
        ")\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # The wrapper has exec'd the command: same pid, the command's own line.
        _wait("the wrapper to exec", lambda: b"sleep(600)" in _cmdline(child), 30)
        parent.kill()
        parent.wait()
        _wait("the child to end with its parent", lambda: not _alive(child), 10)
    finally:
        _kill({parent.pid, child} - {0})
        parent.wait()


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def test_a_taken_port_is_refused_with_its_holder() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(FederationError) as refused:
            check_port_free("0.0.0.0", port, "coordinator c")
    message = refused.value.message
    assert message.startswith(f"coordinator c: port {port} is already in use, held by pid ")
    assert f"pid {os.getpid()} (" in message
    check_port_free("0.0.0.0", port, "coordinator c")  # closed: free again


# --------------------------------------------------------------- services


@pytest.mark.slow
def test_killed_services_leave_no_orphans_and_a_taken_port_is_named(tmp_path: Path) -> None:
    fed = Consortium(tmp_path)
    node_toml = cancer_sites(fed, ("st-mary",), 5.0)["st-mary"]
    leftovers: set[int] = set()
    try:
        start_consortium(fed, {"st-mary": node_toml})
        coordinator, node = fed.processes
        _wait(
            "the node to connect",
            lambda: any(e["event"] == "node.connected" for e in fed.audit_events()),
            120,
        )

        # The node's service, alone: its SuperNode and worker end with it.
        children = descendants([node.pid])
        leftovers |= children
        assert len(children) >= 2, children  # SuperNode, ClientApp worker
        os.kill(node.pid, signal.SIGKILL)
        node.wait()
        _wait(
            f"the node's processes {sorted(children)} to end",
            lambda: not any(_alive(pid) for pid in children),
            30,
        )

        # The coordinator's service, alone: its SuperLink and SuperExec end with it.
        children = descendants([coordinator.pid])
        leftovers |= children
        assert len(children) >= 2, children  # SuperLink, SuperExec
        os.kill(coordinator.pid, signal.SIGKILL)
        coordinator.wait()
        _wait(
            f"the coordinator's processes {sorted(children)} to end",
            lambda: not any(_alive(pid) for pid in children),
            30,
        )
        assert not _port_answers(fed.port)
        status = fed.consortia("coordinator", "status", "--config", str(fed.config))
        assert status.returncode == 1 and "not running" in status.stdout, status.stdout
        assert "held by" not in status.stdout

        # Something else takes the port: `status` and `start` name it.
        squatter = fed.spawn(
            [
                sys.executable,
                "-c",
                "import socket, time\n"
                "s = socket.socket()\n"
                "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('127.0.0.1', {fed.port}))\n"
                "s.listen()\n"
                "time.sleep(600)\n",
            ],
            "squatter.log",
        )
        _wait("the squatter to listen", lambda: _port_answers(fed.port), 30)
        status = fed.consortia("coordinator", "status", "--config", str(fed.config))
        assert status.returncode == 1, status.stdout + status.stderr
        assert f"port {fed.port} is held by pid {squatter.pid} (" in status.stdout, status.stdout
        started = fed.consortia("coordinator", "start", "--config", str(fed.config), timeout=120)
        assert started.returncode == 2, started.stdout + started.stderr
        assert "listening on" not in started.stdout
        error = " ".join(started.stderr.split())
        assert f"port {fed.port} is already in use, held by pid {squatter.pid} (" in error
        assert "Traceback" not in started.stderr
    finally:
        fed.stop()
        _kill({pid for pid in leftovers if _alive(pid)})  # what the old code left behind
