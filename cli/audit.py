"""`consortia audit`: check an audit log's hash chain, or attack a run's model.

consortia audit verify PATH [--expect-head SHA] [--expect-count N]
consortia audit privacy RUN [--round N] [--shadows K]

Exit 0: the chain is intact and matches its anchors: the `<log>.anchor`
beside it and, for a node's log, the node's ledger ("ok: N entries, head
sha256 …"; keep that head off the machine too: it catches what someone with
write access to the whole folder can rewrite). Exit 1: one line per problem.
Exit 2: the file cannot be read (one error message, as everywhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from consortia.common.membership import PrivacyAudit

audit_app = typer.Typer(
    help="Check tamper-evident audit logs; test a run's privacy claim with attacks.",
    no_args_is_help=True,
)
# soft_wrap: a problem or a head hash stays on one line, whatever the terminal width.
console = Console(highlight=False, soft_wrap=True)


@audit_app.callback()
def _audit() -> None:
    """Check tamper-evident audit logs; test a run's privacy claim with attacks."""


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

    Entries removed from the end, or an edited last line, are caught by the
    anchor every append writes beside the log (and, for a node's log, by its
    ledger). Someone who can write the whole folder can rewrite those too:
    keep the printed head (and count) off this machine and pass them back
    with --expect-head / --expect-count.
    """
    from consortia.client.node_audit import ledger_gaps
    from consortia.common.audit import verify as verify_log

    report = verify_log(path, expect_head=expect_head, expect_count=expect_count)
    # A node's log is also checked against its ledger (once its lines are intact).
    problems = [str(problem) for problem in report.problems] or ledger_gaps(path)
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    if problems:
        for problem in problems:
            console.print(escape(problem))
        count = len(problems)
        console.print(
            f"[red]not ok[/]: {escape(str(path))}: {count} problem{'s' if count != 1 else ''}"
        )
        raise typer.Exit(1)
    console.print(f"ok: {report.entries} entries, head sha256 {report.head_sha256}")


@audit_app.command("privacy")
def privacy(
    run: Annotated[Path, typer.Argument(help="A simulation run folder.")],
    server_round: Annotated[
        int | None,
        typer.Option("--round", min=1, help="Audit this round's model (default: the newest)."),
    ] = None,
    shadows: Annotated[
        int,
        typer.Option("--shadows", min=2, help="Shadow models for the likelihood-ratio attack."),
    ] = 8,
) -> None:
    """Membership-inference attacks on a run's model; the ε they prove beside the ε claimed.

    Writes RUN/privacy-audit.json. See docs/privacy-audit.md for how to read it.
    """
    from consortia.common.membership import AUDIT_FILE
    from consortia.simulations.privacy_audit import audit_run

    audit = audit_run(run, server_round, shadows)
    print_audit(console, audit, f"{audit.run}, round {audit.round}")
    members = audit.attacks[0].members
    console.print(
        f"{members} members (the nodes' training records) vs {members} non-members (their "
        f"held-out records); written to {escape(str(run / AUDIT_FILE))}"
    )


def print_audit(out: Console, audit: PrivacyAudit, title: str) -> None:
    """The attacks' figures beside the claimed ε (shared with `consortia node audit`)."""
    from rich.table import Table

    claimed = "no DP" if audit.claimed_epsilon is None else f"{audit.claimed_epsilon:.4g}"
    table = Table(title=f"{escape(title)}: claimed ε {claimed} at δ {audit.delta:g}")
    for heading in ("attack", "AUC", "TPR @ 0.1% FPR", "TPR @ 1% FPR", "ε lower bound (95%)"):
        table.add_column(heading, justify="left" if heading == "attack" else "right")
    for attack in audit.attacks:
        table.add_row(
            escape(attack.attack),
            f"{attack.auc:.3f}",
            _rate(attack.tpr_at_fpr_0_1pct),
            _rate(attack.tpr_at_fpr_1pct),
            f"{attack.epsilon_lower_bound:.3f}",
        )
    out.print(table)
    members = audit.attacks[0].members
    if any(a.tpr_at_fpr_0_1pct is None or a.tpr_at_fpr_1pct is None for a in audit.attacks):
        out.print(f"n/a: {members} non-members cannot resolve so small a false-positive rate")
    claim = audit.claimed_epsilon
    proved = max(a.epsilon_lower_bound for a in audit.attacks)
    if claim is not None and proved > claim:
        out.print(
            f"[bold red]the attacks prove ε ≥ {proved:.3f}, above the claimed {claim:.4g}[/]: "
            "the model saw these records through more than the accounted releases"
        )


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
