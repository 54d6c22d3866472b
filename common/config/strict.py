"""`StrictModel`, the base of every config model in this package.

Unknown keys are errors, so a typo in a privacy setting is never silently
ignored; values are frozen, so a config cannot drift from what was validated.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
