"""Who holds a TCP port, so that a service refuses to start with a name instead of a log line.

A SuperLink (or SuperNode) that cannot bind its port writes "address already
in use" to its own log and exits; its supervisor would have announced it as
listening if the port answered, because something else answers there. So the
services check the port before they start anything, and name what holds it:
on Linux the processes with a listening socket on it, read from /proc (those
of other users only when run as root); elsewhere just that it is taken.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from pathlib import Path

from consortia.common.errors import FederationError

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp
_COMMAND_CHARS = 160


@dataclass(frozen=True)
class PortHolder:
    """A process with a listening socket on the port."""

    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


def port_holders(port: int) -> list[PortHolder]:
    """The processes listening on TCP `port` (any address), as far as this user can see them."""
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    sockets = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and not sockets.isdisjoint(_open_files(entry)):
            holders.append(PortHolder(pid=int(entry.name), command=_command(entry)))
    return sorted(holders, key=lambda h: h.pid)


def describe_holders(port: int) -> str:
    """Who holds `port`, for a message: the processes, or why they cannot be named."""
    holders = port_holders(port)
    if holders:
        return ", ".join(map(str, holders))
    return f"a process this user cannot see (as root: ss -ltnp 'sport = :{port}')"


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise a `FederationError` naming the holder if `host:port` cannot be listened on."""
    holder = port_taken_by(host, port, what)
    if holder is not None:
        raise FederationError(
            f"{what}: port {port} is already in use, held by {holder}; stop that process "
            "(or choose another port) and start again"
        )


def port_taken_by(host: str, port: int, what: str) -> str | None:
    """None if `host:port` can be listened on, else who holds it (`describe_holders`).

    `what` names the service in the error raised when the address itself is unusable.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise FederationError(f"{what}: cannot resolve host {host!r} ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        # As the servers do: a port left in TIME_WAIT by a stopped server is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return describe_holders(port)
            raise FederationError(
                f"{what}: cannot listen on {host}:{port} ({exc.strerror})"
            ) from None
    return None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def _open_files(process: Path) -> set[str]:
    """What the process's file descriptors point at (empty: gone, or another user's)."""
    found: set[str] = set()
    try:
        descriptors = list((process / "fd").iterdir())
    except OSError:
        return found
    for descriptor in descriptors:
        try:
            found.add(str(descriptor.readlink()))
        except OSError:  # closed meanwhile
            continue
    return found


def _command(process: Path) -> str:
    try:
        raw = (process / "cmdline").read_bytes()
    except OSError:
        return "?"
    parts = (part.decode(errors="replace") for part in raw.split(b"\0"))
    command = " ".join(" ".join(parts).split())
    if len(command) > _COMMAND_CHARS:
        command = command[: _COMMAND_CHARS - 1] + "…"
    return command or "?"
