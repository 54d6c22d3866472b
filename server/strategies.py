"""Flower's strategies with consortia's coordinator duties added.

`ConsortiaStrategy` sits between Flower's FedAvg and its subclasses (FedProx,
FedAdam), so their own logic runs unchanged while consortia replaces four
duties: deterministic cohort sampling by node name, screening of replies
(errors, malformed or non-finite updates are dropped with a reason), a fixed
aggregation order, and zero-copy weighted averaging.
"""

from __future__ import annotations

from collections.abc import Iterable

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
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from consortia.common import protocol as p
from consortia.common.config import FedAdamConfig, FedProxConfig, JobConfig
from consortia.common.errors import FederationError
from consortia.server.aggregation import array_view, weighted_average
from consortia.server.cohort import Cohort
from consortia.server.run_log import NodeFailure, RunLog


class ConsortiaStrategy(FedAvg):
    """FedAvg with deterministic cohorts, screened replies and fast averaging.

    Call `attach` before `start`: the cohort and run log exist only once the
    roster is known.
    """

    cohort: Cohort
    run_log: RunLog
    federated_evaluation: bool = True
    _expected: dict[str, tuple[tuple[int, ...], str]]

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
        """Average the accepted updates in node-name order; fail if none is usable."""
        replies = list(replies)
        accepted, failures = self._screen(replies, with_arrays=True)
        arrays = None
        if accepted:
            arrays, accepted, dropped = self._average_finite(accepted)
            failures = sorted(failures + dropped, key=lambda f: f.node)
        contents = [reply.content for _, reply in accepted]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key) if contents else None
        self.run_log.record_train(
            server_round,
            participants=[name for name, _ in accepted],
            epsilons=self._reported_epsilons(replies),
            train_loss=_metric(metrics, p.TRAIN_LOSS),
            failures=failures,
        )
        if arrays is None:
            raise FederationError(
                f"round {server_round}: no node returned a usable update ("
                + "; ".join(map(str, failures))
                + ")"
            )
        return arrays, metrics

    def _average_finite(
        self, accepted: list[tuple[str, Message]]
    ) -> tuple[ArrayRecord | None, list[tuple[str, Message]], list[NodeFailure]]:
        """Average, then check the average for NaN/inf instead of every reply.

        With positive weights a NaN or ∞ in any reply always reaches the
        average, so one check of the (small) result replaces a pass over all
        replies; only when it fails are the replies scanned to drop the
        culprits, and the rest averaged again in the same order.
        """
        arrays = self._average(accepted)
        if _all_finite(arrays):
            return arrays, accepted, []
        kept = [(n, r) for n, r in accepted if _all_finite(r.content[p.ARRAYS_KEY])]
        dropped = [
            NodeFailure(node=name, reason="update holds NaN or infinite values")
            for name, reply in accepted
            if (name, reply) not in kept
        ]
        if not kept:
            return None, [], dropped
        arrays = self._average(kept)
        if not _all_finite(arrays):
            raise FederationError("the weighted average of finite updates overflowed float range")
        return arrays, kept, dropped

    def _average(self, accepted: list[tuple[str, Message]]) -> ArrayRecord:
        contents = [reply.content for _, reply in accepted]
        return weighted_average(
            [c[p.ARRAYS_KEY] for c in contents],
            [float(c[p.METRICS_KEY][self.weighted_by_key]) for c in contents],
        )

    def _reported_epsilons(self, replies: list[Message]) -> dict[str, float]:
        """ε of every node that trained, its update used or not: the spend happened."""
        spent = {}
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content.get(p.METRICS_KEY)
            if isinstance(metrics, MetricRecord) and isinstance(metrics.get(p.EPSILON), float):
                spent[self.cohort.roster.name_of(reply.metadata.src_node_id)] = float(
                    metrics[p.EPSILON]
                )
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
        return metrics

    def _screen(
        self, replies: Iterable[Message], with_arrays: bool
    ) -> tuple[list[tuple[str, Message]], list[NodeFailure]]:
        """Split replies into usable ones (sorted by node name) and failures with reasons."""
        accepted: list[tuple[str, Message]] = []
        failures: list[NodeFailure] = []
        for reply in replies:
            name = self.cohort.roster.name_of(reply.metadata.src_node_id)
            refusal = None if reply.has_error() else p.read_refusal(reply.content)
            problem = self._problem(reply, with_arrays)
            if refusal is not None:
                code, reason = refusal
                failures.append(NodeFailure(node=name, reason=reason, refusal=code))
            elif problem is None:
                accepted.append((name, reply))
            else:
                failures.append(NodeFailure(node=name, reason=problem))
        accepted.sort(key=lambda item: item[0])
        return accepted, sorted(failures, key=lambda f: f.node)

    def _problem(self, reply: Message, with_arrays: bool) -> str | None:
        """Why `reply` cannot be used, or None if it can."""
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
        return _update_problem(arrays, self._expected)


def _update_problem(
    arrays: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], str]]
) -> str | None:
    """Names, shapes and dtypes of an update against the global model.

    Finiteness is checked on the average instead (`_average_finite`).
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


def _all_finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(array_view(array)).all() for array in arrays.values())


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    value = metrics[key]
    return float(value) if isinstance(value, int | float) else None


class ConsortiaFedProx(FedProx, ConsortiaStrategy):
    """Flower's FedProx (sends `proximal-mu`) on consortia's coordinator duties."""


class ConsortiaFedAdam(FedAdam, ConsortiaStrategy):
    """Flower's FedAdam (server-side Adam) on consortia's coordinator duties."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's Adam step, cast back to the model's dtypes.

        FedAdam's update mixes float32 arrays with float64 moments and returns
        float64; nodes would then receive (and return) a model of another type.
        """
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        cast = {
            key: Array(array_view(arrays[key]).astype(dtype, copy=False))
            for key, (_, dtype) in self._expected.items()
        }
        return ArrayRecord(cast), metrics


def build_strategy(job: JobConfig) -> ConsortiaStrategy:
    """The strategy named in the job, configured from its `[strategy]` block."""
    common = {
        "weighted_by_key": p.WEIGHT,
        "arrayrecord_key": p.ARRAYS_KEY,
        "configrecord_key": p.CONFIG_KEY,
    }
    config = job.strategy
    if isinstance(config, FedProxConfig):
        return ConsortiaFedProx(proximal_mu=config.proximal_mu, **common)
    if isinstance(config, FedAdamConfig):
        return ConsortiaFedAdam(
            eta=config.eta,
            eta_l=job.training.learning_rate,
            beta_1=config.beta_1,
            beta_2=config.beta_2,
            tau=config.tau,
            **common,
        )
    return ConsortiaStrategy(**common)
