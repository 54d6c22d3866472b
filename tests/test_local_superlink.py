"""The README's stop for the SuperLink `flwr run .` leaves behind ends that one, and no other.

`pkill -f flower-superlink` ended every SuperLink on a shared host. Two
local SuperLinks are started the way `flwr run .` starts one (Flower's
default `:local:` connection, here through `flwr ls`), for two FLWR_HOMEs
on ports of their own; the README's command, run verbatim for one of them,
must end that one and leave the other serving.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import REPO_ROOT
from federation import free_port

_README = (REPO_ROOT / "README.md").read_text()


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", _README, flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_kills_no_flower_process_by_name() -> None:
    assert not re.search(r"\b(pkill|killall)\b[^\n]*flower", _README, flags=re.IGNORECASE)
    assert "consortia local-superlink stop" in _readme_commands()


class _LocalSuperLink:
    """Flower's managed local SuperLink for one FLWR_HOME, on ports of its own."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        }

    def start(self) -> None:
        """`flwr ls` on the default connection starts it, as `flwr run .` does."""
        listed = subprocess.run(
            ["flwr", "ls"], env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert self.serving()

    def serving(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).is_success
        except httpx.HTTPError:
            return False

    def processes(self) -> list[int]:
        """Live processes naming this FLWR_HOME (the SuperLink) or its port (its SuperExec)."""
        marks = (str(self.home).encode(), f"127.0.0.1:{self.port}\0".encode())
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
                if any(mark in cmdline for mark in marks):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
        return found

    def stop_with_readme_command(self) -> subprocess.CompletedProcess[str]:
        (command,) = [c for c in _readme_commands() if c.startswith("consortia local-superlink")]
        args = shlex.split(command)
        return subprocess.run(
            [sys.executable, "-m", "consortia.cli.main", *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture
def two_local_superlinks(tmp_path: Path) -> Iterator[tuple[_LocalSuperLink, _LocalSuperLink]]:
    mine, other = _LocalSuperLink(tmp_path / "mine"), _LocalSuperLink(tmp_path / "other")
    try:
        mine.start()
        other.start()
        yield mine, other
    finally:
        for link in (mine, other):
            for pid in link.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_readme_stop_ends_only_this_flwr_homes_superlink(
    two_local_superlinks: tuple[_LocalSuperLink, _LocalSuperLink],
) -> None:
    mine, other = two_local_superlinks
    assert mine.processes() and other.processes()
    stopped = mine.stop_with_readme_command()
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped the local SuperLink" in stopped.stdout
    assert not mine.serving() and not mine.processes()
    assert other.serving() and other.processes()
    again = mine.stop_with_readme_command()
    assert again.returncode == 0 and "no local SuperLink" in again.stdout, again.stdout
    assert other.stop_with_readme_command().returncode == 0
    assert not other.serving() and not other.processes()
