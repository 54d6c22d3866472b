"""sweep.json: a sweep's plan and results so far (read by its report and by a resumed sweep)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, JsonValue

__all__ = ["SWEEP_FILE", "PointSummary", "RunResult", "SweepAxis", "SweepFile"]


SWEEP_FILE = "sweep.json"


class SweepAxis(BaseModel):
    """One `--sweep KEY=V1,V2,...`: a dotted scenario key and the values it takes."""

    model_config = ConfigDict(frozen=True)

    key: str
    values: list[JsonValue]


class RunResult(BaseModel):
    """sweep.json's record of one run, read back from its metrics.json."""

    folder: str
    point: dict[str, JsonValue]
    seed: int
    accuracy: float | None = None
    loss: float | None = None
    # False: trained without DP, so `epsilon_max` is None (no finite ε), never 0.
    # None: the run failed (or was recorded before this field existed).
    private: bool | None = None
    epsilon_max: float | None = None
    delta: float | None = None
    wall_s: float
    error: str | None = None


class PointSummary(BaseModel):
    """One grid point over its seeds: means and sample standard deviations (None with < 2)."""

    point: dict[str, JsonValue]
    folders: list[str]
    runs_ok: int
    runs_failed: int
    # False: the point trains without DP; its ε columns are None (no finite ε), never 0.
    # None: no run of the point finished.
    private: bool | None = None
    accuracy_mean: float | None
    accuracy_std: float | None
    epsilon_max_mean: float | None
    epsilon_max_std: float | None
    wall_s_mean: float | None


class SweepFile(BaseModel):
    """sweep.json: the plan, every finished run, and the per-point table."""

    scenario: str
    source: str
    created_utc: str
    axes: list[SweepAxis]
    seeds: list[int]
    planned: list[str]
    runs: list[RunResult]
    points: list[PointSummary]
