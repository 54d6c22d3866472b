"""metrics.json: every round's record and the run's final figures."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from consortia.server.rounds.run_log import RoundRecord

__all__ = ["METRICS_FILE", "FinalMetrics", "MetricsFile"]


METRICS_FILE = "metrics.json"


class FinalMetrics(BaseModel):
    """The `final` block of metrics.json.

    A run without DP has no finite ε: `private` is false and `epsilon_max`
    and `epsilon` are null, never 0 (which would read as perfect privacy).
    """

    accuracy: float | None
    loss: float | None
    private: bool = Field(description="the nodes trained with DP-SGD, so every ε is finite")
    epsilon_max: float | None = Field(description="the largest ε of any node; None if not private")
    epsilon: dict[str, float] | None = Field(description="each node's ε; None if not private")
    delta: float | None
    model: str
    model_sha256: str

    @model_validator(mode="before")
    @classmethod
    def _written_before_private(cls, data: object) -> object:
        """metrics.json from before `private` existed: a run without DP wrote δ null
        and ε 0.0 for every node; those zeros are read as what they meant, no ε."""
        if not isinstance(data, dict) or "private" in data:
            return data
        if data.get("delta") is not None:
            return {**data, "private": True}
        return {**data, "private": False, "epsilon_max": None, "epsilon": None}

    @model_validator(mode="after")
    def _epsilon_iff_private(self) -> FinalMetrics:
        if self.private != (self.epsilon_max is not None) or self.private != (
            self.epsilon is not None
        ):
            raise ValueError("epsilon_max and epsilon are numbers exactly when private is true")
        return self


class MetricsFile(BaseModel):
    """metrics.json."""

    rounds: list[RoundRecord] = Field(default_factory=list)
    final: FinalMetrics | None = None

    @model_validator(mode="after")
    def _rounds_follow_final(self) -> MetricsFile:
        """An older file of a run without DP kept ε 0.0 per round; its `final` says no DP."""
        if self.final is not None and not self.final.private:
            for record in self.rounds:
                record.epsilon = None
        return self
