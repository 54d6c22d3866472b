"""Children that end with the service that started them.

`consortia coordinator start` and `consortia node start` supervise Flower's
processes (SuperLink, SuperNode), each in a session of its own so that a
stop can end its whole group. A supervisor killed with SIGKILL stops
nothing, and its children would live on as orphans: a SuperLink still
serving the coordinator's port, a SuperNode still holding the node's
session. So each child is started as
`python -m consortia.common.parent_death PID -- COMMAND...` (`supervised`
builds that line), which asks Linux (prctl PR_SET_PDEATHSIG) to send the
process SIGTERM when the thread that started it dies, then execs COMMAND.
The setting survives exec: COMMAND itself gets SIGTERM and ends as on a
normal stop (a SuperNode signs off from the SuperLink; a SuperLink ends, and
its SuperExec, which watches its parent pid, follows). A parent already gone
before the setting took (pid check) means COMMAND is not started at all.

Elsewhere than Linux there is no parent-death signal: the wrapper only execs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> bool:
    """Have this process get SIGTERM when its parent dies; False where the OS cannot.

    Exits at once if the parent is already gone (this process was reparented).
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:
        raise SystemExit(f"the service that started this process (pid {parent_pid}) is gone")
    return True


def supervised(command: list[str]) -> list[str]:
    """`command` as a child of this process that ends when this process dies."""
    return [sys.executable, "-m", "consortia.common.parent_death", str(os.getpid()), "--", *command]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        raise SystemExit("usage: python -m consortia.common.parent_death PARENT_PID -- COMMAND...")
    command = args[2:]
    die_with_parent(int(args[0]))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
