"""A sweep's report.html: the privacy–utility curve, the table of points, a link to every run."""

from __future__ import annotations

import html
from pathlib import Path

from consortia.common.atomic import FileAccess, write_bytes_atomic
from consortia.server.outputs import html_page as h
from consortia.server.outputs.report import REPORT_FILE
from consortia.server.rounds.run_log import NOT_PRIVATE
from consortia.simulations.sweep_file import SweepFile

__all__ = ["render_sweep_report", "write_sweep_report"]


def write_sweep_report(folder: Path, sweep: SweepFile, curve_png: bytes) -> Path:
    """The sweep's report.html: the privacy–utility curve, the table, links to every run."""
    path = folder / REPORT_FILE
    page = render_sweep_report(sweep, curve_png).encode("utf-8")
    write_bytes_atomic(path, page, FileAccess.UMASK)
    return path


def render_sweep_report(sweep: SweepFile, curve_png: bytes) -> str:
    keys = [axis.key for axis in sweep.axes]
    summary = h.key_values(
        [
            ("scenario", f"{sweep.scenario} ({sweep.source})"),
            (
                "grid",
                "; ".join(f"{a.key} = {', '.join(map(h.short_text, a.values))}" for a in sweep.axes)
                or "the scenario as it is",
            ),
            ("seeds", ", ".join(map(str, sweep.seeds))),
            (
                "runs",
                f"{sum(r.error is None for r in sweep.runs)} finished, "
                f"{sum(r.error is not None for r in sweep.runs)} failed, "
                f"{len(sweep.planned) - len(sweep.runs)} to go",
            ),
            ("started (UTC)", sweep.created_utc),
            ("report written (UTC)", h.utc_now()),
        ]
    )
    points = h.table(
        [*keys, "runs", "accuracy mean", "± std", "max ε mean", "± std", "wall s / run"],
        [
            [
                *(h.short_text(p.point.get(k)) for k in keys),
                f"{p.runs_ok}/{len(sweep.seeds)}",
                h.number(p.accuracy_mean),
                h.number(p.accuracy_std),
                *(
                    [NOT_PRIVATE, ""]  # no DP: no ε, not ε = 0
                    if p.private is False
                    else [h.number(p.epsilon_max_mean), h.number(p.epsilon_max_std)]
                ),
                h.number(p.wall_s_mean, "{:.1f}"),
            ]
            for p in sweep.points
        ],
    )
    runs = h.table(
        ["run", "seed", "accuracy", "max ε", "wall s", "result"],
        [
            [
                f'<a href="{html.escape(r.folder)}/{REPORT_FILE}">{html.escape(r.folder)}</a>',
                str(r.seed),
                h.number(r.accuracy),
                NOT_PRIVATE if r.private is False else h.number(r.epsilon_max),
                h.number(r.wall_s, "{:.1f}"),
                html.escape(r.error or "ok"),
            ]
            for r in sweep.runs
        ],
        raw=True,
    )
    sections = [
        h.section("Sweep", summary),
        h.section(
            "Privacy–utility",
            h.figure(curve_png, "final accuracy against max ε, mean ± std over seeds")
            + h.note(
                "Mean ± sample standard deviation over seeds (none with one seed: a "
                "difference between two points may then be seed noise). Accuracy is drawn "
                "from 0 to 1. Runs without DP have no ε: a dashed line at their accuracy, "
                f"'{NOT_PRIVATE}' in the tables."
            )
            + points,
        ),
        h.section("Runs", runs),
    ]
    return h.page(f"Consortia sweep {sweep.scenario}", sections)
