"""The coordinator strategy on real Flower messages: screening, order, ε bookkeeping.

Value checks (norm bounds) and the robust aggregators: tests/test_update_checks.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from consortia.common import protocol as p
from consortia.common.config import FedAdamConfig, FedYogiConfig, JobConfig, PrivacyConfig
from consortia.common.errors import FederationError
from consortia.server.rounds.cohort import Cohort
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.server.rounds.run_log import RunLog
from consortia.server.rounds.secure_aggregation import SecureRound
from consortia.server.rounds.strategies import (
    ConsortiaFedAdam,
    ConsortiaFedYogi,
    ConsortiaStrategy,
    build_strategy,
)

NAMES = ["alpha", "bravo", "charlie", "delta"]
IDS = [9001, 17, 4242, 5]  # Flower's ids are random: deliberately not in name order
# Without DP (and with SGD) no norm bound applies: what is left is screening and finiteness.
NO_DP = JobConfig(privacy=PrivacyConfig(enabled=False))


pytestmark = pytest.mark.usefixtures("task_identity")


def _global() -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.zeros((3, 2), np.float32)), "b": Array(np.zeros(2, np.float32))}
    )


def _strategy(job: JobConfig | None = None) -> tuple[ConsortiaStrategy, RunLog]:
    roster = Roster(
        nodes=tuple(
            NodeEntry(
                node_id=i, name=n, data_fingerprint="f" * 64, feature_shape=(3,), num_classes=2
            )
            for n, i in sorted(zip(NAMES, IDS, strict=True))
        )
    )
    strategy = build_strategy(job or NO_DP)
    run_log = RunLog(roster)
    strategy.attach(Cohort(roster, None, seed=0), run_log, federated_evaluation=True)
    return strategy, run_log


def _requests(strategy: ConsortiaStrategy) -> list[Message]:
    return list(strategy.configure_train(1, _global(), ConfigRecord({p.TASK_KEY: "{}"}), None))  # type: ignore[arg-type]


def _reply(request: Message, value: float, eps: float, **override: object) -> Message:
    arrays = {
        "w": Array(np.full((3, 2), value, np.float32)),
        "b": Array(np.full(2, value, np.float32)),
    }
    arrays.update(override)  # type: ignore[arg-type]
    metrics = MetricRecord(
        {
            p.WEIGHT: 1.0,
            p.EPSILON: eps,
            p.TRAIN_LOSS: value,
            p.STEPS: 100,
            p.NOISE_MULTIPLIER: 1.0,
            p.SAMPLE_RATE: 0.1,
        }
    )
    return Message(
        RecordDict({p.ARRAYS_KEY: ArrayRecord(arrays), p.METRICS_KEY: metrics}), reply_to=request
    )


def test_configure_train_samples_by_name_and_sets_the_round() -> None:
    strategy, _ = _strategy()
    requests = _requests(strategy)
    assert [m.metadata.dst_node_id for m in requests] == [9001, 17, 4242, 5]  # alpha..delta
    assert all(m.content[p.CONFIG_KEY][p.ROUND_KEY] == 1 for m in requests)


def test_bad_updates_are_dropped_with_reasons_and_eps_still_counted() -> None:
    strategy, run_log = _strategy()
    alpha, bravo, charlie, delta = _requests(strategy)
    replies = [
        _reply(delta, 4.0, 0.4),
        _reply(alpha, 1.0, 0.1),
        _reply(bravo, 2.0, 0.2, w=Array(np.full((3, 2), np.nan, np.float32))),
        _reply(charlie, 3.0, 0.3, b=Array(np.zeros(3, np.float32))),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 2.5)  # mean of alpha (1) and delta (4)
    record = run_log.close(1, 0.0)
    assert record.participants == ["alpha", "delta"]
    reasons = {f.node: f.reason for f in record.failures}
    assert reasons["bravo"] == "update holds NaN or infinite values"
    assert "array 'b' is float32[3], expected float32[2]" in reasons["charlie"]
    # A rejected update was still released: its node's ε is on record.
    assert record.epsilon == {"alpha": 0.1, "bravo": 0.2, "charlie": 0.3, "delta": 0.4}


def test_error_replies_and_no_usable_update_stop_the_run() -> None:
    strategy, _ = _strategy()
    requests = _requests(strategy)
    replies = [Message(Error(code=0, reason="out of budget"), reply_to=r) for r in requests]
    with pytest.raises(
        FederationError, match=r"round 1: no node returned a usable update.*out of budget"
    ):
        strategy.aggregate_train(1, replies)


class _OneNodeGone:
    """A grid before which `gone` died: the SuperLink answers its messages itself.

    Its reply is the one Flower's SuperLink makes for a node that missed its
    heartbeats (`create_message_error_unavailable_res_message`), which comes
    from the SuperLink's node id, not the node's; the others answer in turn.
    """

    def __init__(self, gone: int, answer: dict[int, float]) -> None:
        self.gone = gone
        self.answer = answer
        self.replies: dict[str, Message] = {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        ids = []
        for number, message in enumerate(messages):
            mid = f"m{number}"
            message.metadata.__dict__["_message_id"] = mid
            node = message.metadata.dst_node_id
            self.replies[mid] = (
                create_message_error_unavailable_res_message(message.metadata, "node_unavail")
                if node == self.gone
                else _reply(message, self.answer[node], 0.1)
            )
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.replies.pop(mid) for mid in message_ids if mid in self.replies]


def test_a_node_flower_reports_unavailable_fails_its_round_not_the_run() -> None:
    from consortia.server.rounds.exchange import exchange

    strategy, run_log = _strategy()
    requests = _requests(strategy)
    gone = IDS[NAMES.index("charlie")]
    grid = _OneNodeGone(gone, {9001: 1.0, 17: 2.0, 5: 3.0})
    replies = exchange(grid, requests, timeout_s=5)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == sorted(IDS)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)  # alpha, bravo, delta
    record = run_log.close(1, 0.0)
    assert record.participants == ["alpha", "bravo", "delta"]
    (failure,) = record.failures
    assert (failure.node, failure.kind) == ("charlie", p.FailureKind.NO_REPLY)
    assert failure.reason.startswith("no reply: Error: Node Unavailable")


def test_aggregation_order_does_not_depend_on_arrival_order() -> None:
    strategy, _ = _strategy()
    requests = _requests(strategy)
    replies = [_reply(r, v, 0.1) for r, v in zip(requests, [0.1, 1e-8, 3.3, -7.0], strict=True)]
    forward, _ = strategy.aggregate_train(1, replies)
    strategy.configure_train(2, _global(), ConfigRecord(), None)  # type: ignore[arg-type]
    backward, _ = strategy.aggregate_train(2, list(reversed(replies)))
    assert forward is not None and backward is not None
    assert all(forward[k].data == backward[k].data for k in forward)


@pytest.mark.parametrize(
    ("config", "cls"), [(FedAdamConfig(), ConsortiaFedAdam), (FedYogiConfig(), ConsortiaFedYogi)]
)
def test_server_optimisers_keep_the_model_dtype(
    config: FedAdamConfig | FedYogiConfig, cls: type[ConsortiaStrategy]
) -> None:
    strategy, _ = _strategy(JobConfig(strategy=config))  # DP: the derived bound applies
    assert isinstance(strategy, cls)
    requests = _requests(strategy)
    arrays, _ = strategy.aggregate_train(1, [_reply(r, 0.5, 0.1) for r in requests])
    assert arrays is not None and all(arrays[k].dtype == "float32" for k in arrays)
    # The server step moved the model towards the (positive) average update.
    assert (arrays["w"].numpy() > 0).all()


def test_evaluation_can_be_switched_off() -> None:
    strategy, _ = _strategy()
    strategy.federated_evaluation = False
    assert list(strategy.configure_evaluate(1, _global(), ConfigRecord(), None)) == []  # type: ignore[arg-type]


# ------------------------------------------------------------- secure aggregation


def _secure_replies(strategy: ConsortiaStrategy) -> list[Message]:
    """Stage-3 replies of a secure round: DP metrics, no update (the vector went to the sum)."""
    return [
        Message(RecordDict({p.METRICS_KEY: _reply(r, 0.0, 0.5).content[p.METRICS_KEY]}), reply_to=r)
        for r in _requests(strategy)
    ]


def _secure_round(replies: list[Message], failure: str | None = None) -> SecureRound:
    """The first node dropped before stage 3 (no reply, nothing spent); the rest are summed."""
    outcome = SecureRound(
        replies=replies[1:],
        survivors=[r.metadata.src_node_id for r in replies[1:]],
        dropped={replies[0].metadata.src_node_id: "no masked-input reply within 5 s"},
        failure=failure,
        mean_error_bound=1e-7,
    )
    if failure is None:
        outcome.mean_update = {"w": np.full((3, 2), 0.25), "b": np.full(2, -0.5)}
    return outcome


def test_a_secure_round_aggregates_the_unmasked_mean_and_counts_every_spend() -> None:
    strategy, run_log = _strategy()
    replies = _secure_replies(strategy)
    secure = _secure_round(replies)
    secure.dropped[replies[1].metadata.src_node_id] = "no unmask reply within 5 s"
    strategy.secure_round = secure
    arrays, _ = strategy.aggregate_train(1, secure.replies)
    assert arrays is not None
    assert np.array_equal(arrays["w"].numpy(), np.full((3, 2), 0.25, np.float32))
    assert arrays["b"].numpy().dtype == np.float32
    record = run_log.current(1)
    dropped = strategy.cohort.roster.name_of(replies[0].metadata.src_node_id)
    # Silent at unmasking but in the sum: a participant, not a failure.
    assert dropped not in record.participants and len(record.participants) == 3
    assert [f.node for f in record.failures] == [dropped]
    assert "secure aggregation: no masked-input reply" in record.failures[0].reason
    spent = {name: e for name, e in run_log.epsilon.items() if e > 0}
    assert set(spent) == set(NAMES) - {dropped} and all(e == 0.5 for e in spent.values())
    assert record.quantization_error == 1e-7


def test_a_secure_round_that_cannot_be_unmasked_stops_or_is_skipped_as_configured() -> None:
    strategy, run_log = _strategy()
    replies = _secure_replies(strategy)
    strategy.secure_round = _secure_round(
        replies, failure="the self-mask seed of node 5 has 1 share(s), 2 needed"
    )
    with pytest.raises(FederationError, match="secure aggregation failed: the self-mask seed"):
        strategy.aggregate_train(1, replies)
    strategy.secure_on_failure = "skip-round"
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is None  # the round loop keeps the global model
    assert run_log.current(2).aggregation_failure is not None


def test_a_server_optimiser_steps_on_the_secure_mean_as_on_the_clear_one() -> None:
    job = JobConfig(privacy=PrivacyConfig(enabled=False), strategy=FedAdamConfig(eta=0.1))
    clear, _ = _strategy(job)
    requests = _requests(clear)
    # Three updates in the clear whose mean is the secure round's mean (w 0.25, b -0.5).
    in_clear = [_reply(r, 0.25, 0.5, b=Array(np.full(2, -0.5, np.float32))) for r in requests[1:]]
    expected, _ = clear.aggregate_train(1, in_clear)
    secure, _ = _strategy(job)
    replies = _secure_replies(secure)
    secure.secure_round = _secure_round(replies)
    arrays, _ = secure.aggregate_train(1, replies[1:])
    assert arrays is not None and expected is not None
    for key in ("w", "b"):
        assert arrays[key].numpy().dtype == np.float32
        assert np.array_equal(arrays[key].numpy(), expected[key].numpy())


# ------------------------------------------------------------- federated evaluation


def _evaluation(request: Message, accuracy: float, loss: float, examples: int) -> Message:
    """A node's evaluate reply as client/app.py's `evaluate` sends it."""
    metrics = MetricRecord({p.WEIGHT: examples, p.EVAL_LOSS: loss, p.EVAL_ACCURACY: accuracy})
    return Message(RecordDict({p.METRICS_KEY: metrics}), reply_to=request)


def test_federated_evaluation_records_every_node_by_name_and_their_unweighted_mean() -> None:
    """The deployed and the simulated coordinator share this aggregation: the pooled figure
    weighs test records, the per-node figures and their mean weigh every node once."""
    strategy, run_log = _strategy()
    requests = list(
        strategy.configure_evaluate(1, _global(), ConfigRecord({p.TASK_KEY: "{}"}), None)
    )  # type: ignore[arg-type]
    by_name = dict(zip(NAMES, IDS, strict=True))
    request = {
        name: next(r for r in requests if r.metadata.dst_node_id == node)
        for name, node in by_name.items()
    }
    replies = [
        _evaluation(request["delta"], 0.5, 1.2, 100),
        _evaluation(request["alpha"], 1.0, 0.1, 300),
        Message(Error(code=0, reason="disk full"), reply_to=request["bravo"]),
        _evaluation(request["charlie"], 0.75, 0.5, 100),
    ]
    strategy.aggregate_evaluate(1, replies)
    record = run_log.close(1, 0.0)
    assert record.accuracy_per_node == {"alpha": 1.0, "charlie": 0.75, "delta": 0.5}
    assert record.loss_per_node == {"alpha": 0.1, "charlie": 0.5, "delta": 1.2}
    assert record.accuracy_node_mean == pytest.approx(0.75)
    assert record.loss_node_mean == pytest.approx(0.6)
    assert record.accuracy == pytest.approx((300 * 1.0 + 100 * 0.75 + 100 * 0.5) / 500)  # pooled
    assert [f.node for f in record.failures] == ["bravo"]
    dumped = record.model_dump(mode="json")  # metrics.json and --json carry them by those names
    assert dumped["accuracy_per_node"]["alpha"] == 1.0 and dumped["accuracy_node_mean"] == 0.75
