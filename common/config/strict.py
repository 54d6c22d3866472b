"""`StrictModel`, the base of every config model in this package.

Unknown keys are errors, so a typo in a privacy setting is never silently
ignored; values are frozen, so a config cannot drift from what was validated;
floats are finite (TOML's `inf` and `nan` are refused): no setting of ours
means anything at infinity, and a non-finite privacy setting hung the
accountants.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values frozen, floats finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
