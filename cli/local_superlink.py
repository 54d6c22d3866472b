"""`consortia local-superlink stop`: end the SuperLink `flwr run` started for you, nothing else.

`flwr run .` with Flower's default connection (`address = ":local:"`)
starts a detached `flower-superlink` that outlives the run, and Flower has no
command to stop it. `pkill -f flower-superlink` ends every SuperLink on the
host, other users' and coordinators included. The one Flower started for
this user is precise to name: Flower gives it `--log-file
$FLWR_HOME/local-superlink/superlink.log` (FLWR_HOME defaults to ~/.flwr;
see flwr/cli/local_superlink.py), and it runs under this user's uid.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from consortia.common.errors import ConsortiaError

local_superlink_app = typer.Typer(
    help="The SuperLink that `flwr run` starts on this machine for a local simulation.",
    no_args_is_help=True,
)
console = Console(highlight=False, soft_wrap=True)

_PROC = Path("/proc")
_GRACE_S = 15.0


@local_superlink_app.command("stop")
def stop() -> None:
    """Stop the SuperLink `flwr run` started for this FLWR_HOME, and what it started; no other."""
    from flwr.supercore.utils import get_flwr_home

    log_file = (get_flwr_home() / "local-superlink" / "superlink.log").resolve()
    if not (_PROC / "self").is_dir():
        raise ConsortiaError(
            "consortia local-superlink stop reads Linux's /proc; here, end the flower-superlink "
            f"process whose --log-file is {log_file} with `kill PID`"
        )
    pids = local_superlinks(log_file)
    if not pids:
        console.print(f"no local SuperLink of {escape(str(log_file.parents[1]))} is running")
        return
    for pid in pids:
        stop_process_tree(pid)
        console.print(f"stopped the local SuperLink {pid} of {escape(str(log_file.parents[1]))}")


def local_superlinks(log_file: Path) -> list[int]:
    """This user's `flower-superlink` processes that log to `log_file`."""
    found = []
    for pid, argv, cwd in _own_processes():
        if not any(Path(arg).name == "flower-superlink" for arg in argv[:2]):
            continue
        logs = [value for flag, value in itertools.pairwise(argv) if flag == "--log-file"]
        if any((cwd / value).resolve() == log_file for value in logs):
            found.append(pid)
    return found


def stop_process_tree(pid: int) -> None:
    """SIGTERM `pid` (Flower shuts down gracefully), then SIGKILL what is left of its tree."""
    tree = [pid, *_descendants(pid)]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _all_gone(tree, _GRACE_S):
        return
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    _all_gone(tree, 5.0)


def _own_processes() -> list[tuple[int, list[str], Path]]:
    """(pid, argv, working folder) of every live process of this user."""
    processes = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            argv = [
                arg.decode(errors="replace")
                for arg in (entry / "cmdline").read_bytes().split(b"\0")
            ]
            cwd = (entry / "cwd").readlink()
        except OSError:  # it ended meanwhile
            continue
        processes.append((int(entry.name), argv, cwd))
    return processes


def _descendants(pid: int) -> list[int]:
    """Every live process `pid` started, directly or not (a snapshot of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _all_gone(pids: list[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (ended, not yet reaped) is gone."""
    try:
        state = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
