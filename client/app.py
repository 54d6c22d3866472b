"""consortia's Flower ClientApp: what a node does when the coordinator asks.

- `query`: say who the node is (name, data fingerprint); no data leaves.
- `train`: DP-SGD on the node's own data, starting from the global model;
  the privacy spend is recorded before the update is returned.
- `evaluate`: loss and accuracy of the global model on the node's test split.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from consortia.client import training
from consortia.client.device import resolve_device
from consortia.client.privacy_state import JobPrivacyState, load_state, save_state
from consortia.common import protocol as p
from consortia.common.config import JobConfig
from consortia.common.errors import FederationError
from consortia.common.evaluation import evaluate_model
from consortia.common.models import build_model
from consortia.common.privacy import Release, calibrate_noise, epsilon
from consortia.common.simulated_data import NodeData, simulated_node_data
from consortia.common.weights import load_arrays, model_to_arrays

app = ClientApp()


@dataclass(frozen=True)
class _NodeView:
    """The node as one message sees it: its name, its data and the job."""

    name: str
    data: NodeData
    job: JobConfig


def _node_view(message: Message, context: Context) -> _NodeView:
    config = message.content[p.CONFIG_KEY]
    spec = p.TaskSpec.decode(config.get(p.TASK_KEY))
    if spec.simulation is None or "partition-id" not in context.node_config:
        raise FederationError(
            "this node has no dataset to train on: this version serves simulated nodes "
            "(Flower's simulation engine) only; registered on-prem datasets come with "
            "`consortia node`"
        )
    partition_id = int(context.node_config["partition-id"])
    return _NodeView(
        name=spec.simulation.node_name(partition_id),
        data=simulated_node_data(spec.simulation, spec.job.seed, partition_id),
        job=spec.job,
    )


def _identity(view: _NodeView) -> ConfigRecord:
    return ConfigRecord({p.NODE_NAME: view.name, p.NODE_FINGERPRINT: view.data.fingerprint()})


def _round_seed(job_seed: int, node_name: str, server_round: int) -> int:
    """A per-(job, node, round) seed: reproducible, and different for every node and round."""
    sequence = np.random.SeedSequence([job_seed, zlib.crc32(node_name.encode()), server_round])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


@app.query()
def query(message: Message, context: Context) -> Message:
    """Identify the node to the coordinator's roster."""
    view = _node_view(message, context)
    return Message(RecordDict({p.NODE_KEY: _identity(view)}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round of local training; returns the update and the privacy spent so far."""
    view = _node_view(message, context)
    job, data = view.job, view.data
    server_round = int(message.content[p.CONFIG_KEY][p.ROUND_KEY])
    device = resolve_device(job.training.device)
    if device.type == "cpu":
        # One thread per virtual node: Ray runs one node per core, and a fixed
        # thread count keeps float reductions (and so the model bytes) stable.
        torch.set_num_threads(1)

    model = build_model(job.model, data.feature_shape, data.num_classes, job.seed)
    load_arrays(model, message.content[p.ARRAYS_KEY])

    state = load_state(context)
    dp = _dp_settings(job, len(data.train), state)
    mu = float(message.content[p.CONFIG_KEY].get(p.PROXIMAL_MU_KEY, 0.0))
    result = training.train_locally(
        model,
        data.train,
        job.training,
        dp,
        seed=_round_seed(job.seed, view.name, server_round),
        device=device,
        proximal_mu=mu,
    )

    metrics = MetricRecord(
        {
            p.WEIGHT: _weight(job, len(data.train)),
            p.TRAIN_LOSS: result.mean_loss,
            p.STEPS: result.steps,
        }
    )
    if dp is not None:
        state.history.append(
            Release(
                noise_multiplier=dp.noise_multiplier,
                sample_rate=result.sample_rate,
                steps=result.steps,
            )
        )
        # Record the spend before the update is handed back to Flower.
        save_state(context, state)
        metrics[p.EPSILON] = epsilon(state.history, job.privacy.delta, job.privacy.accountant)
        metrics[p.DELTA] = job.privacy.delta
        metrics[p.NOISE_MULTIPLIER] = dp.noise_multiplier
        metrics[p.SAMPLE_RATE] = result.sample_rate
    content = RecordDict(
        {
            p.ARRAYS_KEY: model_to_arrays(model),
            p.METRICS_KEY: metrics,
            p.NODE_KEY: _identity(view),
        }
    )
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Loss and accuracy of the global model on the node's local test split."""
    view = _node_view(message, context)
    data = view.data
    model = build_model(view.job.model, data.feature_shape, data.num_classes, view.job.seed)
    load_arrays(model, message.content[p.ARRAYS_KEY])
    loss, accuracy = evaluate_model(model, data.test, resolve_device(view.job.training.device))
    metrics = MetricRecord({p.WEIGHT: len(data.test), p.EVAL_LOSS: loss, p.EVAL_ACCURACY: accuracy})
    return Message(
        RecordDict({p.METRICS_KEY: metrics, p.NODE_KEY: _identity(view)}), reply_to=message
    )


def _dp_settings(
    job: JobConfig, num_records: int, state: JobPrivacyState
) -> training.DpSettings | None:
    """The round's DP mechanism; the noise is calibrated once, for the whole job.

    With a target ε the node assumes it takes part in every planned round, so
    its ε after the last round stays within the target however it is sampled.
    """
    privacy = job.privacy
    if not privacy.enabled:
        return None
    if state.noise_multiplier is None:
        if privacy.noise_multiplier is not None:
            state.noise_multiplier = privacy.noise_multiplier
        else:
            assert privacy.target_epsilon is not None  # guaranteed by PrivacyConfig
            batch = job.training.batch_size
            planned_steps = (
                job.rounds
                * job.training.local_epochs
                * training.steps_per_epoch(num_records, batch)
            )
            state.noise_multiplier = calibrate_noise(
                privacy.target_epsilon,
                privacy.delta,
                training.poisson_sample_rate(num_records, batch),
                planned_steps,
                privacy.accountant,
            )
    return training.DpSettings(
        noise_multiplier=state.noise_multiplier, max_grad_norm=privacy.max_grad_norm
    )


def _weight(job: JobConfig, num_records: int) -> float:
    """The node's aggregation weight: 1 (uniform) unless the job asks for record counts."""
    return float(num_records) if job.strategy.weighting == "examples" else 1.0


__all__ = ["app"]
