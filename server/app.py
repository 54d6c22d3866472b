"""consortia's Flower ServerApp, for the stock tooling (`flwr run .`).

The run config (`[tool.flwr.app.config]` in pyproject.toml, or
`flwr run . --run-config ...`) names the scenario (simulation) or the job
file (deployment: `job = "/path/job.toml"`) and the output folder.
`consortia simulate` builds the same federation through
`consortia.server.simulation` instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from consortia.common.config_io import load_job, load_scenario
from consortia.server.federation import run_federation
from consortia.server.label_skew import LabelSkew
from consortia.server.roster import Roster
from consortia.server.run_dirs import default_run_dir
from consortia.server.run_log import RoundRecord

app = ServerApp()
_log = logging.getLogger("consortia")


class LogListener:
    """Progress as log lines (there is no terminal UI under `flwr run`)."""

    def on_start(self, total_rounds: int, roster: Roster, skew: LabelSkew | None) -> None:
        _log.warning("consortia: %d rounds over nodes %s", total_rounds, ", ".join(roster.names))
        for line in skew.lines() if skew is not None else []:
            _log.warning("consortia: %s", line)

    def on_round(self, record: RoundRecord) -> None:
        _log.warning(
            "consortia: round %d accuracy=%s max ε=%.3f",
            record.round,
            f"{record.accuracy:.4f}" if record.accuracy is not None else "n/a",
            max(record.epsilon.values(), default=0.0),
        )
        for failure in record.failures:
            _log.warning("consortia: round %d: %s", record.round, failure)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the job (`job` = path of a job TOML) or the scenario named in the run config."""
    job_path = context.run_config.get("job")
    scenario_ref = context.run_config.get("scenario")
    loaded = (
        load_job(Path(str(job_path)))
        if job_path
        else load_scenario(str(scenario_ref) if scenario_ref else None)
    )
    base = Path(str(context.run_config.get("out-dir", "runs")))
    out_dir = default_run_dir(base, loaded.config.name)
    summary = run_federation(grid, loaded, out_dir, LogListener())
    _log.warning("consortia: run written to %s", summary.out_dir.resolve())
