"""consortia's Flower ClientApp: what a node does when the coordinator asks.

- `query`: say who the node is (name, data fingerprint); no data leaves.
- `train`: DP-SGD on the node's own data, starting from the global model;
  the privacy spend is recorded before the update is returned.
- `train.secagg`: the same training inside a SecAgg+ round, whose update
  leaves the node only masked (client/secure_aggregation.py).
- `evaluate`: loss and accuracy of the global model on the node's test split.
- `query.statistics`: the job's federated statistics, DP-noised, charged to
  the node's account first (client/statistics.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from torch import nn

from consortia.client import secure_aggregation as secagg
from consortia.client import training
from consortia.client.admission import served_dataset
from consortia.client.device import resolve_device
from consortia.client.label_histogram import release_label_histogram
from consortia.client.ledger import BudgetExceededError, LedgerError, ledger_path
from consortia.client.model_admission import node_model
from consortia.client.node_audit import node_audit_log
from consortia.client.node_config import NODE_CONFIG_KEY, load_node_config
from consortia.client.onboarding.registry import DatasetRegistry
from consortia.client.policy import NodePolicy, Refusal
from consortia.client.spend import (
    LedgerAccount,
    NodeRefusedError,
    PrivacyAccount,
    planned_release,
)
from consortia.client.statistics import (
    DataFacts,
    Predictions,
    deployed_facts,
    plan_query,
    release_statistics,
)
from consortia.common import protocol as p
from consortia.common.arrays import LabeledArrays
from consortia.common.audit import AuditError
from consortia.common.config import JobConfig
from consortia.common.errors import (
    ConsortiaError,
    DataError,
    FederationError,
    PrivacyError,
)
from consortia.common.evaluation import evaluate_model, predict
from consortia.common.flower_log import flower_handler_only
from consortia.common.privacy import Mechanism, Release
from consortia.common.record_values import number, whole_number
from consortia.common.secagg.fixed_point import EncodingRangeError
from consortia.common.secagg.wire import (
    MESSAGE_ACTION,
    SECAGG_KEY,
    MaskedInput,
    Setup,
    read_stage,
)
from consortia.common.statistics import MESSAGE_ACTION as STATISTICS_ACTION
from consortia.common.statistics import (
    STATISTICS_KEY,
    Block,
    StatisticsRelease,
)
from consortia.common.weights import flatten_update, load_arrays, model_to_arrays

# Importing consortia imported Opacus, whose root handler would print Flower's lines twice.
flower_handler_only()


@dataclass(frozen=True)
class NodeView:
    """The node as one message sees it: its name, its data, the job, its privacy account."""

    name: str
    train: LabeledArrays
    test: LabeledArrays
    num_classes: int
    fingerprint: str
    job: JobConfig
    account: PrivacyAccount
    facts: Callable[[], DataFacts]  # what a statistics query describes (computed on demand)
    policy: NodePolicy | None = None  # a deployed node's operator policy

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


ViewOf = Callable[[Message, Context], NodeView]
"""Where a message's node comes from: a deployed node's files, or the simulation lab's data."""


def deployed_view(message: Message, context: Context) -> NodeView:
    """A node started by `consortia node start`: the node.toml its node config names."""
    spec = p.TaskSpec.decode(message.content[p.CONFIG_KEY].get(p.TASK_KEY))
    if NODE_CONFIG_KEY in context.node_config:
        return _deployed_view(spec.job, Path(str(context.node_config[NODE_CONFIG_KEY])), context)
    raise FederationError(
        "this node has no dataset to train on: start it with `consortia node start` "
        f"(which sets the node-config key '{NODE_CONFIG_KEY}')"
    )


def _deployed_view(job: JobConfig, node_toml: Path, context: Context) -> NodeView:
    """A real node: its registered dataset, its ledger, its policy; never the coordinator's data."""
    node = load_node_config(node_toml)
    dataset = served_dataset(job, node)
    registry = DatasetRegistry(node.state_dir)
    registration = registry.get(dataset)
    data, inspection = registry.load_inspected(dataset)  # a changed file is refused
    return NodeView(
        name=node.name,
        train=data.train,
        test=data.test,
        num_classes=data.num_classes,
        fingerprint=registration.fingerprint,
        job=job,
        account=LedgerAccount(
            context,
            ledger_path(node.state_dir),
            dataset,
            node.policy,
            audit=node_audit_log(node),
            job=job.name,
        ),
        facts=lambda: deployed_facts(data, inspection),
        policy=node.policy,
    )


def _model(view: NodeView) -> tuple[nn.Module, str]:
    """The job's model and its architecture hash, as this node may build it.

    Refused (client/model_admission.py) when the model's distribution is not
    installed here, is installed at another version than the coordinator's,
    breaks the policy's distribution pins, or Opacus cannot train it.
    """
    return node_model(view.job, view.feature_shape, view.num_classes, view.policy)


def _identity(view: NodeView) -> ConfigRecord:
    """Name, data fingerprint, and the data's shape (schema facts, not records)."""
    return ConfigRecord(
        {
            p.NODE_NAME: view.name,
            p.NODE_FINGERPRINT: view.fingerprint,
            p.NODE_FEATURE_SHAPE: list(view.feature_shape),
            p.NODE_NUM_CLASSES: view.num_classes,
        }
    )


def _round_seed(
    job_seed: int, node_name: str, server_round: int, secret: int | None, stream: bytes = b""
) -> int:
    """The seed of a round's Poisson sampling and DP noise.

    Simulation (`secret` None): derived from (job seed, node, round) alone, so
    a run is reproducible. Deployment: mixed with a secret the coordinator
    cannot compute (HMAC of the question under the node's noise key, see
    client/noise_key.py); it knows the job seed and the node's name and must
    not be able to regenerate, and subtract, the node's noise. `stream`
    names a release other than training (a statistics query).
    """
    words = [job_seed, zlib.crc32(node_name.encode()), server_round]
    if stream:  # another kind of release than a round's (its noise must not repeat one's)
        words.append(zlib.crc32(stream))
    if secret is None:
        return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])
    # 63 bits: a 32-bit seed could be searched; torch takes up to 64 and training adds 1.
    sequence = np.random.SeedSequence([*words, secret])
    return int(sequence.generate_state(1, dtype=np.uint64)[0]) >> 1


def _question(view: NodeView, *parts: bytes) -> list[bytes]:
    """What a release depends on, for its noise seed: the job, the data, and `parts`."""
    job = view.job.model_dump_json().encode()
    return [job, view.fingerprint.encode(), *parts]


def _array_bytes(arrays: ArrayRecord) -> list[bytes]:
    """The received model exactly: every array's name and serialised bytes, in order."""
    return [part for key, array in arrays.items() for part in (key.encode(), bytes(array.data))]


Handler = Callable[[Message, Context], Message]


def _answer_refusals(handler: Handler) -> Handler:
    """Turn a node's refusal into a reply the coordinator can read, and a line in the node log.

    A refusal is the policy working, not a fault: the reply holds only the
    machine-readable code and the reason (no traceback, no data), and the node
    did no training — except an update found out of range after training in
    a secure round, whose refusal also carries the round's recorded spend
    (ε), so that the coordinator's account does not under-count. A deployed
    node also records every refusal in its audit log.
    """

    @functools.wraps(handler)
    def answer(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except (NodeRefusedError, PrivacyError, DataError, LedgerError, AuditError) as exc:
            code, reason = _refusal_of(exc)
            log(
                WARNING,
                "refused %s of run %s: [%s] %s",
                message.metadata.message_type,
                message.metadata.run_id,
                code,
                reason,
            )
            _audit_refusal(message, context, code, reason)
            content = p.refusal_record(code, reason)
            if isinstance(exc, NodeRefusedError) and exc.metrics is not None:
                content[p.METRICS_KEY] = exc.metrics
            return Message(content, reply_to=message)

    return answer


def _audit_refusal(message: Message, context: Context, code: p.RefusalCode, reason: str) -> None:
    """`node.refusal` in a deployed node's audit log; a log that fails costs a warning only.

    The refusal reply goes out either way: it carries no update, and an
    unusable audit log is itself a reason the node refuses (`audit-unusable`).
    """
    if NODE_CONFIG_KEY not in context.node_config:
        return  # a simulated node keeps no audit log
    details: dict[str, str | int] = {
        "code": code,
        "reason": reason,
        "message_type": message.metadata.message_type,
        "run_id": str(context.run_id),  # as the ledger labels releases
    }
    config = message.content.config_records.get(p.CONFIG_KEY)
    if config is not None:
        server_round = config.get(p.ROUND_KEY)
        if isinstance(server_round, int):
            details["round"] = server_round
        with contextlib.suppress(ConsortiaError):  # a malformed task: recorded without a job
            details["job"] = p.TaskSpec.decode(config.get(p.TASK_KEY)).job.name
    try:
        node = load_node_config(Path(str(context.node_config[NODE_CONFIG_KEY])))
        node_audit_log(node).append("node.refusal", **details)
    except ConsortiaError as exc:
        log(WARNING, "the refusal was not recorded in the audit log: %s", exc.message)


def _refusal_of(exc: ConsortiaError) -> tuple[p.RefusalCode, str]:
    """(code, reason) of a condition the node declines on rather than fails with.

    Besides policy refusals: a budget spent by another job between admission
    and recording, an ε target the node cannot reach, a data file changed
    since registration, a ledger or an audit log that cannot be used. Each
    leaves no update.
    """
    if isinstance(exc, NodeRefusedError):
        return exc.refusal.code, exc.refusal.reason
    if isinstance(exc, BudgetExceededError):
        return p.RefusalCode.BUDGET_EXHAUSTED, exc.message
    if isinstance(exc, PrivacyError):
        return p.RefusalCode.PRIVACY_TARGET_UNREACHABLE, exc.message
    if isinstance(exc, DataError):
        return p.RefusalCode.DATA_UNUSABLE, exc.message
    if isinstance(exc, AuditError):
        return p.RefusalCode.AUDIT_UNUSABLE, exc.message
    return p.RefusalCode.LEDGER_UNUSABLE, exc.message


def query(view_of: ViewOf, message: Message, context: Context) -> Message:
    """Identify the node to the coordinator's roster (and its DP label histogram if asked)."""
    view = view_of(message, context)
    identity = _identity(view)
    if view.job.label_histogram is not None:
        identity.update(_label_histogram(view, view.job.label_histogram.noise_multiplier))
    return Message(RecordDict({p.NODE_KEY: identity}), reply_to=message)


def _label_histogram(view: NodeView, sigma: float) -> dict[str, list[float] | str]:
    """The DP label histogram, released only if the node would take part in the job at all."""
    job = view.job
    withheld = view.account.histogram_withheld(job)
    if withheld is None:
        try:
            # A round's checks: model, policy, noise calibrated with this release counted, budget.
            view.account.admit(job, len(view.train), _model(view)[1])
        except (NodeRefusedError, PrivacyError) as exc:
            withheld = f"the node would not take part in this job: {exc.message}"
    if withheld is not None:
        return {p.NODE_HISTOGRAM_WITHHELD: withheld}
    secret = view.account.noise_secret(_question(view, b"label-histogram"))
    seed = _round_seed(job.seed, view.name, 0, secret)
    return release_label_histogram(view.train, view.num_classes, sigma, view.account, seed)


def train(view_of: ViewOf, message: Message, context: Context) -> Message:
    """One round of local training; returns the update and the privacy spent so far."""
    view = view_of(message, context)
    if view.job.secure_aggregation is not None:
        # A plain round of a secure job would hand the coordinator this node's update alone.
        raise NodeRefusedError(
            Refusal(
                code=p.RefusalCode.SECURE_AGGREGATION_REQUIRED,
                reason="the job uses secure aggregation: updates go only through 'train.secagg'",
            )
        )
    local, metrics = _train_round(view, message)
    content = RecordDict({p.ARRAYS_KEY: local, p.METRICS_KEY: metrics, p.NODE_KEY: _identity(view)})
    return Message(content, reply_to=message)


def _train_round(view: NodeView, message: Message) -> tuple[ArrayRecord, MetricRecord]:
    """Admit, train with DP-SGD, record the spend: the local model and the round's metrics."""
    job = view.job
    config = message.content.config_records[p.CONFIG_KEY]
    server_round = whole_number(config, p.ROUND_KEY)
    model, architecture = _model(view)
    # Policy and budget first: a refused round loads no weights and trains nothing.
    dp = view.account.admit(job, len(view.train), architecture)
    log(
        INFO,
        "run %s round %d: admitted (noise multiplier %s), training on %s",
        message.metadata.run_id,
        server_round,
        "none" if dp is None else f"{dp.noise_multiplier:.4g}",
        view.name,
    )
    device = resolve_device(job.training.device)
    if device.type == "cpu":
        # One thread per virtual node: Ray runs one node per core, and a fixed
        # thread count keeps float reductions (and so the model bytes) stable.
        torch.set_num_threads(1)
    global_model = message.content.array_records[p.ARRAYS_KEY]
    load_arrays(model, global_model)
    secret = view.account.noise_secret(
        _question(view, b"train", str(server_round).encode(), *_array_bytes(global_model))
    )
    mu = number(config, p.PROXIMAL_MU_KEY, default=0.0)
    result = training.train_locally(
        model,
        view.train,
        job.training,
        dp,
        seed=_round_seed(job.seed, view.name, server_round, secret),
        device=device,
        proximal_mu=mu,
    )

    metrics = MetricRecord(
        {
            # Uniform weights: a record count is itself data about the node.
            p.WEIGHT: 1.0,
            p.TRAIN_LOSS: result.mean_loss,
            p.STEPS: result.steps,
        }
    )
    if dp is not None:
        release = Release(
            noise_multiplier=dp.noise_multiplier,
            sample_rate=result.sample_rate,
            steps=result.steps,
        )
        # Recorded (durably, on a deployed node) before the update is handed to Flower.
        metrics[p.EPSILON] = view.account.record(release, server_round)
        metrics[p.DELTA] = view.account.delta
        metrics[p.NOISE_MULTIPLIER] = dp.noise_multiplier
        metrics[p.SAMPLE_RATE] = result.sample_rate
    return model_to_arrays(model), metrics


def train_secure(view_of: ViewOf, message: Message, context: Context) -> Message:
    """One stage of a SecAgg+ round (client/secure_aggregation.py); stage 3 trains."""
    request = read_stage(message.content.config_records.get(SECAGG_KEY))
    try:
        if isinstance(request, Setup):
            return _secure_setup(view_of, message, context, request)
        trained: list[MetricRecord] = []
        if not isinstance(request, MaskedInput):
            return Message(secagg.answer(request, context.state, _no_update), reply_to=message)
        view = view_of(message, context)

        def update_of() -> np.ndarray:
            local, metrics = _train_round(view, message)
            trained.append(metrics)
            return flatten_update(local, message.content.array_records[p.ARRAYS_KEY])

        content = secagg.answer(request, context.state, update_of)
        content[p.METRICS_KEY] = trained[0]
        content[p.NODE_KEY] = _identity(view)
        return Message(content, reply_to=message)
    except EncodingRangeError as exc:
        # Trained and recorded: the refusal carries the round's spend (ε), no update.
        spent = trained[0] if trained else None
        refusal = Refusal(code=p.RefusalCode.UPDATE_OUT_OF_RANGE, reason=str(exc))
        raise NodeRefusedError(refusal, metrics=spent) from None
    except secagg.REFUSED as exc:
        raise NodeRefusedError(
            Refusal(code=p.RefusalCode.SECAGG_REFUSED, reason=str(exc))
        ) from None


def _no_update() -> np.ndarray:
    raise AssertionError("only the masked-input stage trains")  # pragma: no cover


def _secure_setup(view_of: ViewOf, message: Message, context: Context, setup: Setup) -> Message:
    """Stage 1: policy on the cohort, then the round's admission and planned release.

    The planned release (noise multiplier, sample rate, steps: what training
    in stage 3 will do) is what the coordinator derives the update range from;
    nothing is trained or spent yet.
    """
    view = view_of(message, context)
    if view.policy is not None and setup.cohort_size < view.policy.min_cohort:
        raise NodeRefusedError(
            Refusal(
                code=p.RefusalCode.COHORT_TOO_SMALL,
                reason=f"the round's cohort has {setup.cohort_size} node(s), fewer than this "
                f"node's policy minimum of {view.policy.min_cohort}",
            )
        )
    job = view.job
    dp = view.account.admit(job, len(view.train), _model(view)[1])
    plan = planned_release(job, len(view.train), 1.0 if dp is None else dp.noise_multiplier)
    metrics = MetricRecord({p.WEIGHT: 1.0, p.STEPS: plan.steps})
    if dp is not None:
        metrics[p.NOISE_MULTIPLIER] = dp.noise_multiplier
        metrics[p.SAMPLE_RATE] = plan.sample_rate
    minimum = view.policy.min_cohort if view.policy is not None else 1
    keys = secagg.begin_round(setup, context.state, minimum)
    content = RecordDict({SECAGG_KEY: keys, p.METRICS_KEY: metrics, p.NODE_KEY: _identity(view)})
    return Message(content, reply_to=message)


def statistics(view_of: ViewOf, message: Message, context: Context) -> Message:
    """The job's statistics query: its ε recorded first, then the noisy release (never exact)."""
    view = view_of(message, context)
    config = view.job.statistics
    if config is None:
        raise NodeRefusedError(
            Refusal(
                code=p.RefusalCode.NO_STATISTICS_QUERY, reason="the job has no [statistics] block"
            )
        )
    facts = view.facts()
    account = view.account
    plan = plan_query(facts, config, account.delta, account.accountant)
    if isinstance(plan, Refusal):
        raise NodeRefusedError(plan)
    model_bytes: list[bytes] = []
    predictions = None
    if config.model is not None:
        arrays = message.content.array_records.get(p.ARRAYS_KEY)
        if arrays is None:
            raise FederationError("the statistics query names a model but carries none")
        predictions = _predictions(view, arrays, facts, config.group_column)
        model_bytes = _array_bytes(arrays)
    account.check_statistics(plan.epsilon)
    # Recorded before the release is drawn.
    spent = account.record(plan.release, server_round=0, mechanism=Mechanism.GAUSSIAN)
    question = _question(view, b"statistics", *model_bytes)
    secret = account.noise_secret(question)
    # The question itself in the stream too: in simulation (no secret) two different
    # queries must not share their noise, or their difference would cancel it.
    stream = hashlib.sha256(b"\0".join(question)).digest()
    rng = np.random.default_rng(_round_seed(view.job.seed, view.name, 0, secret, stream))

    def noise(block: Block, size: int) -> np.ndarray:
        return rng.normal(0.0, plan.sigma * plan.blocks[block], size=size)

    fields = release_statistics(view.num_classes, facts, plan.selection, predictions, config, noise)
    answer = StatisticsRelease.model_validate(
        {
            **fields,
            "noise_multiplier": plan.sigma,
            "sensitivity": plan.blocks,
            "epsilon": plan.epsilon,
            "epsilon_spent": spent,
            "delta": account.delta,
        }
    )
    record = ConfigRecord({STATISTICS_KEY: answer.encode()})
    return Message(
        RecordDict({STATISTICS_KEY: record, p.NODE_KEY: _identity(view)}), reply_to=message
    )


def _predictions(
    view: NodeView, arrays: ArrayRecord, facts: DataFacts, group_column: str | None
) -> Predictions:
    """The global model's predictions on the node's test split (a model the node would run).

    `group_column` is one of `facts.test_groups` (`plan_query` checked it).
    """
    job = view.job
    model, architecture = _model(view)
    view.account.check_model(job, architecture)
    load_arrays(model, arrays)
    predicted = predict(model, view.test, resolve_device(job.training.device))
    if group_column is None:
        return Predictions(predicted=predicted, labels=view.test.y)
    names, groups = facts.test_groups[group_column]
    return Predictions(predicted=predicted, labels=view.test.y, groups=groups, group_names=names)


def evaluate(view_of: ViewOf, message: Message, context: Context) -> Message:
    """Loss and accuracy of the global model on the node's local test split."""
    view = view_of(message, context)
    model, architecture = _model(view)
    view.account.check_model(view.job, architecture)  # a refused model runs nowhere
    load_arrays(model, message.content.array_records[p.ARRAYS_KEY])
    loss, accuracy = evaluate_model(model, view.test, resolve_device(view.job.training.device))
    metrics = MetricRecord({p.WEIGHT: len(view.test), p.EVAL_LOSS: loss, p.EVAL_ACCURACY: accuracy})
    return Message(
        RecordDict({p.METRICS_KEY: metrics, p.NODE_KEY: _identity(view)}), reply_to=message
    )


def node_app(view_of: ViewOf) -> ClientApp:
    """consortia's node as a Flower ClientApp, over the nodes `view_of` gives.

    Deployment runs `app` (below); the simulation lab builds its virtual nodes
    with its own view (consortia.simulations.virtual_node), so this module
    holds no simulated data and no path that only the lab would use.
    """
    app = ClientApp()
    app.query()(_bound(query, view_of))
    app.train()(_bound(train, view_of))
    app.train(MESSAGE_ACTION)(_bound(train_secure, view_of))
    app.query(STATISTICS_ACTION)(_bound(statistics, view_of))
    app.evaluate()(_bound(evaluate, view_of))
    return app


def _bound(handler: Callable[[ViewOf, Message, Context], Message], view_of: ViewOf) -> Handler:
    """`handler` for one kind of node, answering refusals as replies."""

    def bound(message: Message, context: Context) -> Message:
        return handler(view_of, message, context)

    bound.__name__, bound.__doc__ = handler.__name__, handler.__doc__
    return _answer_refusals(bound)


app = node_app(deployed_view)
"""The deployed node's ClientApp (`consortia.client.app:app`, run by `consortia node start`)."""

__all__ = ["NodeView", "ViewOf", "app", "deployed_view", "node_app"]
