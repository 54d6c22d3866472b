"""`consortia job`: federated jobs on a running coordinator (Flower's deployment engine).

consortia job submit job.toml --coordinator HOST:PORT --root-certificates ca.crt [--wait]
consortia job list | status RUN | logs RUN [--follow] | stop RUN   (same connection options)
consortia job resume RUN --config coordinator.toml [--wait]

`--config coordinator.toml` (on the coordinator's machine) stands for the
connection options and also shows the run's consortia record (rounds, ε).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.common.errors import ConfigError

if TYPE_CHECKING:  # imported where used: `consortia --help` must not load them
    from consortia.server.coordinator.control import Control, CoordinatorTarget

job_app = typer.Typer(
    help="Submit and follow federated jobs on a coordinator.", no_args_is_help=True
)
console = Console(highlight=False)

CoordinatorOption = Annotated[
    str | None, typer.Option("--coordinator", help="The coordinator's HOST:PORT.")
]
RootCertificatesOption = Annotated[
    Path | None,
    typer.Option("--root-certificates", help="The consortium CA certificate (ca.crt)."),
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="Plain HTTP to a coordinator started --insecure.")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="coordinator.toml, when run on the coordinator's machine."),
]
RunArgument = Annotated[int, typer.Argument(help="The run id (from `job submit` or `job list`).")]
_POLL_S = 1.0


def _target(
    coordinator: str | None, root: Path | None, insecure: bool, config: Path | None
) -> CoordinatorTarget:
    from consortia.server.coordinator.control import CoordinatorTarget

    if config is not None:
        from consortia.server.coordinator.config import load_coordinator_config
        from consortia.server.coordinator.enrollment import admin_target

        return admin_target(load_coordinator_config(config))
    if coordinator is None:
        raise ConfigError("say where the coordinator is: --coordinator HOST:PORT (or --config)")
    if not insecure and root is None:
        raise ConfigError(
            "pass --root-certificates ca.crt (the consortium CA), or --insecure for a "
            "coordinator started with --insecure"
        )
    if root is not None and not root.is_file():
        raise ConfigError(f"--root-certificates {root}: no such file")
    return CoordinatorTarget(address=coordinator, root_certificates=root, insecure=insecure)


@job_app.command("submit")
def submit(
    job: Annotated[Path, typer.Argument(help="The job TOML (the schema simulations use).")],
    coordinator: CoordinatorOption = None,
    root_certificates: RootCertificatesOption = None,
    insecure: InsecureOption = False,
    config: ConfigOption = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run's log until it ends; exit 1 if it fails.")
    ] = False,
) -> None:
    """Submit a job: its FAB carries only configuration, the installed apps run it."""
    from consortia.server.coordinator.jobs import TRAIN_KIND

    target = _target(coordinator, root_certificates, insecure, config)
    _, code = _start(job, target, TRAIN_KIND, wait)
    if code is not None:
        raise typer.Exit(code)


def _start(job: Path, target: CoordinatorTarget, kind: str, wait: bool) -> tuple[int, int | None]:
    """Submit `job` as a run of `kind`; (run id, exit code of following it if `wait`)."""
    from consortia.cli.statistics import require_statistics
    from consortia.common.config_io import read_job
    from consortia.server.coordinator.control import Control
    from consortia.server.coordinator.jobs import STATISTICS_KIND, build_job_fab

    text, loaded = read_job(job)
    if kind == STATISTICS_KIND:
        require_statistics(loaded)
    fab, fab_hash = build_job_fab(text, str(job), kind=kind)
    with Control(target) as control:
        run_id = control.start_run(fab, fab_hash)
        suffix = " (statistics)" if kind == STATISTICS_KIND else ""
        console.print(f"submitted job {loaded.config.name} as run {run_id}{suffix}")
        sys.stdout.flush()
        return run_id, _follow(control, run_id) if wait else None


@job_app.command("stats")
def stats(
    job: Annotated[Path, typer.Argument(help="The job TOML, with a [statistics] block.")],
    coordinator: CoordinatorOption = None,
    root_certificates: RootCertificatesOption = None,
    insecure: InsecureOption = False,
    config: ConfigOption = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Follow the run to its end (--config: print its summary)."),
    ] = False,
) -> None:
    """Ask every node the job's DP statistics query; its run folder gets stats.json and .html."""
    from consortia.server.coordinator.jobs import STATISTICS_KIND

    target = _target(coordinator, root_certificates, insecure, config)
    run_id, code = _start(job, target, STATISTICS_KIND, wait)
    if code is None:
        return
    if config is not None and code == 0:
        from consortia.cli.statistics import print_statistics
        from consortia.server.coordinator.config import load_coordinator_config
        from consortia.server.coordinator.jobs import run_dir
        from consortia.server.statistics.job import read_statistics

        folder = run_dir(load_coordinator_config(config), run_id)
        print_statistics(console, read_statistics(folder), folder)
    raise typer.Exit(code)


@job_app.command("resume")
def resume(
    run: RunArgument,
    config: Annotated[Path, typer.Option("--config", help="The coordinator's coordinator.toml.")],
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the resumed run to its end.")
    ] = False,
) -> None:
    """Continue an interrupted run from its last complete round (as a new Flower run)."""
    from consortia.server.coordinator.config import load_coordinator_config
    from consortia.server.coordinator.control import Control
    from consortia.server.coordinator.enrollment import admin_target
    from consortia.server.coordinator.jobs import build_job_fab, resumable_run

    settings = load_coordinator_config(config)
    run_dir, text, source = resumable_run(settings, run)
    fab, fab_hash = build_job_fab(text, source, resume=str(run_dir))
    with Control(admin_target(settings)) as control:
        run_id = control.start_run(fab, fab_hash)
        console.print(f"resuming run {run} ({run_dir}) as run {run_id}")
        sys.stdout.flush()
        if wait:
            raise typer.Exit(_follow(control, run_id))


@job_app.command("list")
def list_runs(
    coordinator: CoordinatorOption = None,
    root_certificates: RootCertificatesOption = None,
    insecure: InsecureOption = False,
    config: ConfigOption = None,
) -> None:
    """Every run the coordinator knows, with its status."""
    from consortia.server.coordinator.control import Control

    with Control(_target(coordinator, root_certificates, insecure, config)) as control:
        runs = control.list_runs()
    table = Table("run", "status", "detail", "submitted", "finished", show_edge=False)
    for view in runs:
        table.add_row(
            str(view.run_id),
            view.status,
            view.sub_status or view.details,
            view.pending_at,
            view.finished_at,
        )
    console.print(table)


@job_app.command("status")
def status(
    run: RunArgument,
    coordinator: CoordinatorOption = None,
    root_certificates: RootCertificatesOption = None,
    insecure: InsecureOption = False,
    config: ConfigOption = None,
) -> None:
    """A run's status; with --config also its rounds, accuracy and ε per node."""
    from consortia.server.coordinator.control import Control

    with Control(_target(coordinator, root_certificates, insecure, config)) as control:
        (view,) = control.list_runs(run)
    note = view.sub_status or view.details
    detail = f" ({escape(note)})" if note else ""
    console.print(f"run {view.run_id}: {view.status}{detail}")
    if config is not None:
        from consortia.server.coordinator.config import load_coordinator_config
        from consortia.server.coordinator.jobs import describe_run_dir

        for line in describe_run_dir(load_coordinator_config(config), run):
            console.print(escape(line))


@job_app.command("logs")
def logs(
    run: RunArgument,
    coordinator: CoordinatorOption = None,
    root_certificates: RootCertificatesOption = None,
    insecure: InsecureOption = False,
    config: ConfigOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep printing until the run ends.")
    ] = False,
) -> None:
    """The ServerApp's log of a run."""
    from consortia.server.coordinator.control import Control

    with Control(_target(coordinator, root_certificates, insecure, config)) as control:
        if follow:
            raise typer.Exit(_follow(control, run))
        text, _ = control.logs(run)
    sys.stdout.write(text)


@job_app.command("stop")
def stop(
    run: RunArgument,
    coordinator: CoordinatorOption = None,
    root_certificates: RootCertificatesOption = None,
    insecure: InsecureOption = False,
    config: ConfigOption = None,
) -> None:
    """Stop a run (its finished rounds stay checkpointed; `job resume` continues it)."""
    from consortia.server.coordinator.control import Control

    with Control(_target(coordinator, root_certificates, insecure, config)) as control:
        control.stop_run(run)
    console.print(f"run {run}: stop requested")


def _follow(control: Control, run_id: int) -> int:
    """Print the run's log as it grows until the run finishes; 0 if it completed."""
    after = 0.0
    while True:
        (view,) = control.list_runs(run_id)
        text, after = control.logs(run_id, after)
        sys.stdout.write(text)
        sys.stdout.flush()
        if view.status == "finished":
            text, after = control.logs(run_id, after)
            sys.stdout.write(text)
            console.print(f"run {run_id}: {view.status} ({escape(view.sub_status)})")
            return 0 if view.sub_status == "completed" else 1
        time.sleep(_POLL_S)
