"""consortia's Flower ServerApp, for the stock tooling (`flwr run .`).

The run config (`[tool.flwr.app.config]` in pyproject.toml, or
`flwr run . --run-config ...`) names the scenario (simulation) or the job
file (deployment: `job = "/path/job.toml"`) and the output folder.
`consortia simulate` builds the same federation through
`consortia.simulations.engine` instead.
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Context, UserConfig
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from consortia.common.audit import json_list, json_object
from consortia.common.config import ScenarioConfig
from consortia.common.config_io import LoadedConfig, load_job, load_job_text, load_scenario
from consortia.common.errors import ConsortiaError, FederationError
from consortia.common.flower_log import flower_handler_only, user_errors_in_one_line
from consortia.server.coordinator.config import audit_log
from consortia.server.coordinator.jobs import (
    JOB_KIND_KEY,
    JOB_SOURCE_KEY,
    JOB_TOML_KEY,
    OUT_DIR_KEY,
    RESUME_KEY,
    STATISTICS_KIND,
    keep_job_text,
)
from consortia.server.coordinator.run_audit import AuditedListener
from consortia.server.coordinator.service import coordinator_from_environment
from consortia.server.federation import ScenarioLab, run_federation
from consortia.server.outputs.manifest import config_sha256
from consortia.server.outputs.resume import newest_checkpoint
from consortia.server.outputs.resume import run_config as run_config_of
from consortia.server.outputs.run_dirs import default_run_dir
from consortia.server.rounds.label_skew import LabelSkew
from consortia.server.rounds.roster import Roster
from consortia.server.rounds.run_log import NOT_PRIVATE, RoundRecord
from consortia.server.statistics.job import run_statistics

app = ServerApp()
# Importing consortia imported Opacus, whose root handler would print Flower's lines twice.
flower_handler_only()
# A job that cannot go on (every node refused, …) ends in one line, not a traceback.
user_errors_in_one_line()


class LogListener:
    """Progress as log lines (there is no terminal UI under `flwr run`)."""

    def on_start(self, total_rounds: int, roster: Roster, skew: LabelSkew | None) -> None:
        log(INFO, "consortia: %d rounds over nodes %s", total_rounds, ", ".join(roster.names))
        for line in skew.lines() if skew is not None else []:
            log(INFO, "consortia: %s", line)

    def on_round_started(self, server_round: int) -> None:
        log(INFO, "consortia: round %d started", server_round)

    def on_round(self, record: RoundRecord) -> None:
        epsilon = record.epsilon_max
        log(
            INFO,
            "consortia: round %d accuracy=%s %s",
            record.round,
            f"{record.accuracy:.4f}" if record.accuracy is not None else "n/a",
            NOT_PRIVATE if epsilon is None else f"max ε={epsilon:.3f}",
        )
        for failure in record.failures:
            log(WARNING, "consortia: round %d: %s", record.round, failure)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """A deployed job: its nodes are `consortia node start` SuperNodes."""
    serve(grid, context, lab=None)


def serve(grid: Grid, context: Context, lab: ScenarioLab | None) -> None:
    """Run the job carried in the run config, or the scenario it names (with the `lab`).

    `job-toml` (the job's text, put there by `consortia job submit`) or `job`
    (a path, for `flwr run .`) give a deployment job; otherwise `scenario`
    names a simulation scenario. Under `consortia coordinator start` the run
    is written to the coordinator's runs folder as `run-<Flower run id>`.
    """
    resume_ref = context.run_config.get(RESUME_KEY)
    resume = Path(str(resume_ref)) if resume_ref else None
    loaded = _loaded_config(context.run_config, resume)
    if isinstance(loaded.config, ScenarioConfig) and lab is None:
        raise FederationError(
            f"{loaded.source}: this app runs deployed jobs (`--run-config 'job=\"job.toml\"'`); "
            "a simulation scenario runs with `consortia simulate` or the lab's Flower app, "
            "`flwr run simulations/flower-app`"
        )
    out_dir = resume if resume is not None else _run_dir(context, loaded.config.name)
    if resume is not None:
        if isinstance(loaded.config, ScenarioConfig):
            # Its virtual nodes' privacy history died with the interrupted process;
            # `consortia simulate --resume` gives it back (simulations/node_privacy.py).
            raise FederationError(
                f"{resume}: a simulation resumes with `consortia simulate --resume {resume}`"
            )
        log(INFO, "consortia: resuming %s", resume.resolve())
    elif context.run_config.get(JOB_TOML_KEY):
        keep_job_text(out_dir, str(context.run_config[JOB_TOML_KEY]))
    if context.run_config.get(JOB_KIND_KEY) == STATISTICS_KIND:
        _statistics(grid, context.run_id, loaded, out_dir)
        return
    audited = _audited(context.run_id, loaded, resume)
    listener = LogListener() if audited is None else audited
    try:
        summary = run_federation(grid, loaded, out_dir, listener, resume=resume, lab=lab)
    except ConsortiaError as exc:
        if audited is not None:
            audited.failed(exc.message)
        raise
    if audited is not None:
        audited.finished(summary)
    log(INFO, "consortia: run written to %s", summary.out_dir.resolve())


def _statistics(grid: Grid, run_id: int, loaded: LoadedConfig, out_dir: Path) -> None:
    """A statistics job (`consortia job stats`): one query to every node, no training."""
    service = coordinator_from_environment()
    audit = audit_log(service) if service is not None else None
    name = loaded.config.name
    if audit is not None:
        audit.append(
            "statistics.started",
            run_id=str(run_id),
            job=name,
            config_sha256=config_sha256(loaded.config),
        )
    runs_base = service.runs_dir if service is not None else Path()
    try:
        result = run_statistics(grid, loaded, out_dir, runs_base)
    except ConsortiaError as exc:
        if audit is not None:  # as a training run's failure is (run_audit.py)
            audit.append("statistics.failed", run_id=str(run_id), job=name, reason=exc.message)
        raise
    spend = result.summary.spend if result.summary is not None else {}
    spent = {node: s.epsilon for node, s in spend.items()}
    if audit is not None:
        audit.append(
            "statistics.finished",
            run_id=str(run_id),
            job=name,
            answered=json_list(result.answered),
            refused={r.node: r.code for r in result.refusals},
            epsilon=json_object(spent),
        )
    for refusal in result.refusals:
        log(WARNING, "consortia: %s refused [%s]: %s", refusal.node, refusal.code, refusal.reason)
    log(INFO, "consortia: statistics of %d node(s) written to %s", len(spent), out_dir.resolve())


def _audited(run_id: int, loaded: LoadedConfig, resume: Path | None) -> AuditedListener | None:
    """Under the coordinator service, a listener that also writes the coordinator's audit log."""
    service = coordinator_from_environment()
    if service is None:
        return None
    return AuditedListener(
        LogListener(),
        audit_log(service),
        run_id,
        loaded.config.name,
        config_sha256(loaded.config),
        resumed_after=0 if resume is None else newest_checkpoint(resume)[0].doc.round,
    )


def _loaded_config(run_config: UserConfig, resume: Path | None) -> LoadedConfig:
    """The job to run. Resuming (`resume` = a run folder), a job given must be the run's
    own (checked against its checkpoint); without one, the run's own config is used."""
    job_text = run_config.get(JOB_TOML_KEY)
    if job_text:
        return load_job_text(str(job_text), str(run_config.get(JOB_SOURCE_KEY) or "job.toml"))
    job_path = run_config.get("job")
    if job_path:
        return load_job(Path(str(job_path)))
    if resume is not None:
        return run_config_of(resume)
    scenario_ref = run_config.get("scenario")
    return load_scenario(str(scenario_ref) if scenario_ref else None)


def _run_dir(context: Context, name: str) -> Path:
    service = coordinator_from_environment()
    if service is not None:
        return service.runs_dir / f"run-{context.run_id}"
    base = Path(str(context.run_config.get(OUT_DIR_KEY) or "runs"))
    return default_run_dir(base, name)
