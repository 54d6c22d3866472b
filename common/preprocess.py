"""Scaling of tabular features with public, schema-declared value ranges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogRangeScaler:
    """log1p, then map the declared [low, high] range onto [-1, 1].

    Lab values and measurements such as areas are positive and heavy-tailed;
    the log keeps one large record from flattening the rest, and a fixed
    range keeps every node's features on one common scale.
    """

    low: np.ndarray
    high: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        low, high = np.log1p(self.low), np.log1p(self.high)
        span = np.where(high > low, high - low, 1.0)
        scaled: np.ndarray = (2.0 * (np.log1p(np.maximum(x, 0.0)) - low) / span - 1.0).astype(
            np.float32
        )
        return scaled
