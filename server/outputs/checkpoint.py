"""The round checkpoint: everything a run needs to continue after round N, in one file.

`checkpoints/round-NNN.safetensors` is written atomically (temporary file,
fsync, rename) after every round, before metrics.json, so a run killed at
any moment leaves complete checkpoints only. One safetensors file holds

- tensors `model/<name>`: the global model after the round;
- tensors `strategy/<attribute>/<name>`: the strategy's state (FedAdam's
  moments; see strategy_state.py);
- tensors `rng/python`, `rng/numpy`, `rng/torch`: the coordinator's generators;
- the string metadata entry `consortia.checkpoint`: a `CheckpointDoc` (JSON)
  with the round, the hashes of the job's config and manifest (and the
  manifest itself, so a checkpoint stands alone), each node's ε and DP
  releases so far, the round records metrics.json is rebuilt from, and the
  sha256 of every tensor above, so damage inside the data is caught too.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
from flwr.app import Array, ArrayRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load, save

from consortia.common.atomic import FileAccess, write_bytes_atomic
from consortia.common.errors import FederationError
from consortia.common.privacy import Release
from consortia.server.outputs.manifest import Manifest
from consortia.server.rounds.rng_state import RngScalars, RngState
from consortia.server.rounds.run_log import RoundRecord
from consortia.server.rounds.strategy_state import StrategyState

CHECKPOINT_DIR = "checkpoints"
SCHEMA_VERSION: Final = 1
METADATA_KEY = "consortia.checkpoint"
MODEL_PREFIX = "model/"
STRATEGY_PREFIX = "strategy/"


class CheckpointError(FederationError):
    """A checkpoint file is missing, damaged, or not a consortia checkpoint."""


class CheckpointDoc(BaseModel):
    """The checkpoint's metadata document (validated when read)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    round: int = Field(ge=1)
    rounds_planned: int = Field(ge=1)
    config_sha256: str
    manifest_sha256: str  # of manifest.json as written (== sha256 of the file)
    manifest: Manifest
    model_keys: list[str]  # the model's array names in state-dict order
    model_sha256: str  # of model/round-NNN.safetensors (the arrays alone)
    feature_shape: tuple[int, ...]
    num_classes: int
    epsilon: dict[str, float]  # ε each node reported so far
    releases: dict[str, list[Release]]  # each node's DP releases the coordinator saw
    records: list[RoundRecord]  # rounds 1..round, as in metrics.json
    rng: RngScalars
    tensors_sha256: str = ""  # filled in when written


@dataclass(frozen=True)
class RoundCheckpoint:
    """One checkpoint in memory: its document and its arrays."""

    doc: CheckpointDoc
    model: dict[str, np.ndarray]
    strategy: StrategyState
    rng: RngState

    def arrays(self) -> ArrayRecord:
        """The global model as Flower's ArrayRecord, in the model's own key order."""
        return ArrayRecord({key: Array(self.model[key]) for key in self.doc.model_keys})

    def tensors(self) -> dict[str, np.ndarray]:
        tensors = {MODEL_PREFIX + key: array for key, array in self.model.items()}
        for attribute, arrays in self.strategy.items():
            for key, array in arrays.items():
                tensors[f"{STRATEGY_PREFIX}{attribute}/{key}"] = array
        tensors.update(self.rng.tensors())
        return {key: np.ascontiguousarray(array) for key, array in tensors.items()}


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR


def checkpoint_file(run_dir: Path, server_round: int) -> Path:
    return checkpoint_dir(run_dir) / f"round-{server_round:03d}.safetensors"


def checkpoint_files(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, path) of every checkpoint file present, by round; nothing is read."""
    found = []
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    for path in folder.glob("round-*.safetensors"):
        digits = path.name.removeprefix("round-").removesuffix(".safetensors")
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def write_checkpoint(run_dir: Path, checkpoint: RoundCheckpoint) -> Path:
    """Write the checkpoint atomically; return its path."""
    tensors = checkpoint.tensors()
    doc = checkpoint.doc.model_copy(update={"tensors_sha256": tensors_sha256(tensors)})
    path = checkpoint_file(run_dir, doc.round)
    write_bytes_atomic(
        path,
        save(tensors, metadata={METADATA_KEY: doc.model_dump_json()}),
        FileAccess.UMASK,
    )
    return path


def read_checkpoint(path: Path) -> RoundCheckpoint:
    """Read and verify one checkpoint, or raise `CheckpointError` saying what is wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: damaged or incomplete ({exc})") from None
    text = _metadata(data).get(METADATA_KEY)
    if text is None:
        raise CheckpointError(f"{path}: not a consortia checkpoint (no '{METADATA_KEY}')")
    try:
        doc = CheckpointDoc.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise CheckpointError(
            f"{path}: checkpoint metadata does not validate ({where}: {first['msg']}); "
            f"written by another consortia version?"
        ) from None
    if tensors_sha256(tensors) != doc.tensors_sha256:
        raise CheckpointError(f"{path}: damaged (its arrays do not match their recorded sha256)")
    expected_name = f"round-{doc.round:03d}.safetensors"
    if path.name != expected_name:
        raise CheckpointError(f"{path}: holds round {doc.round}, expected in {expected_name}")
    return _split(path, doc, tensors)


def _split(path: Path, doc: CheckpointDoc, tensors: dict[str, np.ndarray]) -> RoundCheckpoint:
    model = {key: tensors.get(MODEL_PREFIX + key) for key in doc.model_keys}
    missing = [key for key, array in model.items() if array is None]
    if missing:
        raise CheckpointError(f"{path}: model arrays missing: {missing}")
    strategy: StrategyState = {}
    for name, array in tensors.items():
        if name.startswith(STRATEGY_PREFIX):
            attribute, _, key = name.removeprefix(STRATEGY_PREFIX).partition("/")
            strategy.setdefault(attribute, {})[key] = array
    try:
        rng = RngState.from_tensors(doc.rng, tensors)
    except KeyError as exc:
        raise CheckpointError(f"{path}: generator state {exc} missing") from None
    return RoundCheckpoint(
        doc=doc,
        model={key: array for key, array in model.items() if array is not None},
        strategy=strategy,
        rng=rng,
    )


def _metadata(data: bytes) -> dict[str, str]:
    """The header's `__metadata__` (the header was validated by `load` already)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}\0{array.dtype.str}\0{list(array.shape)}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
