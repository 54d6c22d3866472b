"""The `[privacy]` block: the sample-level DP-SGD settings every node trains under."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from consortia.common.config.strict import StrictModel


class PrivacyConfig(StrictModel):
    """Sample-level DP-SGD settings every node applies to its local training.

    Give either `target_epsilon` (the node calibrates its noise so that its ε
    after *all* planned rounds stays within it) or an explicit
    `noise_multiplier` (ε is then whatever the accountant says it is).
    """

    enabled: bool = True
    target_epsilon: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
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
