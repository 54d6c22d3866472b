"""The `[privacy]` block, and the ranges every privacy setting must lie in.

The ranges (`Epsilon`, `NoiseMultiplier`, `Delta`, `ClippingNorm`) are shared
by the job's `[privacy]`, its `[label_histogram]` and `[statistics]` blocks
and the node's `[policy]`, so a value one of them accepts, the others accept
too. They exist because the accountants do not fail gracefully outside them:
an ε of 1e300 sent Opacus' noise search into an endless bisection, PRV
cannot compose ε in the hundreds nor δ below ~1e-12, and ∞ or NaN reach
arithmetic that never ends. Every bound is far beyond anything meaningful
(ε = 100 promises nothing; σ = 1000 drowns any signal), so it costs no real
setting anything. Non-finite values are refused everywhere (`StrictModel`).
docs/privacy.md lists the ranges.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from consortia.common.config.strict import StrictModel

MAX_EPSILON = 100.0
"""Largest ε any setting may name (a target, a budget, a per-query limit)."""
MAX_NOISE_MULTIPLIER = 1000.0
"""Largest noise multiplier σ any setting may name."""
MIN_DELTA = 1e-10
"""Smallest δ: below ~1e-12 the PRV accountant's floating point gives up."""
MAX_DELTA = 0.1
"""Largest δ: a δ of 0.1 already allows one record in ten to be released outright."""
MAX_CLIPPING_NORM = 1e4
"""Largest clipping bound (`max_grad_norm`): beyond it the noise alone overflows float32."""

Epsilon = Annotated[float, Field(gt=0, le=MAX_EPSILON)]
NoiseMultiplier = Annotated[float, Field(gt=0, le=MAX_NOISE_MULTIPLIER)]
Delta = Annotated[float, Field(ge=MIN_DELTA, le=MAX_DELTA)]
ClippingNorm = Annotated[float, Field(gt=0, le=MAX_CLIPPING_NORM)]


class PrivacyConfig(StrictModel):
    """Sample-level DP-SGD settings every node applies to its local training.

    Give either `target_epsilon` (the node calibrates its noise so that its ε
    after *all* planned rounds stays within it) or an explicit
    `noise_multiplier` (ε is then whatever the accountant says it is).
    """

    enabled: bool = True
    target_epsilon: Epsilon | None = None
    noise_multiplier: NoiseMultiplier | None = None
    delta: Delta = 1e-5
    max_grad_norm: ClippingNorm = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if not self.enabled:
            return self
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "set exactly one of 'target_epsilon' or 'noise_multiplier' "
                "(or enabled = false to train without DP)"
            )
        return self
