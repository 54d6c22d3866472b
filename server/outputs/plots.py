"""The figures of a run and of a sweep (PNG, matplotlib).

Every figure is rendered to PNG bytes in memory: `write_plots` stores the
two standard ones under plots/, and the HTML reports (report.py) embed the
same bytes as base64, so a report needs no other file and no network.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: coordinators and CI have no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from consortia.common.atomic import FileAccess, write_bytes_atomic
from consortia.server.rounds.run_log import NOT_PRIVATE, RoundRecord

_DPI = 100
_MAX_BARS = 40  # nodes in a bar chart of label shares; more get a heat map


def write_plots(plots_dir: Path, rounds: list[RoundRecord], delta: float | None) -> list[Path]:
    """Draw the two standard figures; returns the files written."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    figures = {"accuracy.png": accuracy_png(rounds), "epsilon.png": epsilon_png(rounds, delta)}
    for name, png in figures.items():
        write_bytes_atomic(
            plots_dir / name, png, FileAccess.UMASK
        )  # a crash never leaves half a PNG
    return [plots_dir / name for name in figures]


def accuracy_png(rounds: list[RoundRecord]) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    _accuracy_axes(ax, rounds)
    return _png(fig)


def accuracy_loss_png(rounds: list[RoundRecord]) -> bytes:
    """Accuracy and loss side by side: the report's first figure."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    _accuracy_axes(left, rounds)
    for label, values in (
        ("evaluation loss", [(r.round, r.loss) for r in rounds]),
        ("training loss", [(r.round, r.train_loss) for r in rounds]),
    ):
        points = [(x, y) for x, y in values if y is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            right.plot(xs, ys, marker="o", label=label)
    right.set(xlabel="round", ylabel="loss", title="Loss")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize="small")
    right.grid(alpha=0.3)
    return _png(fig)


def _accuracy_axes(ax: Axes, rounds: list[RoundRecord]) -> None:
    points = [(r.round, r.accuracy) for r in rounds if r.accuracy is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o")
    ax.set(xlabel="round", ylabel="accuracy", title="Global model accuracy", ylim=(0, 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def epsilon_png(rounds: list[RoundRecord], delta: float | None) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    private = [(r.round, r.epsilon) for r in rounds if r.epsilon is not None]
    names = sorted({name for _, epsilon in private for name in epsilon})
    for name in names:
        ax.plot(
            [server_round for server_round, _ in private],
            [epsilon.get(name, 0.0) for _, epsilon in private],
            label=name,
            marker="." if len(rounds) <= 50 else None,  # a lone round is a point, not a line
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = "Privacy spent per node" + (f" (δ = {delta:g})" if delta else "")
    ax.set(xlabel="round", ylabel="ε so far", title=title)
    if rounds and not private:  # a run without DP: say so, rather than an empty (or 0) curve
        ax.text(
            0.5,
            0.5,
            f"{NOT_PRIVATE}: no finite ε",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize="large",
            color="#b22222",
        )
    if 0 < len(names) <= 12:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _png(fig)


def label_mix_png(proportions: Mapping[str, Sequence[float]], title: str) -> bytes:
    """Label skew at a glance: one bar per node split by class share, or, for more
    nodes than bars can show, a nodes × classes heat map of the shares."""
    names = list(proportions)
    classes = max((len(mix) for mix in proportions.values()), default=0)
    shares = [
        [mix[c] if c < len(mix) else 0.0 for c in range(classes)] for mix in proportions.values()
    ]
    if len(names) > _MAX_BARS:
        return _label_heatmap(shares, title)
    height = 0.9 + max(0.35 * max(len(names), 2), 0.2 * classes)  # room for the legend too
    fig, ax = plt.subplots(figsize=(8, height))
    colours = plt.get_cmap("tab10" if classes <= 10 else "tab20")
    left = [0.0] * len(names)
    for label in range(classes):
        column = [row[label] for row in shares]
        ax.barh(names, column, left=left, color=colours(label % 20), label=f"class {label}")
        left = [a + b for a, b in zip(left, column, strict=True)]
    ax.set(xlabel="share of the node's records", xlim=(0, 1), title=title)
    ax.invert_yaxis()  # first node on top, as in the tables
    if classes:
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def _label_heatmap(shares: list[list[float]], title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 5))
    image = ax.imshow(
        shares, aspect="auto", interpolation="nearest", vmin=0, vmax=1, cmap="viridis"
    )
    ax.set(xlabel="class", ylabel="node (in table order)", title=f"{title} ({len(shares)} nodes)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label="share of the node's records")
    return _png(fig)


def counts_png(series: Mapping[str, Sequence[int]], rounds: Sequence[int], title: str) -> bytes:
    """Grouped bars: how many nodes fell in each category, per round."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / max(len(series), 1)
    for index, (label, counts) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * width
        ax.bar([r + offset for r in rounds], counts, width=width, label=label)
    ax.set(xlabel="round", ylabel="nodes", title=title)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if series:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


@dataclass(frozen=True)
class CurvePoint:
    """One grid point of a sweep on the privacy–utility plane (means and stds over seeds)."""

    epsilon: float
    epsilon_std: float
    accuracy: float
    accuracy_std: float


@dataclass(frozen=True)
class NonPrivatePoint:
    """A grid point trained without DP: an accuracy with no ε, drawn apart from the curves."""

    label: str  # its settings, as a curve's label names them ("" when there is nothing to say)
    accuracy: float
    accuracy_std: float


def privacy_utility_png(
    curves: Mapping[str, Sequence[CurvePoint]],
    non_private: Sequence[NonPrivatePoint] = (),
) -> bytes:
    """Accuracy against the ε actually spent (privacy_utility_figure), as PNG."""
    return _png(privacy_utility_figure(curves, non_private))


def privacy_utility_figure(
    curves: Mapping[str, Sequence[CurvePoint]], non_private: Sequence[NonPrivatePoint] = ()
) -> Figure:
    """Accuracy against the ε actually spent, with error bars over seeds; one line per curve.

    Accuracy runs from 0 to 1 whatever the data: zoomed to the points, a
    one-seed difference of two points would fill the plot and read as a
    collapse. Runs without DP have no ε: each is a dashed horizontal line
    at its accuracy (band: ± std over seeds), labelled "not private", never
    a point at ε = 0.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs_all = [p.epsilon for points in curves.values() for p in points]
    colours: dict[str, str] = {}  # a curve's colour, for its settings' run without DP
    for label, points in curves.items():
        ordered = sorted(points, key=lambda p: p.epsilon)
        drawn = ax.errorbar(
            [p.epsilon for p in ordered],
            [p.accuracy for p in ordered],
            xerr=[p.epsilon_std for p in ordered],
            yerr=[p.accuracy_std for p in ordered],
            marker="o",
            capsize=4,
            label=label or None,
        )
        colours[label] = to_hex(drawn.lines[0].get_color())
    for point in non_private:
        line = ax.axhline(point.accuracy, linestyle="--", color=colours.get(point.label, "0.35"))
        if point.accuracy_std > 0:
            ax.axhspan(
                point.accuracy - point.accuracy_std,
                point.accuracy + point.accuracy_std,
                color=line.get_color(),
                alpha=0.12,
            )
        line.set_label(f"{NOT_PRIVATE} (no ε)" + (f": {point.label}" if point.label else ""))
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
        ax.set_xscale("log")
    ax.set(
        xlabel="max ε per node (mean over seeds)",
        ylabel="final accuracy",
        title="Privacy–utility trade-off",
        ylim=(0, 1),
    )
    if 0 < len(curves) + len(non_private) <= 12 and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")
    return fig


def estimates_png(
    rows: Mapping[str, tuple[float, float]], title: str, xlabel: str, limits: tuple[float, float]
) -> bytes:
    """One horizontal bar per row (value ± error bar): e.g. each node's noisy accuracy."""
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * max(len(names), 2)))
    ax.barh(
        names,
        [rows[n][0] for n in names],
        xerr=[rows[n][1] for n in names],
        capsize=3,
        color="#4c72b0",
    )
    ax.set(xlabel=xlabel, xlim=limits, title=title)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def shift_heatmap_png(
    shifts: Sequence[Sequence[float]], nodes: Sequence[str], features: Sequence[str]
) -> bytes:
    """Features × nodes: each node's mean minus the pooled mean, in pooled standard deviations.

    `shifts` is indexed [node][feature]; features run down the page (there are often many).
    """
    rows = [[shifts[n][f] for n in range(len(nodes))] for f in range(len(features))]
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.22 * min(max(len(features), 4), 120)))
    bound = max((abs(v) for row in rows for v in row), default=1.0) or 1.0
    image = ax.imshow(
        rows, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-bound, vmax=bound
    )
    step = max(1, len(features) // 120)
    ax.set_yticks(range(0, len(features), step), labels=list(features)[::step], fontsize="small")
    ax.set_xticks(range(len(nodes)), labels=list(nodes), rotation=45, ha="right")
    ax.set(title="Feature shift: (node mean − pooled mean) / pooled std")
    fig.colorbar(image, ax=ax, label="pooled standard deviations")
    return _png(fig)


def finite(value: float | None) -> float:
    """A plottable error bar: None and NaN (fewer than two seeds) become 0."""
    return 0.0 if value is None or math.isnan(value) else value


def _png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    plt.close(fig)
    return buffer.getvalue()
