"""What travels between coordinator and nodes, and under which keys.

Flower records carry only flat values, so the job travels as one validated
JSON document (`TaskSpec`) inside the `ConfigRecord`, and every reply uses the
metric names defined here. Both sides validate what they receive.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict
from pydantic import ValidationError

from consortia.common.config import JobConfig, SimulationConfig, StrictModel
from consortia.common.errors import FederationError

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
REFUSAL_CODE = "code"
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

    def encode(self) -> str:
        return self.model_dump_json()

    @classmethod
    def decode(cls, text: object) -> TaskSpec:
        if not isinstance(text, str):
            raise FederationError(f"message has no '{TASK_KEY}' document (got {type(text)})")
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise FederationError(f"malformed task document: {exc}") from None


def refusal_record(code: str, reason: str) -> RecordDict:
    """The whole content of a node's refusal reply: nothing but why."""
    return RecordDict({REFUSAL_KEY: ConfigRecord({REFUSAL_CODE: code, REFUSAL_REASON: reason})})


def read_refusal(content: RecordDict) -> tuple[str, str] | None:
    """(code, reason) when a reply is a node's refusal, else None."""
    record = content.get(REFUSAL_KEY)
    if not isinstance(record, ConfigRecord):
        return None
    return str(record.get(REFUSAL_CODE, "unknown")), str(record.get(REFUSAL_REASON, ""))
