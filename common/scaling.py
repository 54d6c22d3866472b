"""How a dataset's features are scaled before a model sees them, as recorded for audit.

A run's manifest (simulations) and a node's dataset registration record a
`FeatureScaling`: which kind of scaling, and for images the per-channel
constants used, so that a model can be traced to the exact input scale it
was trained on. Image constants come from public values (a scenario's or a
schema's `normalize`) or are the pixels' fixed [0, 1] scale: never from the
records themselves, which would put one node's statistics into every input
without accounting for them.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict

from consortia.common.config import ImageNormalization


class ScalingKind(StrEnum):
    """Where the scaling's constants come from."""

    PUBLIC = "public"  # declared public mean and std: (x - mean) / std
    FIXED = "fixed"  # the format's fixed value range mapped onto [0, 1]
    PUBLIC_RANGE = "public_range"  # each feature's published range mapped onto [-1, 1]
    TRAIN_SPLIT = "train_split"  # each node's own train split (node-local, not recorded)
    NONE = "none"  # values as parsed; one-hot columns 0 or 1


class FeatureScaling(BaseModel):
    """One dataset's scaling: its kind, in words, and for images the constants per channel.

    For images, the model sees (pixel on [0, 1] − mean) / std; `mean` and
    `std` are None where no constants apply (tables, train-split statistics).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ScalingKind
    detail: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def range_of(self, channel: int) -> tuple[float, float]:
        """Where [0, 1] pixels of `channel` land after scaling (a public range)."""
        mean = 0.0 if self.mean is None else self.mean[channel]
        std = 1.0 if self.std is None else self.std[channel]
        return (0.0 - mean) / std, (1.0 - mean) / std

    def scale_images(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 pixels on [0, 1], scaled with the constants (a new array)."""
        if self.kind != ScalingKind.PUBLIC or self.mean is None or self.std is None:
            return x
        shape = (1, -1, 1, 1)
        mean = np.asarray(self.mean, dtype=x.dtype).reshape(shape)
        std = np.asarray(self.std, dtype=x.dtype).reshape(shape)
        scaled: np.ndarray = (x - mean) / std
        return scaled


def image_scaling(
    normalize: ImageNormalization | None, channels: int, pixels: str
) -> FeatureScaling:
    """The scaling of images of `channels` channels: public constants if given, else [0, 1].

    `pixels` says how the stored values reach [0, 1] ("uint8 pixels / 255").
    Raises ValueError when `normalize` gives a value count other than 1 or
    `channels`.
    """
    if normalize is None:
        return FeatureScaling(
            kind=ScalingKind.FIXED,
            detail=f"{pixels} onto [0, 1]; no public mean or std declared",
            mean=(0.0,) * channels,
            std=(1.0,) * channels,
        )
    mean, std = normalize.per_channel(channels)
    return FeatureScaling(
        kind=ScalingKind.PUBLIC,
        detail=f"{pixels} onto [0, 1], then (x - mean) / std with the declared public constants",
        mean=mean,
        std=std,
    )
