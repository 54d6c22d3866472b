"""One log format, the right levels, no duplicates, no Flower banner in consortia's output.

Opacus' `logging.basicConfig` (run when consortia imports it) put a root
handler beside Flower's: every Flower line printed twice and consortia's
progress came out as `…:WARNING:consortia: round 8 accuracy=…`. The
administration commands printed Flower's `Using SuperLink: …` banner.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import CliRunner, one_cli_error
from federation import free_port

from consortia.common.node_keys import init_node_keys

# A line in the format of a root handler (logging.basicConfig's default, or Opacus').
_ROOT_FORMAT = re.compile(r"(^|:)(DEBUG|INFO|WARNING|ERROR|CRITICAL):")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_SERVER_APP_LOGS = textwrap.dedent(
    """
    from logging import INFO
    from flwr.common.logger import log
    from consortia.server.app import LogListener
    from consortia.server.rounds.roster import Roster
    from consortia.server.rounds.run_log import NodeFailure, RoundRecord

    listener = LogListener()
    listener.on_start(2, Roster(nodes=()), None)
    log(INFO, "a line of Flower's own")
    failure = NodeFailure(node="st-mary", reason="it timed out")
    listener.on_round(RoundRecord(round=1, accuracy=0.5, epsilon={"st-mary": 0.25}))
    listener.on_round(RoundRecord(round=2, accuracy=0.75, failures=[failure]))
    """
)


def test_server_app_logs_once_in_flowers_format() -> None:
    """What `flwr run` and `consortia job logs` show of a run: the ServerApp process's output."""
    result = subprocess.run(
        [sys.executable, "-c", _SERVER_APP_LOGS],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "FLWR_LOG_LEVEL": "INFO"},
    )
    assert result.returncode == 0, result.stderr
    lines = [_ANSI.sub("", line) for line in (result.stdout + result.stderr).splitlines()]
    lines = [line for line in lines if line.strip()]
    assert not [line for line in lines if _ROOT_FORMAT.search(line)], lines
    assert len(lines) == len(set(lines)), lines  # every line once
    by_message = {line.split(":", 1)[1].strip(): line.split(":", 1)[0].strip() for line in lines}
    assert by_message == {
        "consortia: 2 rounds over nodes": "INFO",
        "a line of Flower's own": "INFO",
        "consortia: round 1 accuracy=0.5000 max ε=0.250": "INFO",
        "consortia: round 2 accuracy=0.7500 max ε=0.000": "INFO",
        "consortia: round 2: st-mary: it timed out": "WARNING",
    }, lines


def _insecure_coordinator(root: Path) -> Path:
    config = root / "coordinator.toml"
    config.write_text(
        f'name = "quiet"\nstate_dir = "state"\nhost = "127.0.0.1"\nport = {free_port()}\n'
    )
    return config


def test_administration_commands_print_no_flower_banner(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    """`coordinator status`, `coordinator nodes add` and `job list` go through Flower's client."""
    config = _insecure_coordinator(tmp_path)
    # `status` asks the Control API only when the service's pid file names a live process.
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "coordinator.pid").write_text(f"{os.getpid()}\n")
    key = init_node_keys(tmp_path / "keys").public_key
    port = config.read_text().rsplit("port = ", 1)[1].strip()
    runs = [
        ("coordinator", "status", "--config", str(config)),
        ("coordinator", "nodes", "add", "st-mary", str(key), "--config", str(config)),
        ("job", "list", "--coordinator", f"127.0.0.1:{port}", "--insecure"),
    ]
    for args in runs:
        result = consortia_cli(*args, cwd=tmp_path)
        output = result.stdout + result.stderr
        assert "Using SuperLink" not in output, (args, output)
        assert "cannot reach the coordinator" in one_cli_error(result), (args, output)
