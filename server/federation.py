"""One federated run, top-down: roster -> strategy -> rounds -> outputs.

This is the body of consortia's ServerApp. The rounds run in consortia's
own loop (round_loop.py) over Flower's strategy methods, so that a run can
start at any round: after every round the coordinator writes one checkpoint
(outputs/checkpoint.py), and `resume` continues a run folder from its newest
complete one (outputs/resume.py).

A simulated scenario's data and adversaries belong to the simulation lab
(`consortia.simulations`), which imports this module, never the reverse: the
lab hands in what only it knows as a `ScenarioLab`.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from consortia.common import protocol as p
from consortia.common.arrays import LabeledArrays
from consortia.common.config import JobConfig, ScenarioConfig, SimulationConfig
from consortia.common.config_io import LoadedConfig
from consortia.common.errors import FederationError
from consortia.common.evaluation import evaluate_model
from consortia.common.models import architecture_hash, build_model
from consortia.common.privacy import Release, epsilon, histogram_release
from consortia.common.record_values import number
from consortia.common.scaling import FeatureScaling
from consortia.common.weights import load_arrays, model_to_arrays
from consortia.server.outputs.checkpoint import CheckpointDoc, RoundCheckpoint
from consortia.server.outputs.manifest import Manifest, build_manifest, config_sha256
from consortia.server.outputs.metrics_file import FinalMetrics
from consortia.server.outputs.model_files import file_sha256, model_file_bytes
from consortia.server.outputs.resume import load_resume_point
from consortia.server.outputs.run_outputs import RunOutputs
from consortia.server.rounds.cohort import Cohort
from consortia.server.rounds.label_skew import LabelSkew
from consortia.server.rounds.rng_state import capture_rng, restore_rng
from consortia.server.rounds.roster import Roster, discover
from consortia.server.rounds.round_loop import Purpose, SecureTrainer, run_rounds
from consortia.server.rounds.run_log import NodeFailure, RoundRecord, RunLog, kept_shares
from consortia.server.rounds.secure_aggregation import SecureRound, run_secure_round
from consortia.server.rounds.strategies import (
    ConsortiaMedian,
    ConsortiaStrategy,
    ConsortiaTrimmedMean,
    build_strategy,
)
from consortia.server.rounds.strategy_state import capture_strategy_state, restore_strategy_state


class ScenarioLab(Protocol):
    """What a simulated scenario needs that only the simulation lab can build.

    `consortia simulate` (and the lab's app for `flwr run .`) passes one; a
    deployed job has none, and a scenario without one is refused.
    """

    def centralized_test_data(self, config: ScenarioConfig) -> LabeledArrays:
        """The coordinator's test set (`evaluation = "centralized"`)."""
        ...

    def adversary_names(self, config: ScenarioConfig) -> frozenset[str]:
        """The scenario's Byzantine nodes: metrics.json lists those that sent an update."""
        ...

    def label_counts(self, config: ScenarioConfig) -> dict[str, tuple[int, ...]] | None:
        """Every virtual node's true label counts, for the report; None if it cannot say."""
        ...

    def feature_scaling(self, config: ScenarioConfig) -> FeatureScaling:
        """How the scenario's source scales its features (the manifest records it)."""
        ...


class RoundListener(Protocol):
    """Receives progress: the CLI draws a progress bar, `flwr run` logs.

    A resumed run replays the checkpointed rounds through `on_round` right
    after `on_start`, so progress starts where the run stands.
    """

    def on_start(self, total_rounds: int, roster: Roster, skew: LabelSkew | None) -> None: ...

    def on_round_started(self, server_round: int) -> None: ...

    def on_round(self, record: RoundRecord) -> None: ...


@dataclass(frozen=True)
class RunSummary:
    """What a finished run hands back to its caller."""

    out_dir: Path
    final: FinalMetrics
    rounds: list[RoundRecord]


def run_federation(
    grid: Grid,
    loaded: LoadedConfig,
    out_dir: Path,
    listener: RoundListener,
    resume: Path | None = None,
    lab: ScenarioLab | None = None,
) -> RunSummary:
    """Run the job (or simulated scenario) over the nodes reachable through `grid`.

    With `resume` (a run folder), continue that run after its newest complete
    checkpoint instead, writing into the same folder (`out_dir` is ignored).
    A scenario needs the simulation `lab` that runs its virtual nodes.
    """
    config = loaded.config
    scenario = config if isinstance(config, ScenarioConfig) else None
    if scenario is not None and lab is None:
        raise FederationError(
            f"{loaded.source}: a simulation scenario runs in the simulation lab: "
            "`consortia simulate` (or `flwr run simulations/flower-app`); a deployment runs a job"
        )
    simulation = scenario.simulation if scenario is not None else None
    job = config.job() if isinstance(config, ScenarioConfig) else config
    if simulation is None and config.evaluation == "centralized":
        raise FederationError(
            "evaluation = 'centralized' needs a coordinator test set, which only simulations "
            "have; use 'federated' or 'none' for a deployed job"
        )
    point = load_resume_point(resume, config) if resume is not None else None
    out_dir = resume if resume is not None else out_dir
    _seed_everything(config.seed)
    task = p.TaskSpec.for_nodes(job, simulation).encode()
    expected = simulation.nodes if simulation is not None else config.min_nodes
    query = ConfigRecord({p.TASK_KEY: _query_task(job, simulation, resumed=point is not None)})
    roster = discover(grid, query, expected, config.round_timeout_s)
    feature_shape, num_classes = roster.data_shape()
    model = build_model(config.model, feature_shape, num_classes, config.seed)
    in_lab = (scenario, lab) if scenario is not None and lab is not None else None
    outputs = RunOutputs(out_dir, in_lab[1].label_counts(in_lab[0]) if in_lab else None)
    run_log = RunLog(
        roster,
        adversaries=in_lab[1].adversary_names(in_lab[0]) if in_lab else (),
        private=config.privacy.enabled,
    )
    strategy = build_strategy(job)
    strategy.attach(
        Cohort(roster, config.clients_per_round, config.seed),
        run_log,
        federated_evaluation=config.evaluation == "federated",
    )
    if point is None:
        manifest = build_manifest(
            out_dir.name,
            config,
            loaded.source,
            loaded.source_sha256,
            roster,
            architecture_hash(model),
            feature_scaling=in_lab[1].feature_scaling(in_lab[0]) if in_lab else None,
        )
        run = _RunFacts(
            config, manifest, outputs.write_manifest(manifest), feature_shape, num_classes
        )
        histograms = _histogram_releases(roster, job)
        run_log.record_releases(histograms)
        if job.privacy.enabled and histograms:  # spent before round 1, not 0 until it trains
            # Every node made the same release: account it once, not once per node.
            release = next(iter(histograms.values()))
            spent = epsilon([release], job.privacy.delta, job.privacy.accountant)
            run_log.record_spent(dict.fromkeys(histograms, spent))
        arrays = model_to_arrays(model)
        last_model = None
    else:
        point.check_federation(roster, feature_shape, num_classes, architecture_hash(model))
        doc = point.checkpoint.doc
        run = _RunFacts(config, doc.manifest, doc.manifest_sha256, feature_shape, num_classes)
        last_model = outputs.restore(point.checkpoint)
        run_log.restore(doc.epsilon, doc.releases)
        arrays = point.checkpoint.arrays()
        restore_strategy_state(strategy, point.checkpoint.strategy, doc.model_keys)
    listener.on_start(config.rounds, roster, run.manifest.label_skew)
    for record in outputs.metrics.rounds:
        listener.on_round(record)
    test_data = (
        in_lab[1].centralized_test_data(in_lab[0])
        if in_lab is not None and in_lab[0].evaluation == "centralized"
        else None
    )
    observer = _RoundObserver(
        run, model, strategy, run_log, outputs, listener, last_model, test_data
    )
    if point is not None:
        restore_rng(point.checkpoint.rng)  # last: the generators continue where round k left them
    run_rounds(
        strategy,
        grid,
        arrays,
        secure=_secure_trainer(grid, job, strategy),
        first_round=1 if point is None else point.next_round,
        last_round=config.rounds,
        timeout_s=config.round_timeout_s,
        train_config=ConfigRecord({p.TASK_KEY: task}),
        evaluate_config=ConfigRecord({p.TASK_KEY: task}),
        observer=observer,
    )
    final = observer.final()
    outputs.finish(final, config.privacy.delta if config.privacy.enabled else None)
    return RunSummary(out_dir=out_dir, final=final, rounds=outputs.metrics.rounds)


def _secure_trainer(
    grid: Grid, job: JobConfig, strategy: ConsortiaStrategy
) -> SecureTrainer | None:
    """The job's secure rounds (None without `[secure_aggregation]`).

    A node's update range is the norm bound the coordinator would have checked
    in the clear (update_checks.py), from the job and the node's reported
    steps, noise and sample rate; a reply the strategy would not screen in
    cannot join the sum.
    """
    settings = job.secure_aggregation
    if settings is None:
        return None
    run_id = grid.run.run_id

    def bound_of(reply: Message) -> float | str:
        problem = strategy.screening_problem(reply)
        if problem is not None:
            return problem
        metrics = reply.content.metric_records[p.METRICS_KEY]  # screened: it is there
        bound = strategy.update_checks.bound(metrics, strategy.reference)
        if bound is None:
            return "no bound on this update can be derived for the secure-aggregation range"
        return bound if isinstance(bound, str) else bound.value

    def train(server_round: int, messages: list[Message], arrays: ArrayRecord) -> SecureRound:
        return run_secure_round(
            grid,
            messages,
            arrays,
            settings,
            context=f"run {run_id} round {server_round}",
            timeout_s=job.round_timeout_s,
            bound_of=bound_of,
        )

    return train


def _query_task(job: JobConfig, simulation: SimulationConfig | None, resumed: bool) -> str:
    """The roster query's task. A resumed run does not ask for label histograms again:
    the manifest holds them, and a second release would spend the nodes' privacy twice."""
    if resumed and job.label_histogram is not None:
        job = job.model_copy(update={"label_histogram": None})
    return p.TaskSpec.for_nodes(job, simulation).encode()


def _histogram_releases(roster: Roster, job: JobConfig) -> dict[str, Release]:
    """The Gaussian release each node that shared its label histogram made (and recorded)."""
    if job.label_histogram is None:
        return {}
    release = histogram_release(job.label_histogram.noise_multiplier)
    return {node.name: release for node in roster.nodes if node.label_histogram is not None}


@dataclass(frozen=True)
class _RunFacts:
    """What every checkpoint of the run repeats."""

    config: JobConfig
    manifest: Manifest
    manifest_sha256: str
    feature_shape: tuple[int, ...]
    num_classes: int


class _RoundObserver:
    """After each round: central evaluation, record, checkpoint, notify (round_loop's observer)."""

    def __init__(
        self,
        run: _RunFacts,
        model: torch.nn.Module,
        strategy: ConsortiaStrategy,
        run_log: RunLog,
        outputs: RunOutputs,
        listener: RoundListener,
        last_model: Path | None,
        test_data: LabeledArrays | None,
    ) -> None:
        self.run = run
        self.config = run.config
        self.model = model
        self.strategy = strategy
        self.run_log = run_log
        self.outputs = outputs
        self.listener = listener
        self.config_sha256 = config_sha256(run.config)
        self.test_data = test_data  # the coordinator's test set (centralized evaluation)
        self.last_model = last_model
        self._round_started = time.perf_counter()
        self._updates: dict[str, ArrayRecord] = {}  # this round's, for `_record_kept_shares`

    def before_round(self, server_round: int) -> None:
        self._round_started = time.perf_counter()
        self.listener.on_round_started(server_round)

    def on_replies(
        self, server_round: int, purpose: Purpose, sent_to: list[int], replies: list[Message]
    ) -> None:
        """Note each node's DP release (train) and every node that did not answer in time."""
        roster = self.strategy.cohort.roster
        answered = {reply.metadata.src_node_id for reply in replies}
        silent = [
            NodeFailure(
                node=roster.name_of(node_id),
                reason=f"no {purpose} reply within {self.config.round_timeout_s:g} s",
                kind=p.FailureKind.NO_REPLY,
            )
            for node_id in sent_to
            if node_id not in answered
        ]
        if silent:
            self.run_log.record_failures(server_round, sorted(silent, key=lambda f: f.node))
        if purpose == "train":
            self.run_log.record_releases(_reported_releases(replies, roster))
            if isinstance(self.strategy, ConsortiaTrimmedMean | ConsortiaMedian):
                self._updates = _updates_of(replies, roster)

    def _record_kept_shares(self, server_round: int) -> None:
        """Trimmed mean / median: how much of each aggregated update counted (run_log.kept_shares).

        Over the round's participants, i.e. the updates the aggregate saw after screening.
        """
        participants = self.run_log.current(server_round).participants
        updates = {name: self._updates[name] for name in participants if name in self._updates}
        self._updates = {}
        cut = _coordinate_cut(self.strategy, len(updates))
        if cut is not None and updates:
            self.run_log.record_kept_shares(server_round, kept_shares(updates, cut))

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        self._record_kept_shares(server_round)
        metrics = self._evaluate(arrays)
        if metrics is not None:
            self.run_log.record_evaluation(
                server_round, number(metrics, p.EVAL_LOSS), number(metrics, p.EVAL_ACCURACY)
            )
        record = self.run_log.close(server_round, time.perf_counter() - self._round_started)
        model = {key: array.numpy() for key, array in arrays.items()}
        model_bytes = model_file_bytes(model)
        rng = capture_rng()
        checkpoint = RoundCheckpoint(
            doc=CheckpointDoc(
                round=server_round,
                rounds_planned=self.config.rounds,
                config_sha256=self.config_sha256,
                manifest_sha256=self.run.manifest_sha256,
                manifest=self.run.manifest,
                model_keys=list(model),
                model_sha256=hashlib.sha256(model_bytes).hexdigest(),
                feature_shape=self.run.feature_shape,
                num_classes=self.run.num_classes,
                epsilon=dict(self.run_log.epsilon),
                releases=self.run_log.releases,
                records=[*self.outputs.metrics.rounds, record],
                rng=rng.scalars,
            ),
            model=model,
            strategy=capture_strategy_state(self.strategy),
            rng=rng,
        )
        self.last_model = self.outputs.add_round(record, checkpoint, model_bytes)
        self.listener.on_round(record)

    def _evaluate(self, arrays: ArrayRecord) -> MetricRecord | None:
        if self.test_data is None:
            return None
        load_arrays(self.model, arrays)
        loss, accuracy = evaluate_model(self.model, self.test_data, torch.device("cpu"))
        return MetricRecord({p.EVAL_LOSS: loss, p.EVAL_ACCURACY: accuracy})

    def final(self) -> FinalMetrics:
        last = self.outputs.metrics.rounds[-1]
        assert self.last_model is not None  # at least one round ran
        private = self.config.privacy.enabled
        epsilon = dict(self.run_log.epsilon) if private else None
        return FinalMetrics(
            accuracy=last.accuracy,
            loss=last.loss,
            private=private,
            epsilon_max=None if epsilon is None else max(epsilon.values(), default=0.0),
            epsilon=epsilon,
            delta=self.config.privacy.delta if self.config.privacy.enabled else None,
            model=str(self.last_model.relative_to(self.outputs.root)),
            model_sha256=file_sha256(self.last_model),
        )


def _reported_releases(replies: list[Message], roster: Roster) -> dict[str, Release]:
    """The DP release each train reply states (noise multiplier, sample rate, steps)."""
    releases = {}
    for reply in replies:
        if reply.has_error():
            continue
        metrics = reply.content.get(p.METRICS_KEY)
        if not isinstance(metrics, MetricRecord):
            continue
        sigma, rate, steps = (metrics.get(k) for k in (p.NOISE_MULTIPLIER, p.SAMPLE_RATE, p.STEPS))
        if not (isinstance(sigma, float) and isinstance(rate, float) and isinstance(steps, int)):
            continue  # a node that trained without DP released nothing to account for
        if sigma > 0 and 0 < rate <= 1 and steps >= 0:
            releases[roster.name_of(reply.metadata.src_node_id)] = Release(
                noise_multiplier=sigma, sample_rate=rate, steps=steps
            )
    return releases


def _updates_of(replies: list[Message], roster: Roster) -> dict[str, ArrayRecord]:
    """The update in each train reply that has one, by node name (references, not copies)."""
    updates = {}
    for reply in replies:
        if not reply.has_error() and p.ARRAYS_KEY in reply.content.array_records:
            updates[roster.name_of(reply.metadata.src_node_id)] = reply.content.array_records[
                p.ARRAYS_KEY
            ]
    return updates


def _coordinate_cut(strategy: ConsortiaStrategy, n: int) -> int | None:
    """Values cut from each end of every coordinate by a trimmed mean or median of n updates."""
    if isinstance(strategy, ConsortiaTrimmedMean):
        return int(strategy.beta * n)
    if isinstance(strategy, ConsortiaMedian):
        return (n - 1) // 2
    return None


def _seed_everything(seed: int) -> None:
    """Seed the coordinator's RNGs (model init, any sampling Flower does itself)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
