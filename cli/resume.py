"""`consortia simulate --resume RUN_DIR`: which scenario continues the run, checked up front.

The checks that need no simulation engine happen here, before Ray starts:
no readable checkpoint, a finished run, a job that is not the run's own.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from consortia.common.config import ScenarioConfig
from consortia.common.config_io import LoadedScenario, load_scenario, validate_model
from consortia.common.errors import ConsortiaError


def resumed_scenario(
    console: Console,
    run_dir: Path,
    scenario: str | None,
    out: Path | None,
    overrides: dict[str, int | None],
) -> tuple[LoadedScenario, Path]:
    """The scenario that resumes `run_dir` (`scenario`, or the run's own) and the folder to write.

    Without `scenario` the run's own resolved config is used (from its
    checkpoint's manifest), so `--rounds`/`--seed` need not be repeated.
    """
    from consortia.server.outputs.resume import load_resume_point, run_config

    if out is not None and out.resolve() != run_dir.resolve():
        raise ConsortiaError(
            "a resumed run writes into its own folder; drop --out or give it --resume's folder"
        )
    if scenario is not None:
        loaded = load_scenario(scenario, overrides)
    else:
        own = run_config(run_dir)
        if not isinstance(own, LoadedScenario):
            raise ConsortiaError(
                f"{run_dir}: the run of a deployment job, not a simulation; "
                "resume it on the coordinator"
            )
        data = own.config.model_dump(mode="json")
        data.update({key: value for key, value in overrides.items() if value is not None})
        config = validate_model(ScenarioConfig, data, own.source)
        loaded = own.model_copy(update={"config": config})
    point = load_resume_point(run_dir, loaded.config)
    for note in point.skipped:
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    console.print(
        f"resuming {escape(str(run_dir))} after round {point.checkpoint.doc.round} "
        f"of {loaded.config.rounds}",
        highlight=False,
    )
    return loaded, run_dir
