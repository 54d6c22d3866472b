"""A per-round progress bar with accuracy and the largest ε spent so far."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from consortia.server.label_skew import LabelSkew
from consortia.server.roster import Roster
from consortia.server.run_log import RoundRecord


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
            console=console,
            transient=False,
        )
        self.task_id: int | None = None

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
        accuracy = "n/a" if record.accuracy is None else f"{record.accuracy:.4f}"
        eps = max(record.epsilon.values(), default=0.0)
        status = f"accuracy {accuracy}  max ε {eps:.3f}"
        if record.failures:
            status += f"  [yellow]{len(record.failures)} node(s) failed[/]"
        for failure in record.failures:
            line = escape(f"round {record.round}: {failure}")
            self.console.print(f"[yellow]{line}[/]", highlight=False)
        self.progress.update(self.task_id, advance=1, status=status)

    def stop(self) -> None:
        self.progress.stop()
