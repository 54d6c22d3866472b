"""`consortia`: the one command line of the framework, for simulation and deployment.

`simulate` runs a consortium faked on one machine. The sub-apps registered
below run a real one: `node` (an on-prem node: data, keys, privacy ledger,
job checks, start), `coordinator` (the service and its enrolled nodes), `job`
(submit and follow jobs on a coordinator) and `provision` (TLS certificates);
`models` (a run's checkpoints) and `audit` (audit logs, privacy attacks)
serve the runs of both.

User errors (bad config, missing data, unreachable privacy targets) end with
one message on stderr and exit code 2; a stack trace means a bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.cli.audit import audit_app
from consortia.cli.coordinator import coordinator_app
from consortia.cli.job import job_app
from consortia.cli.local_superlink import local_superlink_app
from consortia.cli.models import models_app
from consortia.cli.node import node_app
from consortia.cli.plain_help import escape_help
from consortia.cli.provision import provision_app
from consortia.common.errors import ConsortiaError

if TYPE_CHECKING:  # imported where used: `consortia --help` must not load them
    from consortia.common.config import ScenarioConfig
    from consortia.common.config_io import LoadedScenario
    from consortia.server.federation import RunSummary

app = typer.Typer(
    name="consortia",
    help="Privacy-preserving federated learning with Flower and Opacus.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(node_app, name="node")
app.add_typer(models_app, name="models")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(job_app, name="job")
app.add_typer(provision_app, name="provision")
app.add_typer(audit_app, name="audit")
app.add_typer(local_superlink_app, name="local-superlink")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Privacy-preserving federated learning with Flower and Opacus."""


@app.command()
def simulate(
    scenario: Annotated[
        str | None,
        typer.Argument(help="Scenario TOML file or bundled scenario name (default: hospitals)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: runs/<time>-<scenario>).")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=1, help="Override the scenario's rounds.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", min=0, help="Override the scenario's seed.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue this run folder after its last complete round "
            "(the scenario defaults to the run's own).",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Data folder: overrides [simulation.data] path (IDX folder for 'idx', "
            "the node files' folder for 'files').",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress; print only the run folder.")
    ] = False,
    json_lines: Annotated[
        bool,
        typer.Option("--json", help="Progress as JSON lines on stdout (start, round..., summary)."),
    ] = False,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            metavar="KEY=V1,V2,...",
            help="Run once per value of this dotted scenario key, e.g. "
            "privacy.target_epsilon=0.5,1,2 (repeat for a product grid); --out is then the "
            "sweep folder: a subfolder per run, sweep.json, sweep.csv, report.html.",
        ),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            "--seeds", min=1, help="Runs per sweep point, with seeds seed, seed+1, ... (a sweep)."
        ),
    ] = None,
    stats: Annotated[
        bool,
        typer.Option(
            "--stats",
            help="Run the scenario's [statistics] query instead of training: DP label, feature "
            "and missing-value statistics (and a model's accuracy) per node, in stats.html.",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Run the virtual nodes on this existing Ray cluster (HOST:PORT of its head, "
            "or 'auto'); default: the scenario's [simulation.backend] ray_address, else Ray's "
            "RAY_ADDRESS environment variable, else a Ray started on this machine for the run.",
        ),
    ] = None,
) -> None:
    """Run a private federated simulation on this machine (Flower simulation engine, Ray)."""
    if quiet and json_lines:
        raise ConsortiaError("--quiet and --json exclude each other; choose one")
    sweeping = bool(sweep) or seeds is not None
    if stats and (sweeping or resume is not None or json_lines):
        raise ConsortiaError("--stats cannot be combined with --sweep, --seeds, --resume or --json")
    if sweeping and (resume is not None or json_lines):
        raise ConsortiaError("--sweep and --seeds cannot be combined with --resume or --json")
    from consortia.common.config_io import load_scenario
    from consortia.server.outputs.run_dirs import default_run_dir

    overrides = {"rounds": rounds, "seed": seed}
    if resume is not None:
        from consortia.cli.resume import resumed_scenario

        # Its notes go to stderr when stdout carries JSON lines or only the run folder.
        notes = err_console if (quiet or json_lines) else console
        loaded, out_dir = resumed_scenario(notes, resume, scenario, out, overrides)
    else:
        # Validate before importing torch, Flower and Ray: a typo should fail in a blink.
        loaded = load_scenario(scenario, overrides)
        out_dir = out if out is not None else default_run_dir(Path("runs"), loaded.config.name)
        _check_new_run_dir(out_dir)
    from consortia.simulations.ray_start import check_ray_address, cluster_address

    address = cluster_address(ray_address, loaded.config.simulation.backend)
    if address and not sweeping:
        check_ray_address(address)  # seconds, not Ray's minutes of retries on a typo
    from consortia.simulations.node_data import scenario_with_data

    loaded = scenario_with_data(loaded, data)
    config = loaded.config
    if stats:
        _simulate_statistics(loaded, out_dir, quiet, ray_address)
        return
    if sweeping:
        from consortia.cli.sweep import run_sweep

        run_sweep(
            Console(quiet=quiet), loaded, out_dir, sweep or [], seeds or 1, ray_address=ray_address
        )
        if quiet:
            print(out_dir.resolve())
        return
    from consortia.cli.progress import JsonLinesListener, ProgressListener, QuietListener
    from consortia.simulations.engine import simulate as run_simulated

    listener: ProgressListener | QuietListener | JsonLinesListener
    if json_lines:
        listener = JsonLinesListener()
    elif quiet:
        listener = QuietListener()
    else:
        console.print(
            f"[bold]{config.name}[/]: {config.simulation.nodes} nodes, {config.rounds} rounds, "
            f"{_privacy_line(config)}"
        )
        listener = ProgressListener(console)
    try:
        summary = run_simulated(loaded, out_dir, listener, resume=resume, ray_address=ray_address)
    finally:
        listener.stop()
    if isinstance(listener, JsonLinesListener):
        listener.emit(
            "summary",
            {
                "out_dir": str(summary.out_dir.resolve()),
                "final": summary.final.model_dump(mode="json"),
            },
        )
    elif quiet:
        print(summary.out_dir.resolve())
    else:
        _print_summary(summary, config)


def _simulate_statistics(
    loaded: LoadedScenario, out_dir: Path, quiet: bool, ray_address: str | None
) -> None:
    from consortia.cli.statistics import print_statistics, require_statistics
    from consortia.simulations.engine import simulate_statistics

    require_statistics(loaded)
    if not quiet:
        config = loaded.config
        console.print(f"[bold]{config.name}[/]: statistics of {config.simulation.nodes} nodes")
    result = simulate_statistics(loaded, out_dir, ray_address=ray_address)
    if quiet:
        print(out_dir.resolve())
    else:
        print_statistics(console, result, out_dir)


def _check_new_run_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConsortiaError(f"{out_dir}: is a file, not a folder; choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConsortiaError(f"{out_dir}: folder exists and is not empty; choose another --out")
    if any(parent.exists() and not parent.is_dir() for parent in out_dir.parents):
        raise ConsortiaError(f"{out_dir}: a parent of --out is a file; choose another --out")


def _privacy_line(config: ScenarioConfig) -> str:
    privacy = config.privacy
    if not privacy.enabled:
        return "[red]no differential privacy[/]"
    if privacy.target_epsilon is not None:
        return f"DP-SGD, target ε ≤ {privacy.target_epsilon:g} per node at δ = {privacy.delta:g}"
    return f"DP-SGD, noise multiplier {privacy.noise_multiplier:g}, δ = {privacy.delta:g}"


def _print_summary(summary: RunSummary, config: ScenarioConfig) -> None:
    from consortia.server.rounds.run_log import NOT_PRIVATE

    final = summary.final
    privacy = config.privacy
    accuracy = "n/a" if final.accuracy is None else f"{final.accuracy:.4f}"
    if final.epsilon is None:  # no DP: no finite ε to tabulate, and no 0 to misread
        console.print(
            f"final accuracy [bold]{accuracy}[/], [red]{NOT_PRIVATE}[/] "
            "(trained without differential privacy: no finite ε)"
        )
        console.print(f"run written to {summary.out_dir}")
        return
    table = Table(title="Privacy spent per node", show_edge=False)
    table.add_column("node")
    table.add_column("ε", justify="right")
    if privacy.enabled and privacy.target_epsilon is not None:
        table.add_column("target", justify="right")
    for name, eps in sorted(final.epsilon.items()):
        row = [name, f"{eps:.4f}"]
        if privacy.enabled and privacy.target_epsilon is not None:
            row.append(f"{privacy.target_epsilon:g}")
        table.add_row(*row)
    console.print(table)
    delta = "" if final.delta is None else f" at δ = {final.delta:g}"
    console.print(
        f"final accuracy [bold]{accuracy}[/], max ε [bold]{final.epsilon_max:.4f}[/]{delta}"
    )
    console.print(f"run written to {summary.out_dir}")


def command() -> click.Command:
    """The `consortia` command tree, every help text escaped (help is plain text, not markup)."""
    tree = typer.main.get_command(app)
    escape_help(tree)
    return tree


def run() -> None:
    """Console entry point: turn user errors into one message and exit code 2."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        command()()
    except ConsortiaError as exc:
        # soft_wrap: the message stays one line (paths intact for copy-paste and grep).
        err_console.print(
            f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True
        )
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    run()
