"""Accuracy-per-round and ε-per-round figures of a run (PNG, matplotlib)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: coordinators and CI have no display
import matplotlib.pyplot as plt

from consortia.common.atomic import write_bytes_atomic
from consortia.server.run_log import RoundRecord


def write_plots(plots_dir: Path, rounds: list[RoundRecord], delta: float | None) -> list[Path]:
    """Draw the two standard figures; returns the files written."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    return [_accuracy(plots_dir, rounds), _epsilon(plots_dir, rounds, delta)]


def _accuracy(plots_dir: Path, rounds: list[RoundRecord]) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(r.round, r.accuracy) for r in rounds if r.accuracy is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o")
    ax.set(xlabel="round", ylabel="accuracy", title="Global model accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    return _save(fig, plots_dir / "accuracy.png")


def _epsilon(plots_dir: Path, rounds: list[RoundRecord], delta: float | None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({name for r in rounds for name in r.epsilon})
    for name in names:
        ax.plot([r.round for r in rounds], [r.epsilon.get(name, 0.0) for r in rounds], label=name)
    title = "Privacy spent per node" + (f" (δ = {delta:g})" if delta else "")
    ax.set(xlabel="round", ylabel="ε so far", title=title)
    if 0 < len(names) <= 12:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, plots_dir / "epsilon.png")


def _save(fig: plt.Figure, path: Path) -> Path:
    """Render in memory, then write atomically: a crash never leaves half a PNG."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path
