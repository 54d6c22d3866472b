"""What happened in each round, per node, as the coordinator saw it."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord
from pydantic import BaseModel, Field, model_validator

from consortia.common.privacy import Release
from consortia.common.protocol import FailureKind
from consortia.server.rounds import legacy_failures
from consortia.server.rounds.aggregation import array_view
from consortia.server.rounds.roster import Roster

# The `RoundRecord` list each fault a node reports is filed under.
_FAULT_LISTS = {
    FailureKind.DROPOUT: "dropouts",
    FailureKind.LATE: "stragglers",
    FailureKind.CRASH: "crashes",
}
# The defence (`RoundRecord.rejected`) a train reply's failure of each kind is filed under;
# refusals, faults, error replies and timeouts are not a defence's doing.
_DEFENCES = {
    FailureKind.MALFORMED: "update_checks",
    FailureKind.SCREENED_OUT: "update_checks",
    FailureKind.KRUM_EXCLUDED: "krum",
    FailureKind.MULTIKRUM_EXCLUDED: "multikrum",
    # As filed before failures had a kind, so that metrics.json keeps its values.
    FailureKind.SECAGG_DROPOUT: "update_checks",
}
_CHUNK = 1 << 14  # coordinates per block when ranking updates for `kept_shares`
# How a run trained without DP states its ε, in every text and figure: it has no finite ε,
# and 0 (perfect privacy) is the one number it must never be read as.
NOT_PRIVATE = "not private"


class NodeFailure(BaseModel):
    """A node's reply that was not used (or never came), what kind of failure it was, and why."""

    node: str
    reason: str  # for people: free text, never parsed
    refusal: str | None = None  # the code of the node's refusal-shaped reply (`RefusalCode`)
    kind: FailureKind  # set where the failure is found; derived for records that predate it

    @model_validator(mode="before")
    @classmethod
    def _kind_of_old_records(cls, data: object) -> object:
        """A record written before failures had a kind gets the one its fields tell."""
        return legacy_failures.with_kind(data)

    def __str__(self) -> str:
        if self.kind == FailureKind.REFUSED:
            return f"{self.node} refused [{self.refusal}]: {self.reason}"
        return f"{self.node}: {self.reason}"  # a fault too: its reply only looks like a refusal


class RoundRecord(BaseModel):
    """One finished round: metrics.json holds a list of these."""

    round: int
    accuracy: float | None = Field(
        default=None,
        description="federated evaluation: pooled over the nodes' test records (a large test "
        "set weighs more); centralized: on the coordinator's test set",
    )
    loss: float | None = None
    epsilon: dict[str, float] | None = Field(
        default_factory=dict,
        description="each node's ε so far; None: the run trains without DP (no finite ε)",
    )
    participants: list[str] = Field(default_factory=list)
    failures: list[NodeFailure] = Field(default_factory=list)
    train_loss: float | None = None
    seconds: float | None = None
    # Simulation lab (all empty otherwise; records written before they existed load as empty).
    dropouts: list[str] = Field(default_factory=list, description="nodes offline this round")
    stragglers: list[str] = Field(
        default_factory=list, description="stragglers that missed the round deadline"
    )
    crashes: list[str] = Field(
        default_factory=list, description="nodes that crashed after recording their spend"
    )
    adversaries: list[str] = Field(
        default_factory=list, description="adversarial nodes whose update reached aggregation"
    )
    # Defences, in every run.
    rejected: dict[str, list[str]] = Field(
        default_factory=dict,
        description="defence ('update_checks', 'krum', 'multikrum') -> nodes it left out",
    )
    kept_share: dict[str, float] = Field(
        default_factory=dict,
        description="trimmed mean / median: share of coordinates in which a node's value counted",
    )
    # Secure aggregation (None otherwise).
    aggregation_failure: str | None = Field(
        default=None, description="why the round's sum could not be unmasked (model unchanged)"
    )
    quantization_error: float | None = Field(
        default=None, description="largest fixed-point error of the mean update, per entry"
    )
    # Federated evaluation, node by node (empty with centralized or no evaluation).
    accuracy_per_node: dict[str, float] = Field(
        default_factory=dict, description="each evaluating node's accuracy on its own test split"
    )
    loss_per_node: dict[str, float] = Field(
        default_factory=dict, description="each evaluating node's loss on its own test split"
    )
    accuracy_node_mean: float | None = Field(
        default=None, description="unweighted mean of accuracy_per_node: each node counts once"
    )
    loss_node_mean: float | None = Field(
        default=None, description="unweighted mean of loss_per_node: each node counts once"
    )

    @property
    def epsilon_max(self) -> float | None:
        """The largest ε any node has spent so far; None when the run trains without DP."""
        return None if self.epsilon is None else max(self.epsilon.values(), default=0.0)


class RunLog:
    """Accumulates per-round facts reported by the strategy and the evaluator.

    ε is tracked per node as "spent so far": a node not sampled in a round
    keeps the ε of its last release, since its accountant did not move.
    `releases` lists the DP releases each node reported (noise multiplier,
    sample rate, steps), in order: checkpoints keep them, and a resumed
    simulation gives them back to its virtual nodes, whose privacy history
    lived in the interrupted process.
    """

    def __init__(
        self, roster: Roster, adversaries: Iterable[str] = (), *, private: bool = True
    ) -> None:
        """`private`: the job trains with DP. Without it no node has a finite ε, and every
        record says so (`epsilon` None) instead of a 0 that reads as perfect privacy."""
        self.private = private
        self.epsilon: dict[str, float] = dict.fromkeys(roster.names, 0.0) if private else {}
        self.releases: dict[str, list[Release]] = {name: [] for name in roster.names}
        self.adversaries = frozenset(adversaries)  # a simulation's Byzantine nodes, by name
        self._current: dict[int, RoundRecord] = {}

    def restore(self, epsilon: dict[str, float], releases: dict[str, list[Release]]) -> None:
        """Continue from a checkpoint's ε and releases (a resumed run)."""
        self.epsilon = dict(epsilon)
        self.releases = {name: list(history) for name, history in releases.items()}

    def record_releases(self, releases: dict[str, Release]) -> None:
        """Append what each node released in this round (only nodes that trained with DP)."""
        for name, release in releases.items():
            self.releases.setdefault(name, []).append(release)

    def record_spent(self, epsilons: dict[str, float]) -> None:
        """Each node's ε so far, as the coordinator accounts a release it saw (a label histogram).

        An accountant only ever grows: the larger of this and what was known is kept.
        """
        if not self.private:
            return  # no finite ε to keep
        for name, value in epsilons.items():
            self.epsilon[name] = max(self.epsilon.get(name, 0.0), value)

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
        self.record_spent(epsilons)
        record.participants = sorted(participants)
        record.train_loss = train_loss
        record.failures.extend(failures)
        for failure in failures:
            defence = _DEFENCES.get(failure.kind)
            if defence is not None:
                record.rejected.setdefault(defence, []).append(failure.node)

    def record_evaluation(
        self, server_round: int, loss: float | None, accuracy: float | None
    ) -> None:
        record = self.current(server_round)
        record.loss, record.accuracy = loss, accuracy

    def record_node_evaluation(
        self, server_round: int, accuracy: dict[str, float], loss: dict[str, float]
    ) -> None:
        """Each node's own federated-evaluation figures, and their unweighted means."""
        record = self.current(server_round)
        record.accuracy_per_node = dict(sorted(accuracy.items()))
        record.loss_per_node = dict(sorted(loss.items()))
        record.accuracy_node_mean = _mean(accuracy.values())
        record.loss_node_mean = _mean(loss.values())

    def record_failures(self, server_round: int, failures: list[NodeFailure]) -> None:
        self.current(server_round).failures.extend(failures)

    def record_kept_shares(self, server_round: int, shares: dict[str, float]) -> None:
        """How much of each aggregated update a coordinate-wise robust aggregate kept."""
        self.current(server_round).kept_share = dict(sorted(shares.items()))

    def close(self, server_round: int, seconds: float) -> RoundRecord:
        """Finish the round's record and hand it out."""
        record = self._current.pop(server_round, RoundRecord(round=server_round))
        record.epsilon = dict(self.epsilon) if self.private else None
        record.seconds = seconds
        _file_faults(record)
        record.rejected = {name: sorted(set(nodes)) for name, nodes in record.rejected.items()}
        sent_update = set(record.participants).union(*record.rejected.values())
        record.adversaries = sorted(self.adversaries & sent_update)
        return record


def _mean(values: Iterable[float]) -> float | None:
    listed = list(values)
    return sum(listed) / len(listed) if listed else None


def _file_faults(record: RoundRecord) -> None:
    """List each fault of the round once under its kind (train and evaluate alike)."""
    for kind, field in _FAULT_LISTS.items():
        nodes = {f.node for f in record.failures if f.kind == kind}
        setattr(record, field, sorted(nodes))


def kept_shares(updates: dict[str, ArrayRecord], lowercut: int) -> dict[str, float]:
    """Per node, the share of coordinates in which its value is inside the kept ranks.

    A coordinate-wise trimmed mean over n updates keeps, in every coordinate,
    the values ranked lowercut..n − lowercut − 1 (a median: the middle one or
    two); a node whose update is an outlier is cut nearly everywhere. Ties are
    ranked in node-name order (the aggregate is the same whichever tied value
    is cut). Cost: one stable sort per coordinate block, like the aggregate's.
    """
    names = sorted(updates)
    n = len(names)
    kept = np.zeros(n, dtype=np.int64)
    total = 0
    for key in updates[names[0]]:
        views = [array_view(updates[name][key]).reshape(-1) for name in names]
        total += views[0].size
        for start in range(0, views[0].size, _CHUNK):
            block = np.stack([view[start : start + _CHUNK] for view in views])
            ranks = np.argsort(np.argsort(block, axis=0, kind="stable"), axis=0, kind="stable")
            kept += ((ranks >= lowercut) & (ranks < n - lowercut)).sum(axis=1)
    return {name: round(float(kept[i]) / max(total, 1), 4) for i, name in enumerate(names)}
