"""What the terminal shows of a statistics job: who answered, what it cost, what stands out."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.common.config_io import LoadedConfig
from consortia.common.errors import ConfigError
from consortia.server.statistics.stats_file import STATS_HTML, StatisticsFile


def require_statistics(loaded: LoadedConfig) -> None:
    """A statistics job needs its query: fail before anything starts."""
    if loaded.config.statistics is None:
        raise ConfigError(
            f"{loaded.source}: a statistics job needs a [statistics] block, e.g. "
            "'[statistics]' with 'target_epsilon = 0.5' (see docs/data-insight.md)"
        )


def print_statistics(console: Console, result: StatisticsFile, out_dir: Path) -> None:
    """One row per node (records, label skew, ε of the query), refusals, outliers, files."""
    summary = result.summary
    table = Table(title="Statistics per node", show_edge=False)
    for column in ("node", "records", "label skew", "accuracy", "ε of query", "ε spent"):
        table.add_column(column, justify="left" if column == "node" else "right")
    if summary is not None:
        for node, spend in summary.spend.items():
            mix = summary.labels[node]
            accuracy = summary.accuracy.get(node)
            records = mix.records.value
            table.add_row(
                escape(node),
                "n/a" if records is None else f"{records:.0f} ± {mix.records.error or 0:.0f}",
                "n/a" if mix.skew is None else f"{mix.skew:.3f}",
                ""
                if accuracy is None or accuracy.accuracy.value is None
                else f"{accuracy.accuracy.value:.3f} ± {accuracy.accuracy.error or 0:.3f}",
                f"{spend.epsilon:.4f}",
                f"{spend.epsilon_spent:.4f}",
            )
    for refusal in result.refusals:
        table.add_row(escape(refusal.node), escape(f"refused [{refusal.code}]"), "", "", "", "")
    console.print(table)
    for refusal in result.refusals:
        console.print(
            f"{escape(refusal.node)}: {escape(f'[{refusal.code}]')} {escape(refusal.reason)}"
        )
    if summary is not None and summary.most_skewed is not None:
        console.print(f"most skewed label mix: [bold]{escape(summary.most_skewed)}[/]")
    for outlier in summary.outliers if summary is not None else []:
        console.print(f"outlier: {escape(outlier.node)}: {escape(outlier.why)}")
    console.print(
        f"statistics written to {escape(str(out_dir))} (open {escape(str(out_dir / STATS_HTML))})"
    )
