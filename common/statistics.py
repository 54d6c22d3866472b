"""The federated statistics query: its blocks, their sensitivities, its noise, and its release.

A node answers a statistics query with a few *blocks* of numbers, each a
vector query on its records released under the Gaussian mechanism: noise of
std σ × Δ₂ on every entry, Δ₂ being the block's L2 sensitivity under adding
or removing one record (the neighbouring relation of the node's DP-SGD):

- `labels`: the count of each class; one record moves one count by 1 (Δ₂ = 1).
- `histograms`: for each of F features, counts over the job's bins of its
  public range (values outside clip to the end bins); one record moves one
  bin per feature (Δ₂ = √F).
- `sums`, `squares`: Σu and Σu² per feature, u = the value mapped from its
  range onto [−1, 1] (clipped); one record moves each by at most 1 (Δ₂ = √F).
- `missing`: the records read and each column's missing values; one record
  moves the first by 1 and each of the k others by at most 1 (Δ₂ = √(k+1)).
- `accuracy`: the test records and those the model got right (Δ₂ = √2);
  `classes`: the same per class (Δ₂ = √2), and `groups` per group of a
  sensitive column (Δ₂ = √2). A node's accuracy comes from `accuracy`, not
  from the per-class counts, whose summed noise grows with the classes.

B blocks of one σ compose, under RDP as under PLD, exactly like one Gaussian
mechanism of noise multiplier σ/√B (the privacy losses of Gaussians add up
in ρ = 1/(2σ²)). That single release, at sample rate 1 for one step, is what
the node records in its ledger: the same accountant that composes its DP-SGD.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError

from consortia.common.config import StatisticsConfig, StrictModel
from consortia.common.errors import FederationError
from consortia.common.privacy import AccountantName, Release, calibrate_noise

Block = Literal[
    "labels", "histograms", "sums", "squares", "missing", "accuracy", "classes", "groups"
]

STATISTICS_KEY = "statistics"  # ConfigRecord key of the release (node -> coordinator)
MESSAGE_ACTION = "statistics"  # the query's message type is "query.statistics"
MESSAGE_TYPE = f"query.{MESSAGE_ACTION}"


class _Released(StrictModel):
    """A release from a node: strict, and every number finite (NaN or ∞ is malformed)."""

    model_config = ConfigDict(allow_inf_nan=False)


class FeatureRelease(_Released):
    """One feature's noisy histogram and moments (u-units: the range mapped onto [−1, 1])."""

    name: str
    low: float
    high: float
    histogram: tuple[float, ...]
    sum: float
    sum_squares: float


class MissingRelease(_Released):
    """Noisy count of the records read and of each column's missing values."""

    records_read: float
    per_column: dict[str, float]


class AccuracyRelease(_Released):
    """Noisy test records and correct predictions: in all, per class, and per group."""

    total: float
    correct: float
    class_total: tuple[float, ...]
    class_correct: tuple[float, ...]
    group_column: str | None = None
    group_total: dict[str, float] = Field(default_factory=dict)
    group_correct: dict[str, float] = Field(default_factory=dict)


class StatisticsRelease(_Released):
    """What one node sends back: every block, the noise it carries, and the ε it cost."""

    label_counts: tuple[float, ...]
    features: tuple[FeatureRelease, ...] = ()
    unranged: tuple[str, ...] = Field(
        default=(), description="features with no public range: not released"
    )
    missing: MissingRelease | None = None
    accuracy: AccuracyRelease | None = None
    noise_multiplier: float = Field(gt=0, description="σ of every block")
    sensitivity: dict[str, float]
    epsilon: float = Field(ge=0, description="ε of this query alone, at `delta`")
    epsilon_spent: float = Field(ge=0, description="the dataset's ε after this query")
    delta: float = Field(gt=0, lt=1)

    def problem(self, num_classes: int, bins: int) -> str | None:
        """Why this release cannot be pooled with the others of the query, or None.

        Every list must have the query's length and every block present its
        sensitivity (the error bars are computed from it).
        """
        if len(self.label_counts) != num_classes:
            return f"{len(self.label_counts)} label counts for {num_classes} classes"
        blocks: set[str] = {"labels"}
        if self.features:
            blocks |= {"histograms", "sums", "squares"}
        if any(len(f.histogram) != bins for f in self.features):
            return f"a feature histogram without the query's {bins} bins"
        if self.missing is not None:
            blocks.add("missing")
        accuracy = self.accuracy
        if accuracy is not None:
            blocks |= {"accuracy", "classes"}
            if not len(accuracy.class_total) == len(accuracy.class_correct) == num_classes:
                return f"per-class accuracy counts that are not {num_classes} long"
            if set(accuracy.group_total) != set(accuracy.group_correct):
                return "group counts with different groups for totals and correct"
            if accuracy.group_total:
                blocks.add("groups")
        absent = sorted(b for b in blocks if self.sensitivity.get(b, 0.0) <= 0)
        if absent:
            return f"no positive sensitivity for block(s) {', '.join(absent)}"
        return None

    def std(self, block: Block) -> float:
        """The noise std of every entry of `block`."""
        return self.noise_multiplier * self.sensitivity[block]

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, text: object) -> StatisticsRelease:
        if not isinstance(text, str):
            raise FederationError(f"reply has no '{STATISTICS_KEY}' document")
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = str(exc).splitlines()[:3]
            raise FederationError(f"malformed statistics release: {' '.join(first)}") from None


def sensitivities(
    num_features: int,
    missing_columns: int | None,
    accuracy: bool,
    groups: bool,
) -> dict[Block, float]:
    """Δ₂ of each block the node releases (see the module docstring)."""
    blocks: dict[Block, float] = {"labels": 1.0}
    if num_features:
        root = math.sqrt(num_features)
        blocks.update({"histograms": root, "sums": root, "squares": root})
    if missing_columns is not None:
        blocks["missing"] = math.sqrt(missing_columns + 1)
    if accuracy:
        blocks["accuracy"] = blocks["classes"] = math.sqrt(2.0)
    if groups:
        blocks["groups"] = math.sqrt(2.0)
    return blocks


def query_noise(
    config: StatisticsConfig, blocks: int, delta: float, accountant: AccountantName
) -> tuple[float, Release]:
    """(σ of every block, the single release they compose to) for a query of `blocks` blocks.

    With `target_epsilon`, the composed release is calibrated to it at the
    node's δ and accountant, and σ = its noise multiplier × √blocks.
    """
    root = math.sqrt(blocks)
    if config.noise_multiplier is not None:
        sigma = config.noise_multiplier
    else:
        assert config.target_epsilon is not None  # StatisticsConfig
        sigma = calibrate_noise(config.target_epsilon, delta, 1.0, 1, accountant) * root
    return sigma, Release(noise_multiplier=sigma / root, sample_rate=1.0, steps=1)
