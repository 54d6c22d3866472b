"""`consortia simulate SCENARIO --sweep KEY=V1,V2,... --seeds N`: a sweep's runs, one by one.

Every run is planned and validated first (simulations/sweep.py), so a typo fails
before an hour of simulations; then the runs go one after another in this
process, all on one Ray started for the sweep (simulations/ray_head.py; or on
the cluster of `--ray-address`), each with actors of its own, and sweep.json,
sweep.csv and the sweep's report.html are rewritten after every run, so an
interrupted sweep keeps what it finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.common.config_io import LoadedScenario
from consortia.common.errors import ConsortiaError, FederationError
from consortia.simulations.sweep import (
    PlannedRun,
    failed_result,
    new_sweep,
    plan_runs,
    read_result,
    sweep_spec,
    with_result,
    write_sweep,
)
from consortia.simulations.sweep_file import SWEEP_FILE, RunResult, SweepFile

Simulate = Callable[[LoadedScenario, Path, Any], object]


def run_sweep(
    console: Console,
    base: LoadedScenario,
    out_dir: Path,
    options: Sequence[str],
    seeds: int,
    simulate: Simulate | None = None,
    ray_address: str | None = None,
) -> SweepFile:
    """Run the grid of `options` (each `KEY=V1,V2,...`) × `seeds` seeds into `out_dir`.

    `simulate` runs one scenario into a folder (default: the Flower
    simulation, on the Ray cluster at `ray_address` or else on one Ray
    started for the sweep; tests pass a stand-in). Raises a
    `FederationError` at the end if some run failed (the others' results
    are written all the same).
    """
    spec = sweep_spec(options, seeds, base.config.seed)
    runs = plan_runs(base.config, spec)  # before importing torch, Flower and Ray
    simulations: AbstractContextManager[Simulate] = (
        nullcontext(simulate) if simulate is not None else _on_one_ray(runs, ray_address)
    )
    console.print(
        f"[bold]{escape(base.config.name)}[/]: sweep of {len(runs)} runs "
        f"({len(spec.points())} grid points × {len(spec.seeds)} seeds) into {escape(str(out_dir))}",
        highlight=False,
    )
    sweep = new_sweep(base, spec, runs)
    write_sweep(out_dir, sweep)
    with simulations as simulate_one:
        for number, run in enumerate(runs, start=1):
            console.print(f"[{number}/{len(runs)}] {escape(run.describe())}", highlight=False)
            result = _run_one(simulate_one, base, run, out_dir)
            console.print(f"  {_outcome(result)}", highlight=False)
            sweep = with_result(sweep, result)
            write_sweep(out_dir, sweep)
    console.print(_table(sweep))
    console.print(f"sweep written to {out_dir} (sweep.json, sweep.csv, report.html)")
    failed = [r for r in sweep.runs if r.error is not None]
    if failed:
        raise FederationError(
            f"{len(failed)} of {len(runs)} sweep runs failed; the first, {failed[0].folder}: "
            f"{failed[0].error} (every run's result is in {out_dir / SWEEP_FILE})"
        )
    return sweep


@contextmanager
def _on_one_ray(runs: Sequence[PlannedRun], ray_address: str | None) -> Iterator[Simulate]:
    """The Flower simulation, every run on one Ray: the cluster's, or one started here.

    Starting Ray takes as long as a short run's rounds; once per sweep is
    enough (simulations/ray_head.py). A run that would join a cluster alone
    (`--ray-address`, `[simulation.backend] ray_address`, `RAY_ADDRESS`)
    joins that cluster.
    """
    from consortia.simulations.engine import one_ray, simulate
    from consortia.simulations.ray_start import cluster_address

    if any(cluster_address(ray_address, r.config.simulation.backend) for r in runs):
        yield partial(simulate, ray_address=ray_address)
        return
    with one_ray(runs[0].config.simulation.backend) as head:
        yield partial(simulate, head=head)


def _run_one(simulate: Simulate, base: LoadedScenario, run: PlannedRun, out_dir: Path) -> RunResult:
    """One simulation; a user error (unreachable ε, ...) fails this run, not the sweep."""
    started = time.perf_counter()
    try:
        simulate(run.loaded(base), out_dir / run.folder, _Silent())
    except ConsortiaError as exc:
        return failed_result(run, time.perf_counter() - started, exc.message)
    return read_result(out_dir, run, time.perf_counter() - started)


def _outcome(result: RunResult) -> str:
    from consortia.server.rounds.run_log import NOT_PRIVATE  # torch: loaded by the run already

    if result.error is not None:
        return f"[red]failed:[/] {escape(result.error)}"
    accuracy = "n/a" if result.accuracy is None else f"{result.accuracy:.4f}"
    if result.private is False:
        epsilon = NOT_PRIVATE
    else:
        epsilon = "max ε " + ("n/a" if result.epsilon_max is None else f"{result.epsilon_max:.4f}")
    return f"accuracy {accuracy}, {epsilon}, {result.wall_s:.1f} s"


def _table(sweep: SweepFile) -> Table:
    from consortia.server.rounds.run_log import NOT_PRIVATE  # torch: loaded by the runs already

    keys = [axis.key for axis in sweep.axes]
    table = Table(title="Privacy–utility (mean ± std over seeds)", show_edge=False)
    for key in keys:
        table.add_column(key)
    for column in ("runs", "accuracy", "max ε", "wall s / run"):
        table.add_column(column, justify="right")
    for point in sweep.points:
        table.add_row(
            *(str(point.point[k]) for k in keys),
            f"{point.runs_ok}/{len(sweep.seeds)}",
            _mean_std(point.accuracy_mean, point.accuracy_std),
            NOT_PRIVATE
            if point.private is False
            else _mean_std(point.epsilon_max_mean, point.epsilon_max_std),
            "n/a" if point.wall_s_mean is None else f"{point.wall_s_mean:.1f}",
        )
    return table


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


class _Silent:
    """A sweep prints one line per run, not a progress bar per round."""

    def on_start(self, total_rounds: int, roster: object, skew: object) -> None: ...

    def on_round_started(self, server_round: int) -> None: ...

    def on_round(self, record: object) -> None: ...
