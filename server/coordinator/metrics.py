"""The coordinator's Prometheus figures, read from its own state at every scrape.

Served by `consortia coordinator start` when coordinator.toml has a
`[metrics]` block (`consortia.common.metrics_http`). The rounds are run by
the ServerApp, in a process Flower starts per run, which writes each round
to `<state_dir>/runs/run-<id>/metrics.json` as soon as it is over (atomically,
after its checkpoint; `consortia job status` reads the same file). So the
service reads those files when Prometheus asks, rather than the ServerApp
keeping counters that would die with its process: a scrape shows every
round of every run the coordinator kept, and a restart of the service loses
nothing. Enrolled nodes come from nodes.json, online ones from the
SuperLink's Control API (`ListNodes`), cached for a few seconds.

Series (labels `run`: the run folder's id, `job`: the job's name):

- `consortia_coordinator_rounds_completed_total`, `..._round_duration_seconds`
  (histogram), `..._replies_total`, `..._updates_aggregated_total`,
  `..._node_failures_total{kind}` (`FailureKind`), `..._refusals_total{code}`
  (`RefusalCode`; a code this version does not know counts as `unknown`),
  `..._epsilon{node}` (each node's ε so far, as it reported it; none for a
  run without DP), `..._rounds_planned`, `..._run_finished`;
- `consortia_coordinator_nodes_enrolled`, `..._node_online{node}`,
  `..._nodes_online`, `..._superlink_up`, `..._info`.

Failure and refusal series appear once their count is non-zero. What a
round that never completed saw (a run that failed in it) is not in
metrics.json, so not here: its reasons are in the run's log and in the
audit log's `job.failed` entry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from consortia.common.errors import ConsortiaError
from consortia.common.protocol import FailureKind, RefusalCode
from consortia.common.versions import installed_versions
from consortia.server.coordinator.config import CoordinatorConfig
from consortia.server.rounds.legacy_failures import with_kind

PREFIX = "consortia_coordinator"
ROUND_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
ONLINE = "online"  # Flower's status of a node whose heartbeats arrive
_NODES_CACHE_S = 5.0
# Failures after which the node sent nothing: not a reply the coordinator received.
_SILENT = frozenset(
    {FailureKind.NO_REPLY, FailureKind.SECAGG_DROPOUT, FailureKind.DROPOUT, FailureKind.CRASH}
)


class _FailureView(BaseModel):
    """A `NodeFailure` of metrics.json, as counted here (kind derived for old records)."""

    model_config = ConfigDict(extra="ignore")

    refusal: str | None = None
    kind: FailureKind
    reason: str = ""

    @model_validator(mode="before")
    @classmethod
    def _kind_of_old_records(cls, data: object) -> object:
        return with_kind(data)


class _RoundView(BaseModel):
    """The fields of a metrics.json round record (`RoundRecord`, server/rounds/run_log.py)
    that the exporter counts. Not that model itself: it imports the privacy accountant
    and with it torch, which the coordinator service never loads."""

    model_config = ConfigDict(extra="ignore")

    round: int
    seconds: float | None = None
    epsilon: dict[str, float] | None = Field(default_factory=dict)
    participants: list[str] = Field(default_factory=list)
    failures: list[_FailureView] = Field(default_factory=list)
    accuracy_per_node: dict[str, float] = Field(default_factory=dict)


class _MetricsView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rounds: list[_RoundView] = Field(default_factory=list)
    final: dict[str, object] | None = None


class _ManifestView(BaseModel):
    model_config = ConfigDict(extra="ignore")

    config: dict[str, object] = Field(default_factory=dict)


@dataclass(frozen=True)
class RunFigures:
    """What one run folder says, reduced to the exported figures."""

    run: str
    job: str
    rounds_planned: int | None
    finished: bool
    rounds: int
    round_seconds: tuple[float, ...]  # of the rounds that recorded their time
    replies: int
    aggregated: int
    failures: dict[FailureKind, int]
    refusals: dict[RefusalCode, int]
    epsilon: dict[str, float] | None  # None: trained without DP


def run_figures(folder: Path) -> RunFigures | None:
    """The figures of a run folder with a metrics.json; None without one (a statistics run,
    or a run whose first round has not ended)."""
    try:
        metrics = _MetricsView.model_validate_json((folder / "metrics.json").read_bytes())
    except (OSError, ValidationError):
        return None
    job, planned = _job_of(folder)
    failures = {kind: 0 for kind in FailureKind}
    refusals: dict[RefusalCode, int] = {}
    replies = aggregated = 0
    for record in metrics.rounds:
        aggregated += len(record.participants)
        replies += len(record.participants) + len(record.accuracy_per_node)
        for failure in record.failures:
            failures[failure.kind] += 1
            replies += failure.kind not in _SILENT
            if failure.kind == FailureKind.REFUSED:
                code = _code(failure.refusal)
                refusals[code] = refusals.get(code, 0) + 1
    last = metrics.rounds[-1] if metrics.rounds else None
    return RunFigures(
        run=folder.name.removeprefix("run-"),
        job=job,
        rounds_planned=planned,
        finished=metrics.final is not None,
        rounds=len(metrics.rounds),
        round_seconds=tuple(r.seconds for r in metrics.rounds if r.seconds is not None),
        replies=replies,
        aggregated=aggregated,
        failures={kind: n for kind, n in failures.items() if n},
        refusals=refusals,
        epsilon=None if last is None or last.epsilon is None else dict(last.epsilon),
    )


def _code(text: str | None) -> RefusalCode:
    try:
        return RefusalCode(text or RefusalCode.UNKNOWN)
    except ValueError:
        return RefusalCode.UNKNOWN  # a node of another version: a label value of its own


def _job_of(folder: Path) -> tuple[str, int | None]:
    """The job's name and planned rounds, from the run's manifest.json."""
    try:
        manifest = _ManifestView.model_validate_json((folder / "manifest.json").read_bytes())
    except (OSError, ValidationError):
        return "", None
    name, rounds = manifest.config.get("name"), manifest.config.get("rounds")
    return (str(name) if name is not None else ""), (rounds if isinstance(rounds, int) else None)


class _RunCache:
    """Run figures per folder, read again only when its metrics.json changed."""

    def __init__(self) -> None:
        self._figures: dict[Path, tuple[tuple[int, int], RunFigures | None]] = {}
        self._lock = threading.Lock()

    def runs(self, runs_dir: Path) -> list[RunFigures]:
        with self._lock:
            seen: dict[Path, tuple[tuple[int, int], RunFigures | None]] = {}
            for folder in sorted(runs_dir.glob("run-*"), key=_run_order):
                try:
                    stat = (folder / "metrics.json").stat()
                except OSError:
                    continue
                stamp = (stat.st_mtime_ns, stat.st_size)
                cached = self._figures.get(folder)
                seen[folder] = (
                    cached
                    if cached and cached[0] == stamp
                    else (
                        stamp,
                        run_figures(folder),
                    )
                )
            self._figures = seen
            return [figures for _, figures in seen.values() if figures is not None]


def _run_order(folder: Path) -> tuple[int, str]:
    suffix = folder.name.removeprefix("run-")
    return (int(suffix), "") if suffix.isdigit() else (0, suffix)


NodeStates = Callable[[], dict[int, str]]
"""Flower's node id -> status ("online", "offline", ...), from the SuperLink; raises if down."""


class CoordinatorCollector:
    """A `prometheus_client` collector over one coordinator's state folder."""

    def __init__(self, config: CoordinatorConfig, node_states: NodeStates) -> None:
        self.config = config
        self.node_states = node_states
        self._runs = _RunCache()
        self._states: tuple[float, dict[int, str] | None] = (-_NODES_CACHE_S, None)
        self._states_lock = threading.Lock()
        versions = installed_versions()
        self._info = {
            "coordinator": config.name,
            "version": versions.consortia or "",
            "flower_version": versions.flwr or "",
        }

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily(f"{PREFIX}", "This coordinator and its software.")
        info.add_metric([], self._info)
        yield info
        yield from self._nodes()
        yield from self._run_metrics(self._runs.runs(self.config.runs_dir))

    # ------------------------------------------------------------------ nodes

    def _live_states(self) -> dict[int, str] | None:
        with self._states_lock:
            at, states = self._states
            if time.monotonic() - at >= _NODES_CACHE_S:
                try:
                    states = self.node_states()
                except ConsortiaError:
                    states = None
                self._states = (time.monotonic(), states)
            return states

    def _nodes(self) -> Iterator[Metric]:
        from consortia.server.coordinator.enrollment import read_enrolled

        try:
            enrolled = read_enrolled(self.config.nodes_file).nodes
        except ConsortiaError:
            enrolled = []
        yield GaugeMetricFamily(
            f"{PREFIX}_nodes_enrolled", "Nodes enrolled (nodes.json).", value=len(enrolled)
        )
        states = self._live_states()
        yield GaugeMetricFamily(
            f"{PREFIX}_superlink_up",
            "1 if the SuperLink answered the Control API at the last look.",
            value=0 if states is None else 1,
        )
        if states is None:
            return
        online = GaugeMetricFamily(
            f"{PREFIX}_node_online", "1 while the enrolled node is online.", labels=["node"]
        )
        for node in sorted(enrolled, key=lambda n: n.name):
            online.add_metric([node.name], 1 if states.get(node.node_id) == ONLINE else 0)
        yield online
        yield GaugeMetricFamily(
            f"{PREFIX}_nodes_online",
            "Enrolled nodes online.",
            value=sum(states.get(n.node_id) == ONLINE for n in enrolled),
        )

    # ------------------------------------------------------------------- runs

    @staticmethod
    def _run_metrics(runs: list[RunFigures]) -> Iterator[Metric]:
        run_labels = ["run", "job"]
        rounds = CounterMetricFamily(
            f"{PREFIX}_rounds_completed", "Rounds completed.", labels=run_labels
        )
        planned = GaugeMetricFamily(
            f"{PREFIX}_rounds_planned", "Rounds the job asks for.", labels=run_labels
        )
        finished = GaugeMetricFamily(
            f"{PREFIX}_run_finished", "1 once the run wrote its final model.", labels=run_labels
        )
        duration = HistogramMetricFamily(
            f"{PREFIX}_round_duration_seconds",
            "Wall time of each completed round, from sending it out to its record.",
            labels=run_labels,
        )
        replies = CounterMetricFamily(
            f"{PREFIX}_replies",
            "Node replies received and recorded (train and evaluate; used or not).",
            labels=run_labels,
        )
        aggregated = CounterMetricFamily(
            f"{PREFIX}_updates_aggregated", "Node updates aggregated.", labels=run_labels
        )
        failures = CounterMetricFamily(
            f"{PREFIX}_node_failures",
            "A node's part in a round that was not used, by kind.",
            labels=[*run_labels, "kind"],
        )
        refusals = CounterMetricFamily(
            f"{PREFIX}_refusals", "Refusals nodes sent, by code.", labels=[*run_labels, "code"]
        )
        epsilon = GaugeMetricFamily(
            f"{PREFIX}_epsilon",
            "Each node's ε so far in the run, as it reported it (at the job's δ).",
            labels=[*run_labels, "node"],
        )
        for run in runs:
            labels = [run.run, run.job]
            rounds.add_metric(labels, run.rounds)
            if run.rounds_planned is not None:
                planned.add_metric(labels, run.rounds_planned)
            finished.add_metric(labels, 1 if run.finished else 0)
            duration.add_metric(labels, _buckets(run.round_seconds), sum(run.round_seconds))
            replies.add_metric(labels, run.replies)
            aggregated.add_metric(labels, run.aggregated)
            for kind, count in run.failures.items():
                failures.add_metric([*labels, str(kind)], count)
            for code, count in sorted(run.refusals.items()):
                refusals.add_metric([*labels, str(code)], count)
            for node, value in sorted((run.epsilon or {}).items()):
                epsilon.add_metric([*labels, node], value)
        yield from (rounds, planned, finished, duration, replies, aggregated, failures, refusals)
        yield epsilon


def _buckets(values: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative bucket counts, `+Inf` last, as `HistogramMetricFamily` takes them."""
    limits = [*ROUND_SECONDS_BUCKETS, float("inf")]
    return [(_bound(limit), sum(v <= limit for v in values)) for limit in limits]


def _bound(limit: float) -> str:
    return "+Inf" if limit == float("inf") else str(limit)


def control_node_states(config: CoordinatorConfig) -> NodeStates:
    """Node states through the SuperLink's Control API (as `coordinator status` reads them)."""

    def states() -> dict[int, str]:
        from consortia.server.coordinator.control import Control
        from consortia.server.coordinator.enrollment import admin_target

        with Control(admin_target(config)) as control:
            return {view.node_id: view.status for view in control.list_nodes()}

    return states
