"""Labelled arrays: the in-memory form of one node's data, with its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabeledArrays:
    """Features `x` (float32, one row per record) and integer labels `y`."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} feature rows but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> LabeledArrays:
        """The records at `index`, in that order."""
        return LabeledArrays(self.x[index], self.y[index])

    def fingerprint(self) -> str:
        """sha256 over the canonical bytes (dtype, shape, C-order values) of x and y.

        Two datasets with the same fingerprint hold the same records in the
        same order; any changed value, row or label changes it.
        """
        digest = hashlib.sha256()
        for array in (np.ascontiguousarray(self.x), np.ascontiguousarray(self.y)):
            header = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape)})
            digest.update(header.encode("utf-8"))
            digest.update(array.tobytes())
        return digest.hexdigest()


def concat(parts: list[LabeledArrays]) -> LabeledArrays:
    """Stack several datasets row-wise, in the given order."""
    return LabeledArrays(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
