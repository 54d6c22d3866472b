"""Flower's strategies with consortia's coordinator duties added.

`ConsortiaStrategy` sits between Flower's FedAvg and its subclasses, so their
own logic runs unchanged while consortia replaces four duties: deterministic
cohort sampling by node name, screening of replies (errors, malformed,
non-finite or over-norm updates are dropped with a reason, see
update_checks.py), a fixed aggregation order, and zero-copy weighted
averaging.

Two ways of mixing Flower in:
- FedProx, FedAdam, FedYogi come *before* `ConsortiaStrategy` in the class
  order: their `aggregate_train` wraps consortia's (screen, average) and
  post-processes the average (the server optimiser step).
- The robust aggregators (trimmed mean, median, Krum, Multi-Krum) come
  *after* it: consortia's `aggregate_train` screens, and its `_combine` step
  hands only the accepted updates, in node-name order, to Flower's
  aggregation in place of the average.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, TypedDict

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.multikrum import select_multikrum

from consortia.common import protocol as p
from consortia.common.config import (
    FedAdamConfig,
    FedMedianConfig,
    FedProxConfig,
    FedTrimmedAvgConfig,
    FedYogiConfig,
    JobConfig,
    KrumConfig,
    MultiKrumConfig,
)
from consortia.common.errors import FederationError
from consortia.common.record_values import number
from consortia.server.rounds.aggregation import array_view, weighted_average
from consortia.server.rounds.cohort import Cohort
from consortia.server.rounds.exchange import never_answered
from consortia.server.rounds.run_log import NodeFailure, RunLog
from consortia.server.rounds.secure_aggregation import SecureRound
from consortia.server.rounds.update_checks import (
    NON_FINITE,
    ReferenceModel,
    UpdateChecks,
    all_finite,
)

Accepted = list[tuple[str, Message]]  # (node name, reply), in node-name order


@dataclass
class Combination:
    """What `_combine` made of the accepted updates."""

    arrays: ArrayRecord
    used: Accepted  # the replies whose updates went in (Krum: the selected ones)
    notes: list[NodeFailure] = field(default_factory=list)  # accepted but left out, and why


class ConsortiaStrategy(FedAvg):
    """FedAvg with deterministic cohorts, checked updates and fast averaging.

    Call `attach` before `start`: the cohort and run log exist only once the
    roster is known. `build_strategy` sets `update_checks` from the job.
    """

    cohort: Cohort
    run_log: RunLog
    federated_evaluation: bool = True
    update_checks: UpdateChecks = UpdateChecks()
    # Whether NaN/∞ in one update always reaches the aggregate, so that one check of the
    # (small) result can replace a scan of every reply; robust aggregators drop outliers.
    aggregate_shows_non_finite: ClassVar[bool] = True
    _expected: dict[str, tuple[tuple[int, ...], str]]
    _reference: ReferenceModel
    _global: ArrayRecord
    # Set by the round loop for a round run under secure aggregation: its replies then
    # carry metrics only, and the aggregate is the unmasked mean
    # (server/rounds/secure_aggregation.py).
    secure_round: SecureRound | None = None
    secure_on_failure: Literal["stop", "skip-round"] = "stop"

    def attach(self, cohort: Cohort, run_log: RunLog, federated_evaluation: bool) -> None:
        self.cohort = cohort
        self.run_log = run_log
        self.federated_evaluation = federated_evaluation

    # ------------------------------------------------------------- configure

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to this round's cohort (seeded, by node name)."""
        self._expected = {key: (tuple(a.shape), a.dtype) for key, a in arrays.items()}
        self._reference = ReferenceModel.of(arrays)
        self._global = arrays
        node_ids = self.cohort.sample(server_round, "train")
        return self._messages(server_round, arrays, config, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.federated_evaluation:
            return []
        node_ids = self.cohort.sample(server_round, "evaluate")
        return self._messages(server_round, arrays, config, node_ids, MessageType.EVALUATE)

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: list[int],
        message_type: str,
    ) -> list[Message]:
        config[p.ROUND_KEY] = server_round
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(content, node_ids, message_type))

    # ------------------------------------------------------------- aggregate

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the updates that pass every check, in node-name order.

        Every dropped reply, and why, goes to `run_log.record_train` (the
        round's metrics); the run stops if fewer than
        `update_checks.min_updates` updates remain.
        """
        replies = list(replies)
        if self.secure_round is not None:
            return self._aggregate_secure(server_round, replies, self.secure_round)
        accepted, failures = self._screen(replies, with_arrays=True)
        accepted, rejected = self._check_updates(accepted)
        failures += rejected
        combination = None
        if len(accepted) >= self.update_checks.min_updates:
            combination, accepted, dropped = self._combine_finite(server_round, accepted)
            failures += dropped
        used = combination.used if combination is not None else []
        notes = combination.notes if combination is not None else []
        metrics = self._record_train(server_round, used, replies, failures + notes)
        if combination is None:
            raise FederationError(self._too_few(server_round, accepted, failures))
        return combination.arrays, metrics

    def _aggregate_secure(
        self, server_round: int, replies: list[Message], secure: SecureRound
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A secure round: the unmasked mean of the survivors' updates, checked by the nodes.

        The replies carry each node's DP spend and loss, no update (or its
        refusal); the per-update value checks happened on the nodes (an
        update whose entries or L2 norm exceed the same derived bound is
        refused there). Nodes that left mid-protocol are failures with the stage and
        reason, once each.
        """
        accepted, failures = self._screen(replies, with_arrays=False)
        survivors = set(secure.survivors)
        used = [(name, r) for name, r in accepted if r.metadata.src_node_id in survivors]
        roster = self.cohort.roster
        # A survivor silent at unmasking is still in the sum: a participant, not a failure.
        noted = {failure.node for failure in failures}
        failures += [
            NodeFailure(
                node=name, reason=f"secure aggregation: {why}", kind=p.FailureKind.SECAGG_DROPOUT
            )
            for node_id, why in secure.dropped.items()
            if node_id not in survivors and (name := roster.name_of(node_id)) not in noted
        ]
        metrics = self._record_train(server_round, used, replies, failures)
        record = self.run_log.current(server_round)
        if secure.failure is not None:
            record.aggregation_failure = secure.failure
            if self.secure_on_failure == "stop":
                raise FederationError(
                    f"round {server_round}: secure aggregation failed: {secure.failure}"
                )
            return None, metrics
        if len(used) < self.update_checks.min_updates:
            raise FederationError(self._too_few(server_round, used, failures))
        record.quantization_error = secure.mean_error_bound
        return secure.aggregate(self._global), metrics

    def _record_train(
        self,
        server_round: int,
        used: Accepted,
        replies: list[Message],
        failures: list[NodeFailure],
    ) -> MetricRecord | None:
        """The round's train metrics over `used`, noted in the run log with every failure.

        ε is taken from every reply, used or not: the spend happened.
        """
        contents = [reply.content for _, reply in used]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None
        self.run_log.record_train(
            server_round,
            participants=[name for name, _ in used],
            epsilons=self._reported_epsilons(replies),
            train_loss=_metric(metrics, p.TRAIN_LOSS),
            failures=sorted(failures, key=lambda f: f.node),
        )
        return metrics

    def _too_few(self, server_round: int, accepted: Accepted, failures: list[NodeFailure]) -> str:
        """Why the round cannot aggregate: the usable count and every rejected node's reason."""
        reasons = "; ".join(map(str, sorted(failures, key=lambda f: f.node)))
        if not accepted:
            return f"round {server_round}: no node returned a usable update ({reasons})"
        names = ", ".join(name for name, _ in accepted)
        return (
            f"round {server_round}: only {len(accepted)} usable update(s) ({names}), fewer than "
            f"update_checks.min_updates = {self.update_checks.min_updates} ({reasons})"
        )

    def _check_updates(self, accepted: Accepted) -> tuple[Accepted, list[NodeFailure]]:
        """Per-reply value checks (norm bound, finiteness) on screened replies."""
        scan = not self.aggregate_shows_non_finite
        kept: Accepted = []
        rejected: list[NodeFailure] = []
        for name, reply in accepted:
            problem = self.update_checks.problem(
                reply.content.array_records[p.ARRAYS_KEY],
                reply.content.metric_records[p.METRICS_KEY],
                self._reference,
                scan=scan,
            )
            if problem is None:
                kept.append((name, reply))
            else:
                rejected.append(
                    NodeFailure(node=name, reason=problem, kind=p.FailureKind.SCREENED_OUT)
                )
        return kept, rejected

    def _combine_finite(
        self, server_round: int, accepted: Accepted
    ) -> tuple[Combination | None, Accepted, list[NodeFailure]]:
        """Combine, then check the result for NaN/inf instead of every reply.

        When no reply was scanned (no norm bound, and an aggregate that every
        NaN or ∞ reaches), one check of the (small) result replaces a pass over
        all replies; only when it fails are the replies scanned to drop the
        culprits, and the rest combined again in the same order. Returns the
        combination (None if too few updates are left), the accepted replies
        and the dropped ones.
        """
        combination = self._combine(server_round, accepted)
        if all_finite(combination.arrays):
            return combination, accepted, []
        if self.update_checks.bounds_norm or not self.aggregate_shows_non_finite:
            raise FederationError("the aggregate of finite updates overflowed float range")
        kept = [(n, r) for n, r in accepted if all_finite(r.content.array_records[p.ARRAYS_KEY])]
        dropped = [
            NodeFailure(node=n, reason=NON_FINITE, kind=p.FailureKind.SCREENED_OUT)
            for n, r in accepted
            if (n, r) not in kept
        ]
        if len(kept) < self.update_checks.min_updates:
            return None, kept, dropped
        combination = self._combine(server_round, kept)
        if not all_finite(combination.arrays):
            raise FederationError("the aggregate of finite updates overflowed float range")
        return combination, kept, dropped

    def _combine(self, server_round: int, accepted: Accepted) -> Combination:
        """FedAvg: the weighted average of the accepted updates (subclasses replace it)."""
        return Combination(arrays=self._average(accepted), used=accepted)

    def _average(self, accepted: Accepted) -> ArrayRecord:
        contents = [reply.content for _, reply in accepted]
        return weighted_average(
            [c.array_records[p.ARRAYS_KEY] for c in contents],
            [number(c.metric_records[p.METRICS_KEY], self.weighted_by_key) for c in contents],
        )

    def _reported_epsilons(self, replies: list[Message]) -> dict[str, float]:
        """ε of every node that trained, its update used or not: the spend happened."""
        spent = {}
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content.get(p.METRICS_KEY)
            epsilon = metrics.get(p.EPSILON) if isinstance(metrics, MetricRecord) else None
            if isinstance(epsilon, float):
                spent[self.cohort.roster.name_of(reply.metadata.src_node_id)] = epsilon
        return spent

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        accepted, failures = self._screen(replies, with_arrays=False)
        self.run_log.record_failures(server_round, failures)
        if not accepted:
            return None
        metrics = self.evaluate_metrics_aggr_fn(
            [reply.content for _, reply in accepted], self.weighted_by_key
        )
        self.run_log.record_evaluation(
            server_round, _metric(metrics, p.EVAL_LOSS), _metric(metrics, p.EVAL_ACCURACY)
        )
        self.run_log.record_node_evaluation(
            server_round,
            accuracy=_per_node(accepted, p.EVAL_ACCURACY),
            loss=_per_node(accepted, p.EVAL_LOSS),
        )
        return metrics

    def _screen(
        self, replies: Iterable[Message], with_arrays: bool
    ) -> tuple[Accepted, list[NodeFailure]]:
        """Split replies into usable ones (sorted by node name) and failures with reasons."""
        accepted: Accepted = []
        failures: list[NodeFailure] = []
        for reply in replies:
            name = self.cohort.roster.name_of(reply.metadata.src_node_id)
            refusal = None if reply.has_error() else p.read_refusal(reply.content)
            problem = self._problem(reply, with_arrays)
            if refusal is not None:
                code, reason = refusal
                kind = p.kind_of_code(code)  # a refusal, or a fault the node reports
                failures.append(NodeFailure(node=name, reason=reason, refusal=code, kind=kind))
            elif problem is None:
                accepted.append((name, reply))
            else:
                failures.append(NodeFailure(node=name, reason=problem, kind=_failure_kind(reply)))
        accepted.sort(key=lambda item: item[0])
        return accepted, sorted(failures, key=lambda f: f.node)

    @property
    def reference(self) -> ReferenceModel:
        """The global model of the round being configured (set by `configure_train`)."""
        return self._reference

    def screening_problem(self, reply: Message) -> str | None:
        """Why a train reply's metrics cannot be used (a secure round's, which has no arrays)."""
        return self._problem(reply, with_arrays=False)

    def _problem(self, reply: Message, with_arrays: bool) -> str | None:
        """Why `reply` cannot be used, or None if it can."""
        if never_answered(reply):
            return f"no reply: {reply.error.reason}"
        if reply.has_error():
            return f"node error: {reply.error.reason}"
        metrics = reply.content.get(p.METRICS_KEY)
        if not isinstance(metrics, MetricRecord) or self.weighted_by_key not in metrics:
            return f"reply lacks the '{p.METRICS_KEY}' record with '{self.weighted_by_key}'"
        weight = metrics[self.weighted_by_key]
        if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
            return f"aggregation weight must be a positive number, got {weight!r}"
        if not with_arrays:
            return None
        arrays = reply.content.get(p.ARRAYS_KEY)
        if not isinstance(arrays, ArrayRecord):
            return f"reply lacks the '{p.ARRAYS_KEY}' record"
        return _layout_problem(arrays, self._expected)


def _failure_kind(reply: Message) -> p.FailureKind:
    """What an unusable reply that is no refusal stands for."""
    if never_answered(reply):
        return p.FailureKind.NO_REPLY  # Flower's word in the node's place: the node is gone
    return p.FailureKind.ERROR_REPLY if reply.has_error() else p.FailureKind.MALFORMED


def _layout_problem(
    arrays: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], str]]
) -> str | None:
    """Names, shapes and dtypes of an update against the global model.

    Values (finiteness, norm) are checked next, by `UpdateChecks`.
    """
    if set(arrays) != set(expected):
        return f"update arrays {sorted(arrays)} differ from the model's {sorted(expected)}"
    for key, (shape, dtype) in expected.items():
        array = arrays[key]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return (
                f"array '{key}' is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
            )
    return None


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    value = metrics[key]
    return float(value) if isinstance(value, int | float) else None


def _per_node(accepted: Accepted, key: str) -> dict[str, float]:
    """Each accepted evaluate reply's own `key` figure, by node name (nodes without it left out).

    The pooled figure weighs nodes by their test-set size; these let a reader
    see every site's own result, and their unweighted mean (run_log).
    """
    figures = {
        name: _metric(reply.content.metric_records.get(p.METRICS_KEY), key)
        for name, reply in accepted
    }
    return {name: value for name, value in figures.items() if value is not None}


def _in_model_dtypes(
    arrays: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], str]]
) -> ArrayRecord:
    """`arrays` cast back to the global model's dtypes (a no-op for arrays already in them).

    Flower's server optimisers mix float32 arrays with float64 moments and
    return float64; nodes would then receive (and return) a model of another type.
    """
    return ArrayRecord(
        {
            key: Array(array_view(arrays[key]).astype(dtype, copy=False))
            for key, (_, dtype) in expected.items()
        }
    )


# ------------------------------------------------- Flower's FedAvg variants


class _InModelDtypes(FedAvg):
    """Mixin placed before a Flower server optimiser: casts its result to the model's dtypes.

    A `FedAvg`, the optimisers' own base, so that `super()` is typed and the
    method resolution order of the classes below is unchanged: the optimiser,
    then `ConsortiaStrategy` (a `ConsortiaStrategy` base would come before
    the optimiser's `configure_train`).
    """

    _expected: dict[str, tuple[tuple[int, ...], str]]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        return _in_model_dtypes(arrays, self._expected), metrics


class ConsortiaFedProx(FedProx, ConsortiaStrategy):
    """Flower's FedProx (sends `proximal-mu`) on consortia's coordinator duties."""


class ConsortiaFedAdam(_InModelDtypes, FedAdam, ConsortiaStrategy):
    """Flower's FedAdam (server-side Adam on the average), cast back to the model's dtypes."""


class ConsortiaFedYogi(_InModelDtypes, FedYogi, ConsortiaStrategy):
    """Flower's FedYogi (server-side Yogi on the average), cast back to the model's dtypes."""


# ------------------------------------------------------- robust aggregation


class _RobustStrategy(ConsortiaStrategy):
    """Consortia's screening first; then a Flower robust aggregator in place of the average.

    Subclasses list the Flower class *after* this one, so consortia's
    `configure_train` / `aggregate_train` run and Flower's class supplies its
    constructor and aggregation, reached as `super(ConsortiaStrategy, self)`.
    A robust aggregate can hide a NaN in one update, so every reply is
    scanned before it is combined.
    """

    aggregate_shows_non_finite: ClassVar[bool] = False

    def _combine(self, server_round: int, accepted: Accepted) -> Combination:
        """Flower's own `aggregate_train` over views of the accepted replies.

        Views, because Flower's median and trimmed mean pop the arrays out of
        the messages they aggregate; each view holds the update's arrays (not
        copied) and only the weight metric, the one record Flower reads.
        """
        views = [self._flower_view(reply) for _, reply in accepted]
        arrays, _ = super(ConsortiaStrategy, self).aggregate_train(server_round, views)
        if arrays is None:  # pragma: no cover - Flower returns None only for no replies
            raise FederationError(f"round {server_round}: {type(self).__name__} aggregated nothing")
        return Combination(arrays=_in_model_dtypes(arrays, self._expected), used=accepted)

    def _flower_view(self, reply: Message) -> Message:
        content = reply.content
        weight = content.metric_records[p.METRICS_KEY][self.weighted_by_key]
        arrays = content.array_records[p.ARRAYS_KEY]
        view = RecordDict(
            {
                self.arrayrecord_key: ArrayRecord(dict(arrays.items())),
                p.METRICS_KEY: MetricRecord({self.weighted_by_key: weight}),
            }
        )
        # Flower's aggregators read a reply's content only (its metadata is for error
        # replies' logs); Flower's public constructor makes the view a reply to it.
        return Message(view, reply_to=reply)


class ConsortiaTrimmedMean(_RobustStrategy, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean) over the checked updates."""


class ConsortiaMedian(_RobustStrategy, FedMedian):
    """Flower's FedMedian (coordinate-wise median) over the checked updates."""


class ConsortiaMultiKrum(_RobustStrategy, MultiKrum):
    """Flower's Multi-Krum selection over the checked updates, then their weighted average.

    Flower's `select_multikrum` picks the updates (as its MultiKrum does); the
    selected ones are averaged with consortia's zero-copy average, which is
    the same weighted mean. Calling the selection directly tells which nodes
    were picked: they are the round's participants, and every other accepted
    node gets a note "not selected by Krum" in the round's failures.
    """

    def _combine(self, server_round: int, accepted: Accepted) -> Combination:
        contents = [
            RecordDict({p.ARRAYS_KEY: reply.content.array_records[p.ARRAYS_KEY]})
            for _, reply in accepted
        ]
        chosen = {
            id(content)
            for content in select_multikrum(
                contents,
                num_malicious_nodes=self.num_malicious_nodes,
                num_nodes_to_select=self.num_nodes_to_select,
            )
        }
        used = [item for item, c in zip(accepted, contents, strict=True) if id(c) in chosen]
        krum = self.num_nodes_to_select == 1
        label = "Krum" if krum else "Multi-Krum"
        kind = p.FailureKind.KRUM_EXCLUDED if krum else p.FailureKind.MULTIKRUM_EXCLUDED
        picked = ", ".join(name for name, _ in used)
        notes = [
            NodeFailure(
                node=name,
                reason=(
                    f"not selected by {label} (f = {self.num_malicious_nodes}): its update is "
                    f"farther from its nearest neighbours than the selected {picked}"
                ),
                kind=kind,
            )
            for (name, _), c in zip(accepted, contents, strict=True)
            if id(c) not in chosen
        ]
        return Combination(arrays=self._average(used), used=used, notes=notes)


class ConsortiaKrum(ConsortiaMultiKrum, Krum):
    """Flower's Krum: Multi-Krum that keeps the single best-scored update."""


# ---------------------------------------------------------------- factory


def build_strategy(job: JobConfig) -> ConsortiaStrategy:
    """The strategy named in the job, configured from its `[strategy]` block."""
    strategy = _flower_strategy(job)
    strategy.update_checks = UpdateChecks(job)
    if job.secure_aggregation is not None:
        strategy.secure_on_failure = job.secure_aggregation.on_failure
    return strategy


class _RecordKeys(TypedDict):
    """The record keys every Flower strategy is built with."""

    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str


def _flower_strategy(job: JobConfig) -> ConsortiaStrategy:
    common: _RecordKeys = {
        "weighted_by_key": p.WEIGHT,
        "arrayrecord_key": p.ARRAYS_KEY,
        "configrecord_key": p.CONFIG_KEY,
    }
    config = job.strategy
    if isinstance(config, FedProxConfig):
        return ConsortiaFedProx(proximal_mu=config.proximal_mu, **common)
    if isinstance(config, FedAdamConfig | FedYogiConfig):
        server_optimiser = (
            ConsortiaFedAdam if isinstance(config, FedAdamConfig) else ConsortiaFedYogi
        )
        return server_optimiser(
            eta=config.eta,
            eta_l=job.training.learning_rate,
            beta_1=config.beta_1,
            beta_2=config.beta_2,
            tau=config.tau,
            **common,
        )
    if isinstance(config, FedTrimmedAvgConfig):
        return ConsortiaTrimmedMean(beta=config.beta, **common)
    if isinstance(config, FedMedianConfig):
        return ConsortiaMedian(**common)
    if isinstance(config, MultiKrumConfig):
        return ConsortiaMultiKrum(
            num_malicious_nodes=config.num_malicious_nodes,
            num_nodes_to_select=config.num_nodes_to_select,
            **common,
        )
    if isinstance(config, KrumConfig):
        return ConsortiaKrum(num_malicious_nodes=config.num_malicious_nodes, **common)
    return ConsortiaStrategy(**common)
