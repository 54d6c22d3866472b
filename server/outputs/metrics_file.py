"""metrics.json: every round's record and the run's final figures."""

from __future__ import annotations

from pydantic import BaseModel, Field

from consortia.server.rounds.run_log import RoundRecord

__all__ = ["METRICS_FILE", "FinalMetrics", "MetricsFile"]


METRICS_FILE = "metrics.json"


class FinalMetrics(BaseModel):
    """The `final` block of metrics.json."""

    accuracy: float | None
    loss: float | None
    epsilon_max: float
    epsilon: dict[str, float]
    delta: float | None
    model: str
    model_sha256: str


class MetricsFile(BaseModel):
    """metrics.json."""

    rounds: list[RoundRecord] = Field(default_factory=list)
    final: FinalMetrics | None = None
