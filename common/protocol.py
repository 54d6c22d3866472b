"""What travels between coordinator and nodes, and under which keys.

Flower records carry only flat values, so the job travels as one validated
JSON document (`TaskSpec`) inside the `ConfigRecord`, and every reply uses the
metric names defined here. Both sides validate what they receive.
"""

from __future__ import annotations

from enum import StrEnum

from flwr.app import ConfigRecord, RecordDict
from pydantic import ValidationError

from consortia.common.config import JobConfig, SimulationConfig, StrictModel
from consortia.common.errors import FederationError
from consortia.common.model_plugins import deferred_lookup

# ConfigRecord keys (coordinator -> node)
TASK_KEY = "task"
ROUND_KEY = "server-round"  # set by Flower's strategies
PROXIMAL_MU_KEY = "proximal-mu"  # set by Flower's FedProx

# RecordDict keys
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NODE_KEY = "node"  # ConfigRecord describing the replying node
REFUSAL_KEY = "refusal"  # ConfigRecord {code, reason}: the node declined and did nothing

# Node description keys (node -> coordinator)
NODE_NAME = "name"
NODE_FINGERPRINT = "data-fingerprint"
NODE_FEATURE_SHAPE = "feature-shape"
NODE_NUM_CLASSES = "num-classes"
NODE_LABEL_HISTOGRAM = "label-histogram"  # DP-noised class counts, if asked and allowed
NODE_HISTOGRAM_WITHHELD = "label-histogram-withheld"  # why the node did not share it

# Refusal keys (node -> coordinator)
REFUSAL_CODE = "code"  # a `RefusalCode` value
REFUSAL_REASON = "reason"

# MetricRecord keys (node -> coordinator)
WEIGHT = "aggregation-weight"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"
EVAL_LOSS = "loss"
EVAL_ACCURACY = "accuracy"


class TaskSpec(StrictModel):
    """The job as a node receives it.

    `simulation` is set only in the simulation engine, where it tells the
    virtual node which slice of the bundled data is "its own". A deployed
    node ignores any data description from the coordinator and serves only
    the datasets its operator registered.
    """

    job: JobConfig
    simulation: SimulationConfig | None = None

    @classmethod
    def for_nodes(cls, job: JobConfig, simulation: SimulationConfig | None = None) -> TaskSpec:
        """The task the coordinator sends: the job with its model pinned to the distribution
        and version the coordinator built it from, so that a node with another refuses."""
        return cls(job=job.model_copy(update={"model": job.model.pinned()}), simulation=simulation)

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, text: object) -> TaskSpec:
        """The task as a node reads it: a model it lacks is its refusal, not a malformed task."""
        if not isinstance(text, str):
            raise FederationError(f"message has no '{TASK_KEY}' document (got {type(text)})")
        try:
            return cls.model_validate_json(text, context=deferred_lookup())
        except ValidationError as exc:
            raise FederationError(f"malformed task document: {exc}") from None


class RefusalCode(StrEnum):
    """Every code a refusal carries: why a node declined, for machines (the reason is for people).

    A `StrEnum`: a member is its string, so what travels in a refusal reply,
    and what metrics.json, stats.json and the audit logs hold, is the same
    text as before the codes were an enum.
    """

    # The job breaks the node's policy (client/policy.py, client/app.py).
    DP_REQUIRED = "dp-required"
    SECURE_AGGREGATION_REQUIRED = "secure-aggregation-required"
    MODEL_NOT_ALLOWED = "model-not-allowed"
    # The job's model as this node has it (client/model_admission.py): each reason names
    # the distribution the model comes from.
    MODEL_NOT_INSTALLED = "model-not-installed"
    MODEL_VERSION_MISMATCH = "model-version-mismatch"
    MODEL_UNUSABLE = "model-unusable"
    MODEL_NOT_DP_TRAINABLE = "model-not-dp-trainable"
    ARCHITECTURE_NOT_ALLOWED = "architecture-not-allowed"
    TOO_MANY_EPOCHS = "too-many-epochs"
    CLIPPING_TOO_LARGE = "clipping-too-large"
    DELTA_TOO_LARGE = "delta-too-large"
    NOISE_TOO_LOW = "noise-too-low"
    BUDGET_EXHAUSTED = "budget-exhausted"
    STATISTICS_NOT_ANSWERED = "statistics-not-answered"
    STATISTICS_TOO_COSTLY = "statistics-too-costly"
    COHORT_TOO_SMALL = "cohort-too-small"
    # The node cannot serve the job as it stands (client/admission.py, client/app.py).
    DATASET_NOT_SERVED = "dataset-not-served"
    DATA_UNUSABLE = "data-unusable"
    PRIVACY_TARGET_UNREACHABLE = "privacy-target-unreachable"
    LEDGER_UNUSABLE = "ledger-unusable"
    AUDIT_UNUSABLE = "audit-unusable"
    # Secure aggregation: a request the protocol forbids; an update outside the agreed range.
    SECAGG_REFUSED = "secagg-refused"
    UPDATE_OUT_OF_RANGE = "update-out-of-range"
    # A statistics query this node cannot answer (client/statistics.py, client/app.py).
    NO_STATISTICS_QUERY = "no-statistics-query"
    UNKNOWN_FEATURE = "unknown-feature"
    UNKNOWN_GROUP_COLUMN = "unknown-group-column"
    # Not a refusal: a fault the simulation lab injects (simulations/faults.py) and reports
    # in a refusal-shaped reply, so that the node answers at once (see `FAULT_KINDS`).
    SIMULATED_DROPOUT = "simulated-dropout"
    SIMULATED_STRAGGLER = "simulated-straggler"
    SIMULATED_CRASH = "simulated-crash"
    # Never sent by a node: what stats.json lists for a node whose answer the
    # coordinator could not use (server/statistics/job.py).
    NODE_ERROR = "node-error"
    MALFORMED_RELEASE = "malformed-release"
    NO_REPLY = "no-reply"
    # A refusal record that names no code.
    UNKNOWN = "unknown"


class FailureKind(StrEnum):
    """What went wrong with a node's part in a round: on every failure the coordinator records.

    Set where the failure is found (screening, checks, defences, the round
    loop's timeout), so that nothing downstream reads it back out of the
    reason, which is free text for people.
    """

    REFUSED = "refused"  # the node declined (a refusal reply; its code says why)
    ERROR_REPLY = "error-reply"  # Flower's error reply: the node's app failed
    # Nothing arrived within round_timeout_s, or Flower answered in the node's place that
    # its reply cannot come (the node missed its heartbeats: crashed, killed, cut off).
    NO_REPLY = "no-reply"
    MALFORMED = "malformed"  # a reply without the records, weight or array layout needed
    SCREENED_OUT = "screened-out"  # an update the value checks reject (norm bound, NaN/∞)
    KRUM_EXCLUDED = "krum-excluded"  # accepted, but not the update Krum selected
    MULTIKRUM_EXCLUDED = "multikrum-excluded"  # accepted, but not among Multi-Krum's selection
    SECAGG_DROPOUT = "secagg-dropout"  # left the secure-aggregation protocol after its setup
    # A fault the node itself reports; only the simulation lab's virtual nodes do.
    DROPOUT = "dropout"  # offline for the round: trained nothing, spent nothing
    LATE = "late"  # trained and spent, but its update missed the round deadline
    CRASH = "crash"  # crashed after recording its spend, before its update left


# The refusal-shaped replies that report a fault rather than a refusal.
FAULT_KINDS = {
    RefusalCode.SIMULATED_DROPOUT: FailureKind.DROPOUT,
    RefusalCode.SIMULATED_STRAGGLER: FailureKind.LATE,
    RefusalCode.SIMULATED_CRASH: FailureKind.CRASH,
}
# The coordinator's own codes in stats.json.
_COORDINATOR_KINDS = {
    RefusalCode.NODE_ERROR: FailureKind.ERROR_REPLY,
    RefusalCode.MALFORMED_RELEASE: FailureKind.MALFORMED,
    RefusalCode.NO_REPLY: FailureKind.NO_REPLY,
}


def kind_of_code(code: str) -> FailureKind:
    """The kind of failure a refusal reply (or a stats.json entry) with `code` stands for.

    A fault the node reports, or else a refusal: a code this version does not
    know (a node of another version) is a refusal all the same.
    """
    try:
        known = RefusalCode(code)
    except ValueError:
        return FailureKind.REFUSED
    return FAULT_KINDS.get(known) or _COORDINATOR_KINDS.get(known) or FailureKind.REFUSED


def refusal_record(code: RefusalCode, reason: str) -> RecordDict:
    """The whole content of a node's refusal reply: nothing but why."""
    record = ConfigRecord({REFUSAL_CODE: str(code), REFUSAL_REASON: reason})
    return RecordDict({REFUSAL_KEY: record})


def read_refusal(content: RecordDict) -> tuple[str, str] | None:
    """(code, reason) when a reply is a node's refusal, else None.

    The code as sent: a `RefusalCode` value, or one a node of another version
    knows (kept as text, so that records and messages show what the node said).
    """
    record = content.get(REFUSAL_KEY)
    if not isinstance(record, ConfigRecord):
        return None
    code = str(record.get(REFUSAL_CODE, RefusalCode.UNKNOWN))
    return code, str(record.get(REFUSAL_REASON, ""))
