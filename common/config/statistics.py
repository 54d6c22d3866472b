"""The DP statistics releases a job may ask the nodes for.

`[label_histogram]`: each node's training-label counts, once per training run
(to report label skew); `[statistics]`: the query of `consortia job stats`.
Both are Gaussian-mechanism releases charged to the node's ε.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from consortia.common.config.privacy import Epsilon, NoiseMultiplier
from consortia.common.config.strict import StrictModel


class LabelHistogramConfig(StrictModel):
    """Ask each node once per run for its training labels' histogram, under the Gaussian mechanism.

    One record changes one count by 1, so the L2 sensitivity is 1 and the
    noise std is `noise_multiplier`. The release is charged to the node's ε
    (and calibrated into the job's target); a node shares it only if its
    policy allows.
    """

    noise_multiplier: NoiseMultiplier = Field(description="std of the noise added to every count")


class StatisticsConfig(StrictModel):
    """A federated statistics query (`consortia job stats`): what each node releases, how noisy.

    Each node releases its label counts, per-feature histograms over `bins`
    equal bins of each feature's public range, the clipped sums and sums of
    squares behind means and variances, its missing-value counts and, with
    `model`, per-class (and per-`group_column`) counts of correct
    predictions: every block under the Gaussian mechanism with noise std
    σ × the block's L2 sensitivity. Give `noise_multiplier` (σ) or
    `target_epsilon` (ε of the whole query at the node's δ; the node derives
    σ). Ranges come from `ranges`, else from the node's schema (deployment)
    or the bundled source's public scale (simulation); a feature with no
    public range is not released (a range read off the data would leak it).
    """

    noise_multiplier: NoiseMultiplier | None = None
    target_epsilon: Epsilon | None = None
    bins: int = Field(default=10, ge=2, le=200, description="histogram bins per feature")
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="feature name -> [low, high] of its histogram"
    )
    features: tuple[str, ...] | None = Field(
        default=None, description="features to describe (default: every one with a range)"
    )
    min_count: float = Field(
        default=10.0, ge=0, description="noisy counts below this are suppressed in the report"
    )
    confidence: float = Field(default=0.99, gt=0.5, lt=1, description="level of the error bars")
    model: str | None = Field(
        default=None,
        description="a run folder whose final model's per-class and per-node accuracy the "
        "nodes release (relative: to the coordinator's runs folder, or the working folder)",
    )
    group_column: str | None = Field(
        default=None, description="category column of the schema for per-group accuracy"
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> StatisticsConfig:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("set exactly one of 'target_epsilon' or 'noise_multiplier'")
        for name, (low, high) in self.ranges.items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"ranges.{name}: [{low}, {high}] is not a range (low < high)")
        if self.group_column is not None and self.model is None:
            raise ValueError("'group_column' needs 'model' (it splits the model's accuracy)")
        return self
