"""The ClientApp worker's figures, left in the node's state folder for its metrics endpoint.

Only the worker (client/clientapp_worker.py) sees the messages it handles,
how long a round's training takes and which device torch gives it; the
node's Prometheus endpoint is served by `consortia node start`, the
supervisor, which must never load torch. So after every message the worker
rewrites `<state_dir>/worker-metrics.json` (atomically: a reader sees the
previous figures or the new ones, never half), and the supervisor reads it
when Prometheus asks (client/node_metrics.py). The worker starts from the
file's counts when it (or the node) restarts, so the counters only grow.

Written only when node.toml has a `[metrics]` block; Flower's stock path
(`node start --stock`) has no worker and so none of these figures.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from consortia.common.atomic import write_json_atomic


class MessageKind(StrEnum):
    """The message types consortia's ClientApp answers (Flower's type, '.' and the action)."""

    TRAIN = "train"
    TRAIN_SECAGG = "train.secagg"  # a SecAgg+ stage; one of them trains
    EVALUATE = "evaluate"
    QUERY = "query"
    QUERY_STATISTICS = "query.statistics"
    OTHER = "other"  # anything else a coordinator sends: one label, not one per text

    @classmethod
    def of(cls, message_type: str) -> MessageKind:
        try:
            return cls(message_type)
        except ValueError:
            return cls.OTHER

    @property
    def trains(self) -> bool:
        return self in (MessageKind.TRAIN, MessageKind.TRAIN_SECAGG)


class WorkerMetrics(BaseModel):
    """worker-metrics.json."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(default="", description="the device 'auto' trains on: cpu or cuda")
    device_name: str = Field(default="", description="the GPU's name; empty for a CPU")
    messages: dict[MessageKind, dict[str, int]] = Field(
        default_factory=dict, description="messages handled: type -> outcome -> count"
    )
    training_rounds: int = Field(default=0, description="rounds this node trained in")
    training_seconds: float = Field(
        default=0.0, description="time spent on train messages, all rounds together"
    )
    last_round: str | None = Field(default=None, description="'<run>/<round>' trained last")
    last_round_seconds: float = 0.0

    def handled(
        self, message_type: str, outcome: str, seconds: float, run_id: int, server_round: int | None
    ) -> None:
        """Count one message; a train message adds its time to its round's training.

        `server_round`: the round the message's config names. Under secure
        aggregation a round is several `train.secagg` messages (one of which
        trains); its first, the setup, names the round, and the stages that
        name none belong to the round in progress: their times add up.
        """
        kind = MessageKind.of(message_type)
        by_outcome = self.messages.setdefault(kind, {})
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
        if not kind.trains:
            return
        if server_round is None and self.last_round is not None:
            this_round = self.last_round
        else:
            this_round = f"{run_id}/{'?' if server_round is None else server_round}"
        if this_round != self.last_round:
            self.training_rounds += 1
            self.last_round, self.last_round_seconds = this_round, 0.0
        self.training_seconds += seconds
        self.last_round_seconds += seconds


def read_worker_metrics(path: Path) -> WorkerMetrics | None:
    """The figures at `path`; None if the worker wrote none yet (or the file is unreadable)."""
    try:
        return WorkerMetrics.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def write_worker_metrics(path: Path, figures: WorkerMetrics) -> None:
    write_json_atomic(path, figures.model_dump(mode="json"))
