"""How `consortia simulate` reports a run while it goes: a progress bar, nothing, or JSON lines.

Three listeners for the same `RoundListener` protocol
(`consortia.server.federation`):

- `ProgressListener` (the default, for people): a live bar with rounds done,
  the estimated time left, the current accuracy and the largest ε any node
  has spent so far ("not private" for a run without DP); node failures as
  lines above it.
- `QuietListener` (`--quiet`, for scripts that only need the exit code and
  the run folder): prints nothing.
- `JsonLinesListener` (`--json`, for scripts that follow a run): one JSON
  object per line on stdout — `start`, one `round` per finished round (the
  round's record as metrics.json has it), and the CLI's closing `summary` —
  and nothing else on stdout, so `jq` can read the stream as it comes.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from consortia.server.rounds.label_skew import LabelSkew
from consortia.server.rounds.roster import Roster
from consortia.server.rounds.run_log import NOT_PRIVATE, RoundRecord


class ProgressListener:
    """Draws progress on the terminal while the federation runs."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task_id: TaskID | None = None

    def on_start(self, total_rounds: int, roster: Roster, skew: LabelSkew | None) -> None:
        self.console.print(f"nodes: {', '.join(roster.names)}")
        for line in skew.lines() if skew is not None else []:
            self.console.print(line, highlight=False, markup=False)
        self.progress.start()
        self.task_id = self.progress.add_task("rounds", total=total_rounds, status="starting")

    def on_round_started(self, server_round: int) -> None:
        """Nothing to draw: the bar advances when a round is done."""

    def on_round(self, record: RoundRecord) -> None:
        if self.task_id is None:
            return
        status = round_status(record)
        if record.failures:
            status += f"  [yellow]{len(record.failures)} node(s) failed[/]"
        for failure in record.failures:
            line = escape(f"round {record.round}: {failure}")
            self.console.print(f"[yellow]{line}[/]", highlight=False)
        self.progress.update(self.task_id, advance=1, status=status)

    def stop(self) -> None:
        self.progress.stop()


class QuietListener:
    """Reports nothing: `--quiet`."""

    def on_start(self, total_rounds: int, roster: Roster, skew: LabelSkew | None) -> None:
        """Nothing to report."""

    def on_round_started(self, server_round: int) -> None:
        """Nothing to report."""

    def on_round(self, record: RoundRecord) -> None:
        """Nothing to report."""

    def stop(self) -> None:
        """Nothing to stop."""


class JsonLinesListener:
    """Writes one JSON object per event to `stream` (stdout): `--json`.

    Each line is flushed as written, so a reader sees a round as soon as it
    is done. The objects carry an `event` key: `start`, `round`, `summary`.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        """Write one line: `{"event": event, **payload}`."""
        line = json.dumps(_finite({"event": event, **payload}), sort_keys=True, allow_nan=False)
        self.stream.write(line + "\n")
        self.stream.flush()

    def on_start(self, total_rounds: int, roster: Roster, skew: LabelSkew | None) -> None:
        payload: dict[str, Any] = {"rounds": total_rounds, "nodes": roster.names}
        if skew is not None:
            payload["label_skew"] = skew.model_dump(mode="json")
        self.emit("start", payload)

    def on_round_started(self, server_round: int) -> None:
        """Only finished rounds are reported."""

    def on_round(self, record: RoundRecord) -> None:
        self.emit("round", record.model_dump(mode="json"))

    def stop(self) -> None:
        """Nothing to stop: every line is already flushed."""


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None: strict JSON has neither
    (a diverged model's loss must not end the stream with an exception)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def round_status(record: RoundRecord) -> str:
    """'accuracy 0.9123  max ε 0.412' (without DP: '... not private'): a round's status."""
    accuracy = "n/a" if record.accuracy is None else f"{record.accuracy:.4f}"
    epsilon = record.epsilon_max
    return f"accuracy {accuracy}  " + (NOT_PRIVATE if epsilon is None else f"max ε {epsilon:.3f}")
