"""Resuming a run from its newest complete checkpoint.

A run continues only as the job it was: the job's config must hash to the
checkpoint's `config_sha256`, the rediscovered nodes must carry the names and
data fingerprints of the run's manifest (Flower's node ids change between
runs, names do not, and cohorts are drawn by name), and the model must have
the same architecture. A damaged newest checkpoint (only possible through
outside damage: every checkpoint is renamed into place whole) is passed over
with a note in favour of the previous complete one; the rounds after the
checkpoint are run again, and their files replaced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from consortia.common.config import JobConfig, ScenarioConfig
from consortia.common.config_io import LoadedConfig, LoadedScenario, validate_model
from consortia.common.errors import FederationError
from consortia.server.outputs.checkpoint import (
    CheckpointError,
    RoundCheckpoint,
    checkpoint_file,
    checkpoint_files,
    read_checkpoint,
)
from consortia.server.outputs.manifest import Manifest, config_sha256, legacy_config_sha256
from consortia.server.outputs.metrics_file import METRICS_FILE
from consortia.server.rounds.roster import Roster


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, and the damaged newer ones passed over."""

    run_dir: Path
    checkpoint: RoundCheckpoint
    skipped: list[str] = field(default_factory=list)

    @property
    def next_round(self) -> int:
        return self.checkpoint.doc.round + 1

    def check_federation(
        self, roster: Roster, feature_shape: tuple[int, ...], num_classes: int, architecture: str
    ) -> None:
        """Refuse to continue over other nodes, other data or another model."""
        doc = self.checkpoint.doc
        expected = doc.manifest.data_fingerprints
        found = {node.name: node.data_fingerprint for node in roster.nodes}
        if found != expected:
            problems = [f"{n} is missing" for n in sorted(set(expected) - set(found))]
            problems += [f"{n} is new" for n in sorted(set(found) - set(expected))]
            problems += [
                f"{n} holds other data (fingerprint {found[n][:12]}…, was {expected[n][:12]}…)"
                for n in sorted(set(found) & set(expected))
                if found[n] != expected[n]
            ]
            raise FederationError(
                f"run {self.run_dir.name}: the federation changed since the run started "
                f"({'; '.join(problems)}); resuming would continue on other data"
            )
        if (tuple(feature_shape), num_classes) != (tuple(doc.feature_shape), doc.num_classes):
            raise FederationError(
                f"run {self.run_dir.name}: the nodes' data layout changed "
                f"({list(feature_shape)}/{num_classes} classes, "
                f"was {list(doc.feature_shape)}/{doc.num_classes})"
            )
        if architecture != doc.manifest.model_architecture:
            raise FederationError(
                f"run {self.run_dir.name}: the model's architecture hash changed "
                f"({architecture[:12]}…, was {doc.manifest.model_architecture[:12]}…); "
                "consortia was upgraded or the model registry changed since the run started"
            )


def load_resume_point(
    run_dir: Path, config: JobConfig, server_round: int | None = None
) -> ResumePoint:
    """The checkpoint to continue `run_dir` from (the newest complete one, or `server_round`).

    Raises `FederationError` when there is none, when the run already
    finished, or when `config` is not the job the run started with.
    """
    checkpoint, skipped = _pick(run_dir, server_round)
    doc = checkpoint.doc
    if _finished(run_dir) and doc.round >= doc.rounds_planned:
        raise FederationError(
            f"run {run_dir.name} already finished ({doc.round} of {doc.rounds_planned} rounds); "
            "there is nothing to resume"
        )
    current = config_sha256(config)
    if doc.config_sha256 not in (current, legacy_config_sha256(config)):
        raise FederationError(
            f"run {run_dir.name}: the job's config (sha256 {current[:12]}…) is not the one the "
            f"run started with ({doc.config_sha256[:12]}…); resuming would mix two jobs. "
            "Resume with the run's own config, or start a new run"
        )
    return ResumePoint(run_dir=run_dir, checkpoint=checkpoint, skipped=skipped)


def newest_checkpoint(run_dir: Path) -> tuple[RoundCheckpoint, list[str]]:
    """The newest checkpoint that reads and verifies, and why newer ones were passed over."""
    return _pick(run_dir, None)


def run_config(run_dir: Path) -> LoadedConfig:
    """The job (or scenario) a run started with, from its newest complete checkpoint."""
    checkpoint, _ = _pick(run_dir, None)
    return config_of(checkpoint.doc.manifest, run_dir)


def config_of(manifest: Manifest, run_dir: Path) -> LoadedConfig:
    """The manifest's resolved config, validated again: a `LoadedScenario` for a simulation
    (its config has a `simulation` block), a plain `LoadedConfig` for a deployment job."""
    source = f"{run_dir / 'manifest.json'} (config)"
    if "simulation" in manifest.config:
        return LoadedScenario(
            config=validate_model(ScenarioConfig, dict(manifest.config), source),
            source=manifest.scenario_source,
            source_sha256=manifest.scenario_source_sha256,
        )
    return LoadedConfig(
        config=validate_model(JobConfig, dict(manifest.config), source),
        source=manifest.scenario_source,
        source_sha256=manifest.scenario_source_sha256,
    )


def _pick(run_dir: Path, server_round: int | None) -> tuple[RoundCheckpoint, list[str]]:
    if not run_dir.is_dir():
        raise FederationError(f"{run_dir}: no such run folder")
    if server_round is not None:
        return read_checkpoint(checkpoint_file(run_dir, server_round)), []
    files = checkpoint_files(run_dir)
    if not files:
        raise FederationError(
            f"{run_dir}: no checkpoint to resume from (no round finished, or not a run folder)"
        )
    skipped: list[str] = []
    for _, path in reversed(files):
        try:
            return read_checkpoint(path), skipped
        except CheckpointError as exc:
            skipped.append(f"passed over {exc.message}")
    raise FederationError(f"{run_dir}: no readable checkpoint ({'; '.join(skipped)})")


def _finished(run_dir: Path) -> bool:
    """Whether metrics.json has its `final` block (written after the last round's files)."""
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and metrics.get("final") is not None
