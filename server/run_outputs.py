"""The run directory: metrics.json, manifest.json, model/ checkpoints, plots/.

metrics.json is rewritten (atomically) after every round, so an interrupted
run still leaves a consistent record of the rounds it finished.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord
from pydantic import BaseModel, Field

from consortia.common.atomic import write_json_atomic
from consortia.server.checkpoints import save_checkpoint
from consortia.server.manifest import Manifest
from consortia.server.plots import write_plots
from consortia.server.run_log import RoundRecord


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


class RunOutputs:
    """Writes one run's files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model_dir = root / "model"
        self.plots_dir = root / "plots"
        self.metrics = MetricsFile()
        root.mkdir(parents=True, exist_ok=True)

    def write_manifest(self, manifest: Manifest) -> None:
        write_json_atomic(self.root / "manifest.json", manifest.model_dump(mode="json"))

    def add_round(self, record: RoundRecord, arrays: ArrayRecord) -> Path:
        """Checkpoint the round's global model and append the round to metrics.json."""
        path = save_checkpoint(self.model_dir, record.round, arrays)
        self.metrics.rounds.append(record)
        self._write_metrics()
        return path

    def finish(self, final: FinalMetrics, delta: float | None) -> None:
        self.metrics.final = final
        self._write_metrics()
        write_plots(self.plots_dir, self.metrics.rounds, delta)

    def _write_metrics(self) -> None:
        write_json_atomic(self.root / "metrics.json", self.metrics.model_dump(mode="json"))
