"""Global model files: `model/round-NNN.safetensors`, one per round, written atomically.

These hold the model's arrays and nothing else, so their bytes (and
`final.model_sha256` in metrics.json) depend only on the weights. The state
needed to resume a run lives beside them in `checkpoints/` (round_checkpoint.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from consortia.common.atomic import FileAccess, write_bytes_atomic


def model_path(model_dir: Path, server_round: int) -> Path:
    return model_dir / f"round-{server_round:03d}.safetensors"


def model_file_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The model file's bytes: safetensors without metadata (no timestamps, no order effects)."""
    return save({key: np.ascontiguousarray(array) for key, array in arrays.items()})


def write_model_file(model_dir: Path, server_round: int, data: bytes) -> Path:
    path = model_path(model_dir, server_round)
    write_bytes_atomic(path, data, FileAccess.UMASK)
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
