"""How `consortia simulate` reports a run: the bar for people, JSON lines for scripts."""

from __future__ import annotations

import io
import json
from pathlib import Path

from conftest import CliRunner
from rich.console import Console

from consortia.cli.progress import JsonLinesListener, ProgressListener
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.server.rounds.run_log import RoundRecord


def _roster() -> Roster:
    entries = (
        NodeEntry(
            node_id=i, name=name, data_fingerprint="0" * 64, feature_shape=(3,), num_classes=2
        )
        for i, name in enumerate("ab")
    )
    return Roster(nodes=tuple(entries))


def test_bar_shows_accuracy_largest_epsilon_and_time_left() -> None:
    out = io.StringIO()
    listener = ProgressListener(Console(file=out, width=140))
    listener.on_start(4, _roster(), None)
    listener.on_round(RoundRecord(round=1, accuracy=0.8125, epsilon={"a": 0.25, "b": 0.5}))
    listener.stop()
    text = out.getvalue()
    assert "round 1/4" in text and "accuracy 0.8125" in text and "max ε 0.500" in text
    assert "ETA" in text


def test_a_run_without_dp_is_not_private_never_epsilon_zero() -> None:
    out = io.StringIO()
    listener = ProgressListener(Console(file=out, width=140))
    listener.on_start(4, _roster(), None)
    listener.on_round(RoundRecord(round=1, accuracy=0.8125, epsilon=None))
    listener.stop()
    text = out.getvalue()
    assert "accuracy 0.8125  not private" in text and "ε" not in text

    stream = io.StringIO()
    JsonLinesListener(stream).on_round(RoundRecord(round=1, accuracy=0.5, epsilon=None))
    assert json.loads(stream.getvalue())["epsilon"] is None  # null, not {} or 0


def test_json_lines_are_strict_json_one_event_each() -> None:
    stream = io.StringIO()
    listener = JsonLinesListener(stream)
    listener.on_start(2, _roster(), None)
    listener.on_round(RoundRecord(round=1, accuracy=0.5, loss=float("nan"), epsilon={"a": 0.1}))
    listener.emit("summary", {"out_dir": "run"})
    lines = stream.getvalue().splitlines()
    events = [json.loads(line) for line in lines]  # strict: NaN would not parse back as null
    assert [e["event"] for e in events] == ["start", "round", "summary"]
    assert events[0] == {"event": "start", "rounds": 2, "nodes": ["a", "b"]}
    assert events[1]["loss"] is None and events[1]["epsilon"] == {"a": 0.1}
    assert "NaN" not in stream.getvalue()


def test_quiet_and_json_exclude_each_other(tmp_path: Path, consortia_cli: CliRunner) -> None:
    result = consortia_cli("simulate", "--quiet", "--json", cwd=tmp_path)
    assert result.returncode == 2
    assert "--quiet and --json exclude each other" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())
