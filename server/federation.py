"""One federated run, top-down: roster -> strategy -> rounds -> outputs.

This is the body of consortia's ServerApp. It leaves the round loop to
Flower's `Strategy.start` and hooks in after each round through its
`evaluate_fn` (which Flower calls before round 1 and after every round).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from consortia.common import protocol as p
from consortia.common.arrays import LabeledArrays
from consortia.common.config import JobConfig, ScenarioConfig
from consortia.common.config_io import LoadedConfig
from consortia.common.errors import FederationError
from consortia.common.evaluation import evaluate_model
from consortia.common.models import architecture_hash, build_model
from consortia.common.simulated_data import centralized_test_data
from consortia.common.weights import load_arrays, model_to_arrays
from consortia.server.checkpoints import file_sha256
from consortia.server.cohort import Cohort
from consortia.server.label_skew import LabelSkew
from consortia.server.manifest import build_manifest
from consortia.server.roster import Roster, discover
from consortia.server.run_log import RoundRecord, RunLog
from consortia.server.run_outputs import FinalMetrics, RunOutputs
from consortia.server.strategies import build_strategy


class RoundListener(Protocol):
    """Receives progress: the CLI draws a progress bar, `flwr run` logs."""

    def on_start(self, total_rounds: int, roster: Roster, skew: LabelSkew | None) -> None: ...

    def on_round(self, record: RoundRecord) -> None: ...


@dataclass(frozen=True)
class RunSummary:
    """What a finished run hands back to its caller."""

    out_dir: Path
    final: FinalMetrics
    rounds: list[RoundRecord]


def run_federation(
    grid: Grid, loaded: LoadedConfig, out_dir: Path, listener: RoundListener
) -> RunSummary:
    """Run the job (or simulated scenario) over the nodes reachable through `grid`."""
    config = loaded.config
    simulation = config.simulation if isinstance(config, ScenarioConfig) else None
    job = config.job() if isinstance(config, ScenarioConfig) else config
    if simulation is None and config.evaluation == "centralized":
        raise FederationError(
            "evaluation = 'centralized' needs a coordinator test set, which only simulations "
            "have; use 'federated' or 'none' for a deployed job"
        )
    _seed_everything(config.seed)
    task = p.TaskSpec(job=job, simulation=simulation).encode()
    expected = simulation.nodes if simulation is not None else config.min_nodes
    roster = discover(grid, ConfigRecord({p.TASK_KEY: task}), expected, config.round_timeout_s)
    feature_shape, num_classes = roster.data_shape()
    model = build_model(config.model, feature_shape, num_classes, config.seed)
    outputs = RunOutputs(out_dir)
    manifest = build_manifest(
        out_dir.name,
        config,
        loaded.source,
        loaded.source_sha256,
        roster,
        architecture_hash(model),
    )
    outputs.write_manifest(manifest)
    listener.on_start(config.rounds, roster, manifest.label_skew)
    run_log = RunLog(roster)
    strategy = build_strategy(job)
    strategy.attach(
        Cohort(roster, config.clients_per_round, config.seed),
        run_log,
        federated_evaluation=config.evaluation == "federated",
    )
    observer = _RoundObserver(config, model, run_log, outputs, listener)
    strategy.start(
        grid,
        model_to_arrays(model),
        num_rounds=config.rounds,
        timeout=config.round_timeout_s,
        train_config=ConfigRecord({p.TASK_KEY: task}),
        evaluate_config=ConfigRecord({p.TASK_KEY: task}),
        evaluate_fn=observer,
    )
    final = observer.final()
    outputs.finish(final, config.privacy.delta if config.privacy.enabled else None)
    return RunSummary(out_dir=out_dir, final=final, rounds=outputs.metrics.rounds)


class _RoundObserver:
    """Flower's per-round `evaluate_fn`: central evaluation, checkpoint, record, notify."""

    def __init__(
        self,
        config: JobConfig,
        model: torch.nn.Module,
        run_log: RunLog,
        outputs: RunOutputs,
        listener: RoundListener,
    ) -> None:
        self.config = config
        self.model = model
        self.run_log = run_log
        self.outputs = outputs
        self.listener = listener
        self.test_data: LabeledArrays | None = (
            centralized_test_data(config.simulation, config.seed)
            if isinstance(config, ScenarioConfig) and config.evaluation == "centralized"
            else None
        )
        self.last_checkpoint: Path | None = None
        self._round_started = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = self._evaluate(arrays)
        if server_round == 0:
            self._round_started = time.perf_counter()
            return metrics
        if metrics is not None:
            self.run_log.record_evaluation(
                server_round, float(metrics[p.EVAL_LOSS]), float(metrics[p.EVAL_ACCURACY])
            )
        record = self.run_log.close(server_round, time.perf_counter() - self._round_started)
        self.last_checkpoint = self.outputs.add_round(record, arrays)
        self.listener.on_round(record)
        self._round_started = time.perf_counter()
        return metrics

    def _evaluate(self, arrays: ArrayRecord) -> MetricRecord | None:
        if self.test_data is None:
            return None
        load_arrays(self.model, arrays)
        loss, accuracy = evaluate_model(self.model, self.test_data, torch.device("cpu"))
        return MetricRecord({p.EVAL_LOSS: loss, p.EVAL_ACCURACY: accuracy})

    def final(self) -> FinalMetrics:
        last = self.outputs.metrics.rounds[-1]
        assert self.last_checkpoint is not None  # at least one round ran
        epsilon = dict(self.run_log.epsilon)
        return FinalMetrics(
            accuracy=last.accuracy,
            loss=last.loss,
            epsilon_max=max(epsilon.values(), default=0.0),
            epsilon=epsilon,
            delta=self.config.privacy.delta if self.config.privacy.enabled else None,
            model=str(self.last_checkpoint.relative_to(self.outputs.root)),
            model_sha256=file_sha256(self.last_checkpoint),
        )


def _seed_everything(seed: int) -> None:
    """Seed the coordinator's RNGs (model init, any sampling Flower does itself)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
