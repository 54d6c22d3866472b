"""What happened in each round, per node, as the coordinator saw it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from consortia.common.privacy import Release
from consortia.server.roster import Roster


class NodeFailure(BaseModel):
    """A node's reply that was not used, and why."""

    node: str
    reason: str
    refusal: str | None = None  # the node's refusal code when the node declined by policy

    def __str__(self) -> str:
        if self.refusal is not None:
            return f"{self.node} refused [{self.refusal}]: {self.reason}"
        return f"{self.node}: {self.reason}"


class RoundRecord(BaseModel):
    """One finished round: metrics.json holds a list of these."""

    round: int
    accuracy: float | None = None
    loss: float | None = None
    epsilon: dict[str, float] = Field(default_factory=dict)
    participants: list[str] = Field(default_factory=list)
    failures: list[NodeFailure] = Field(default_factory=list)
    train_loss: float | None = None
    seconds: float | None = None


class RunLog:
    """Accumulates per-round facts reported by the strategy and the evaluator.

    ε is tracked per node as "spent so far": a node not sampled in a round
    keeps the ε of its last release, since its accountant did not move.
    `releases` lists the DP releases each node reported (noise multiplier,
    sample rate, steps), in order: checkpoints keep them, and a resumed
    simulation gives them back to its virtual nodes, whose privacy history
    lived in the interrupted process.
    """

    def __init__(self, roster: Roster) -> None:
        self.epsilon: dict[str, float] = dict.fromkeys(roster.names, 0.0)
        self.releases: dict[str, list[Release]] = {name: [] for name in roster.names}
        self._current: dict[int, RoundRecord] = {}

    def restore(self, epsilon: dict[str, float], releases: dict[str, list[Release]]) -> None:
        """Continue from a checkpoint's ε and releases (a resumed run)."""
        self.epsilon = dict(epsilon)
        self.releases = {name: list(history) for name, history in releases.items()}

    def record_releases(self, releases: dict[str, Release]) -> None:
        """Append what each node released in this round (only nodes that trained with DP)."""
        for name, release in releases.items():
            self.releases.setdefault(name, []).append(release)

    def current(self, server_round: int) -> RoundRecord:
        return self._current.setdefault(server_round, RoundRecord(round=server_round))

    def record_train(
        self,
        server_round: int,
        *,
        participants: list[str],
        epsilons: dict[str, float],
        train_loss: float | None,
        failures: list[NodeFailure],
    ) -> None:
        """Note whose updates were aggregated and every reported ε (used update or not)."""
        record = self.current(server_round)
        for name, value in epsilons.items():
            # An accountant only ever grows; keep the larger value defensively.
            self.epsilon[name] = max(self.epsilon.get(name, 0.0), value)
        record.participants = sorted(participants)
        record.train_loss = train_loss
        record.failures.extend(failures)

    def record_evaluation(
        self, server_round: int, loss: float | None, accuracy: float | None
    ) -> None:
        record = self.current(server_round)
        record.loss, record.accuracy = loss, accuracy

    def record_failures(self, server_round: int, failures: list[NodeFailure]) -> None:
        self.current(server_round).failures.extend(failures)

    def close(self, server_round: int, seconds: float) -> RoundRecord:
        """Finish the round's record and hand it out."""
        record = self._current.pop(server_round, RoundRecord(round=server_round))
        record.epsilon = dict(self.epsilon)
        record.seconds = seconds
        return record
