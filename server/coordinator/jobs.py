"""Jobs on the deployment engine: a job file becomes a Flower run that carries no code.

Flower ships an app to the SuperLink as a FAB (a zip of the app's folder),
and by default installs its dependencies and imports its Python files on the
coordinator and on every node. A consortia job's FAB holds exactly one file:
a generated `pyproject.toml` that names the *installed* consortia ServerApp
and ClientApp as components, declares no dependencies, and carries the job
TOML text (validated here, validated again by the ServerApp and by every
node) in its run config. So the job proven in simulation travels unchanged,
and nothing executable travels at all.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from consortia.common.atomic import FileAccess, write_bytes_atomic
from consortia.common.errors import FederationError
from consortia.server.coordinator.config import CoordinatorConfig

JOB_TOML_KEY = "job-toml"
JOB_SOURCE_KEY = "job-source"
RESUME_KEY = "resume"
OUT_DIR_KEY = "out-dir"
JOB_KIND_KEY = "job-kind"
TRAIN_KIND = "train"  # `consortia job submit`
STATISTICS_KIND = "statistics"  # `consortia job stats`

_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "consortia-job"
version = "1.0.0"
description = "A consortia job: configuration only, served by the installed consortia apps"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "consortia"

[tool.flwr.app.components]
serverapp = "consortia.server.app:app"
clientapp = "consortia.client.app:app"

[tool.flwr.app.config]
{config}
"""


def toml_string(value: str) -> str:
    """A TOML basic string: JSON's string escapes are all valid TOML escapes."""
    return json.dumps(value, ensure_ascii=False)


def build_job_fab(
    job_text: str, source: str, resume: str = "", kind: str = TRAIN_KIND
) -> tuple[bytes, str]:
    """The FAB (bytes, sha256) of a job: a pyproject.toml and nothing else."""
    from flwr.cli.build import build_fab_from_disk

    config = "\n".join(
        f"{key} = {toml_string(value)}"
        for key, value in (
            (JOB_TOML_KEY, job_text),
            (JOB_SOURCE_KEY, source),
            (RESUME_KEY, resume),
            (OUT_DIR_KEY, ""),
            (JOB_KIND_KEY, kind),
        )
    )
    with tempfile.TemporaryDirectory(prefix="consortia-job-") as folder:
        (Path(folder) / "pyproject.toml").write_text(
            _PYPROJECT.format(config=config), encoding="utf-8"
        )
        fab = build_fab_from_disk(Path(folder))
    return fab, hashlib.sha256(fab).hexdigest()


JOB_COPY = "job.toml"  # the submitted job's exact text, kept in its run folder


def run_dir(config: CoordinatorConfig, run_id: int) -> Path:
    """Where the coordinator's ServerApp writes Flower run `run_id`."""
    return config.runs_dir / f"run-{run_id}"


def keep_job_text(out_dir: Path, text: str) -> None:
    """Keep the job text beside the run's outputs: `job resume` resubmits exactly this."""
    write_bytes_atomic(out_dir / JOB_COPY, text.encode("utf-8"), FileAccess.UMASK)


def resumable_run(config: CoordinatorConfig, run_id: int) -> tuple[Path, str, str]:
    """(run folder, job text, job source) of a run this coordinator can resume."""
    folder = run_dir(config, run_id)
    job_file = folder / JOB_COPY
    if not job_file.is_file():
        raise FederationError(
            f"run {run_id} has no record at {folder} (it never started on this coordinator, "
            "or it was resumed into another run's folder: resume that run instead)"
        )
    metrics = _metrics(folder)
    if metrics is not None and metrics.get("final") is not None:
        raise FederationError(f"run {run_id} already finished ({folder}); nothing to resume")
    return folder, job_file.read_text(encoding="utf-8"), str(job_file)


def describe_run_dir(config: CoordinatorConfig, run_id: int) -> list[str]:
    """What the run's folder says: rounds done, last accuracy, ε per node, final model."""
    from consortia.server.rounds.run_log import NOT_PRIVATE  # imports Flower: only when asked

    folder = run_dir(config, run_id)
    metrics = _metrics(folder)
    if metrics is None:
        return [f"no consortia record yet at {folder}"]
    rounds = metrics.get("rounds", [])
    lines = [f"record: {folder}", f"rounds completed: {len(rounds)}"]
    if rounds:
        last = rounds[-1]
        accuracy = last.get("accuracy")
        epsilon = last.get("epsilon", {})
        lines.append(
            f"round {last['round']}: accuracy "
            + ("n/a" if accuracy is None else f"{accuracy:.4f}")
            + ", "
            + (
                NOT_PRIVATE  # null: trained without DP, no finite ε
                if epsilon is None
                else "ε per node " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(epsilon.items()))
            )
        )
    final = metrics.get("final")
    if final is not None:
        lines.append(f"final model: {final['model']} (sha256 {final['model_sha256']})")
    return lines


def _metrics(folder: Path) -> dict[str, Any] | None:
    path = folder / "metrics.json"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FederationError(f"{path}: cannot be read ({exc})") from None
    return payload if isinstance(payload, dict) else None
