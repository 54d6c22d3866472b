"""`consortia audit`: check an audit log's hash chain (a node's or the coordinator's).

consortia audit verify PATH [--expect-head SHA] [--expect-count N]

Exit 0: the chain is intact ("ok: N entries, head sha256 …"; keep that head
somewhere else to detect a truncated tail next time). Exit 1: one line per
problem. Exit 2: the file cannot be read (one error message, as everywhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

audit_app = typer.Typer(help="Check tamper-evident audit logs.", no_args_is_help=True)
# soft_wrap: a problem or a head hash stays on one line, whatever the terminal width.
console = Console(highlight=False, soft_wrap=True)


@audit_app.callback()
def _audit() -> None:
    """Check tamper-evident audit logs."""


@audit_app.command("verify")
def verify(
    path: Annotated[Path, typer.Argument(help="The audit log (e.g. <state_dir>/audit.jsonl).")],
    expect_head: Annotated[
        str | None,
        typer.Option(
            "--expect-head",
            metavar="SHA",
            help="A head sha256 printed by an earlier verify: that entry must still be there.",
        ),
    ] = None,
    expect_count: Annotated[
        int | None,
        typer.Option(
            "--expect-count",
            metavar="N",
            min=0,
            help="An entry count printed by an earlier verify: the log must hold at least N.",
        ),
    ] = None,
) -> None:
    """Verify every entry, its sequence number and the hash chain; exit 1 on any problem.

    The chain alone cannot show that entries were removed from the end of
    the log: keep the printed head (and count) outside this machine and pass
    them back with --expect-head / --expect-count.
    """
    from consortia.common.audit import verify as verify_log

    report = verify_log(path, expect_head=expect_head, expect_count=expect_count)
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    if not report.ok:
        for problem in report.problems:
            console.print(escape(str(problem)))
        count = len(report.problems)
        console.print(
            f"[red]not ok[/]: {escape(str(path))}: {count} problem{'s' if count != 1 else ''}"
        )
        raise typer.Exit(1)
    console.print(f"ok: {report.entries} entries, head sha256 {report.head_sha256}")
