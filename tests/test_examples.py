"""docs/examples: the complete consortium on one machine, its walk-through run as written.

The commands come from docs/examples/README.md's walk-through block and run
verbatim (`consortia` is this checkout's command line) in a temporary copy
of the folder, as the README tells a reader to work; the ports are free ones,
put in by the edit the README documents for ports that are taken. A command
marked `# own terminal` runs in the background, as in a terminal of its own,
until it says it is ready; Ctrl-C (SIGINT to its process group, as a
terminal sends it) stops it at the end. Real processes on 127.0.0.1: the
coordinator's flower-superlink, two `consortia node start` SuperNodes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from federation import Federation, free_port

EXAMPLES = REPO_ROOT / "docs" / "examples"
README = (EXAMPLES / "README.md").read_text()
FOREGROUND = "# own terminal"
# What the README says each foreground command prints once it is ready.
READY = {"coordinator": "listening on", "node": "connecting to"}
CLI = [sys.executable, "-m", "consortia.cli.main"]
# A line printed by a root logging handler (basicConfig's or Opacus' format): a duplicate.
_ROOT_FORMAT = re.compile(r"(^|:)(DEBUG|INFO|WARNING|ERROR|CRITICAL):")


def walkthrough() -> list[str]:
    """The commands of the README's walk-through block, in order."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    (block,) = [b for b in blocks if "consortia coordinator start" in b]
    lines = [line.strip() for line in block.splitlines()]
    assert not [line for line in lines if line.endswith("\\")], "one command per line"
    return [line for line in lines if line and not line.startswith("#")]


def _example_files() -> list[str]:
    """docs/examples as the repository holds it (nothing a local run left there)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "docs/examples"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listed.split("\0") if name]


def _copy_examples(destination: Path) -> Path:
    for name in _example_files():
        target = destination / Path(name).relative_to("docs/examples")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO_ROOT / name).read_bytes())
    return destination


def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: expected one {old!r}"
    path.write_text(text.replace(old, new))


def _use_free_ports(folder: Path, coordinator_port: int) -> list[int]:
    """The README's edit for taken ports: `port`, the nodes' `address` and `runtime_port`."""
    _replace_once(folder / "coordinator.toml", "port = 9093", f"port = {coordinator_port}")
    ports = [coordinator_port]
    for site, runtime_port in (("st-mary", 9094), ("riverside", 9095)):
        node_toml = folder / site / "node.toml"
        address = f'address = "127.0.0.1:{coordinator_port}"'
        _replace_once(node_toml, 'address = "127.0.0.1:9093"', address)
        ports.append(free_port())
        _replace_once(node_toml, f"runtime_port = {runtime_port}", f"runtime_port = {ports[-1]}")
    return ports


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"ended before {text!r}:\n" + log.read_text(errors="replace"))
        time.sleep(0.3)
    raise AssertionError(f"no {text!r} in 120 s:\n" + log.read_text(errors="replace"))


def _leftovers(marks: list[str]) -> list[str]:
    """Live processes whose command line names the copy's folder or one of its ports."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(mark in cmdline for mark in marks):
                found.append(f"{entry.name}: {cmdline}")
    return found


def _kill_leftovers(marks: list[str]) -> None:
    for line in _leftovers(marks):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def test_the_walkthrough_has_every_step() -> None:
    commands = walkthrough()
    steps = [
        "consortia provision ca",
        "consortia provision coordinator",
        "consortia coordinator start",
        "consortia node keys init",
        "consortia coordinator nodes add",
        "consortia node data add",
        "consortia node start",
        "consortia job submit",
    ]
    firsts = [next(i for i, c in enumerate(commands) if c.startswith(step)) for step in steps]
    assert firsts == sorted(firsts), commands
    for ready in READY.values():
        assert f"`{ready}`" in README


def test_make_data_writes_the_committed_csvs_again(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    assert spec is not None and spec.loader is not None
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    written = make_data.write_exports(tmp_path)
    assert [path.relative_to(tmp_path).as_posix() for path in written] == [
        "st-mary/cardio.csv",
        "riverside/cardio.csv",
    ]
    for path in written:
        committed = EXAMPLES / path.relative_to(tmp_path)
        assert path.read_bytes() == committed.read_bytes()
        assert 200 <= len(committed.read_text().splitlines()) <= 500


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    folder = _copy_examples(tmp_path / "consortium")
    ports = _use_free_ports(folder, fed.port)
    marks = [str(tmp_path), *(f":{port}" for port in ports)]
    foreground: list[subprocess.Popen[bytes]] = []
    outputs: dict[str, str] = {}
    try:
        for number, command in enumerate(walkthrough()):
            args = shlex.split(command, comments=True)
            assert args[0] == "consortia", command
            if FOREGROUND in command:
                log = f"{number:02d}-{args[1]}.log"
                process = fed.spawn([*CLI, *args[1:]], log, cwd=folder)
                _wait_for(fed.root / log, READY[args[1]], process)
                foreground.append(process)
                continue
            result = subprocess.run(
                [*CLI, *args[1:]],
                cwd=folder,
                env={**fed.env, "COLUMNS": "200"},
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            outputs[command] = result.stdout + result.stderr
            assert result.returncode == 0, f"{command}\n{outputs[command]}"

        # The job trained on both nodes, within the job's ε, and printed its progress once.
        (submitted,) = [out for c, out in outputs.items() if c.startswith("consortia job submit")]
        (run_dir,) = (folder / "coordinator-state" / "runs").iterdir()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
        assert sorted(metrics["final"]["epsilon"]) == ["riverside", "st-mary"]
        assert max(metrics["final"]["epsilon"].values()) <= 1.0
        for round_ in (1, 2, 3):
            assert submitted.count(f"consortia: round {round_} accuracy=") == 1, submitted
        assert not [line for line in submitted.splitlines() if _ROOT_FORMAT.search(line)]
        for command, output in outputs.items():
            assert "Using SuperLink" not in output, f"{command}\n{output}"
            if command.startswith("consortia node ledger show"):
                assert "cardio" in output, output

        # Ctrl-C in each terminal, the nodes first: each ends, and everything it started.
        for process in reversed(foreground):
            os.killpg(process.pid, signal.SIGINT)
            process.wait(timeout=90)
        deadline = time.monotonic() + 30
        while _leftovers(marks) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _leftovers(marks)
    finally:
        fed.stop()
        _kill_leftovers(marks)
