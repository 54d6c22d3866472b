"""stats.json: the record a statistics job leaves (read by its page and by the CLI)."""

from __future__ import annotations

from pydantic import BaseModel

from consortia.common.config import StatisticsConfig
from consortia.common.statistics import StatisticsRelease
from consortia.server.outputs.manifest import Manifest
from consortia.server.statistics.summary import StatisticsSummary

__all__ = ["STATS_HTML", "STATS_JSON", "EvaluatedModel", "NodeRefusal", "StatisticsFile"]

STATS_JSON = "stats.json"
STATS_HTML = "stats.html"


class EvaluatedModel(BaseModel):
    """The trained model whose accuracy the nodes released."""

    run_dir: str
    round: int
    model_sha256: str
    architecture: str


class NodeRefusal(BaseModel):
    node: str
    code: str  # a `RefusalCode` value (text: a node of another version may send another)
    reason: str


class StatisticsFile(BaseModel):
    """stats.json: what was asked, of whom, what came back, and what it says."""

    manifest: Manifest
    query: StatisticsConfig
    model: EvaluatedModel | None = None
    finished_utc: str
    answered: list[str]
    refusals: list[NodeRefusal]
    releases: dict[str, StatisticsRelease]  # as received: noisy, safe to keep
    summary: StatisticsSummary | None  # None when no node answered
