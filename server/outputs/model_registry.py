"""The model registry: every round checkpoint of every run, and exporting one to PyTorch.

A run folder's `checkpoints/` is the registry's source of truth: each
checkpoint states its round, metrics, ε per node and the hashes of the
run's manifest and of the round's model file, and carries the model itself.
Export writes a plain PyTorch state dict (`torch.save` of `{name: tensor}`)
after loading it into the model built from the run's own config, so a file
that does not fit the architecture is never written.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from consortia.common.atomic import FileAccess, write_bytes_atomic
from consortia.common.config import JobConfig
from consortia.common.errors import ConsortiaError
from consortia.common.models import architecture_hash, build_model
from consortia.server.outputs.checkpoint import (
    CheckpointError,
    RoundCheckpoint,
    checkpoint_dir,
    checkpoint_file,
    checkpoint_files,
    read_checkpoint,
)
from consortia.server.outputs.resume import config_of, newest_checkpoint


class CheckpointSummary(BaseModel):
    """One row of `consortia models list`."""

    run: str
    run_dir: Path
    round: int
    rounds_planned: int
    accuracy: float | None
    loss: float | None
    epsilon: dict[str, float] | None  # None: the run trains without DP (no finite ε)
    epsilon_max: float | None
    manifest_sha256: str
    model_sha256: str
    path: Path


@dataclass(frozen=True)
class Listing:
    """Every readable checkpoint, and one line per file that could not be read."""

    checkpoints: list[CheckpointSummary]
    problems: list[str]


def run_dirs(path: Path) -> list[Path]:
    """`path` itself if it is a run folder, else the run folders directly inside it."""
    if not path.is_dir():
        raise ConsortiaError(f"{path}: no such folder")
    if checkpoint_dir(path).is_dir():
        return [path]
    found = sorted(child for child in path.iterdir() if checkpoint_dir(child).is_dir())
    if not found:
        raise ConsortiaError(f"{path}: neither a run folder nor a folder of runs (no checkpoints/)")
    return found


def list_checkpoints(path: Path) -> Listing:
    rows, problems = [], []
    for run_dir in run_dirs(path):
        for _, file in checkpoint_files(run_dir):
            try:
                rows.append(summarize(run_dir, read_checkpoint(file)))
            except CheckpointError as exc:
                problems.append(exc.message)
    return Listing(checkpoints=rows, problems=problems)


def summarize(run_dir: Path, checkpoint: RoundCheckpoint) -> CheckpointSummary:
    doc = checkpoint.doc
    last = doc.records[-1] if doc.records else None
    epsilon = doc.epsilon if doc.manifest.private else None
    return CheckpointSummary(
        run=run_dir.name,
        run_dir=run_dir,
        round=doc.round,
        rounds_planned=doc.rounds_planned,
        accuracy=last.accuracy if last else None,
        loss=last.loss if last else None,
        epsilon=epsilon,
        epsilon_max=None if epsilon is None else max(epsilon.values(), default=0.0),
        manifest_sha256=doc.manifest_sha256,
        model_sha256=doc.model_sha256,
        path=checkpoint_file(run_dir, doc.round),
    )


def load_checkpoint(run_dir: Path, server_round: int | None) -> RoundCheckpoint:
    """The run's checkpoint of `server_round`, or its newest readable one."""
    if not run_dir.is_dir():
        raise ConsortiaError(f"{run_dir}: no such run folder")
    if server_round is None:
        checkpoint, _ = newest_checkpoint(run_dir)
        return checkpoint
    rounds = [r for r, _ in checkpoint_files(run_dir)]
    if server_round not in rounds:
        have = f"rounds {rounds[0]}..{rounds[-1]}" if rounds else "none"
        raise ConsortiaError(f"{run_dir}: no checkpoint of round {server_round} (present: {have})")
    return read_checkpoint(checkpoint_file(run_dir, server_round))


@dataclass(frozen=True)
class Export:
    path: Path
    tensors: int
    architecture_matches: bool  # the built model's hash equals the manifest's


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint's model, built from the run's own config and loaded with its weights."""

    checkpoint: RoundCheckpoint
    config: JobConfig  # a ScenarioConfig for a simulation run
    model: nn.Module
    state: dict[str, torch.Tensor]


def load_model(run_dir: Path, server_round: int | None) -> LoadedModel:
    """The model of `server_round` (default: the newest readable) as the run's config builds it."""
    checkpoint = load_checkpoint(run_dir, server_round)
    doc = checkpoint.doc
    config = config_of(doc.manifest, run_dir).config
    model = build_model(config.model, tuple(doc.feature_shape), doc.num_classes, config.seed)
    state = {key: torch.from_numpy(np.array(checkpoint.model[key])) for key in doc.model_keys}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConsortiaError(
            f"round {doc.round} of {run_dir.name} does not fit the model its config builds: {exc}"
        ) from None
    return LoadedModel(checkpoint=checkpoint, config=config, model=model, state=state)


def export_state_dict(run_dir: Path, server_round: int | None, out: Path) -> Export:
    """Write the checkpoint's model as a PyTorch state dict that the run's model loads."""
    loaded = load_model(run_dir, server_round)
    doc, model, state = loaded.checkpoint.doc, loaded.model, loaded.state
    if out.exists() and out.is_dir():
        raise ConsortiaError(f"{out}: is a folder; give a file name such as model.pt")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(out, buffer.getvalue(), FileAccess.UMASK)
    return Export(
        path=out,
        tensors=len(state),
        architecture_matches=architecture_hash(model) == doc.manifest.model_architecture,
    )
