"""Global model checkpoints: one safetensors file per round, written atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord
from safetensors.numpy import save

from consortia.common.atomic import write_bytes_atomic


def checkpoint_path(model_dir: Path, server_round: int) -> Path:
    return model_dir / f"round-{server_round:03d}.safetensors"


def save_checkpoint(model_dir: Path, server_round: int, arrays: ArrayRecord) -> Path:
    """Write the round's global model; the bytes depend only on the arrays (no timestamps)."""
    tensors = {key: np.ascontiguousarray(array.numpy()) for key, array in arrays.items()}
    path = checkpoint_path(model_dir, server_round)
    write_bytes_atomic(path, save(tensors))
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
