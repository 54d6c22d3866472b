"""A node's Prometheus figures, read from its own durable files at every scrape.

Served by `consortia node start` (the supervisor, which never loads torch)
when node.toml has a `[metrics]` block, on 127.0.0.1 by default
(`consortia.common.metrics_http`). Three sources, all in the state folder:

- the privacy ledger: per registered dataset its ε budget, ε spent (composed
  over every release of every job), ε left and its releases;
- the audit log: every refusal the node sent (`node.refusal`), by code;
- worker-metrics.json, which the ClientApp worker rewrites after every
  message (client/worker_metrics.py): messages handled by type and outcome,
  the training time of each round, the device torch trains on.

Series: `consortia_node_epsilon_budget{dataset}`, `..._epsilon_spent{dataset}`,
`..._epsilon_remaining{dataset}`, `..._releases_total{dataset}`,
`..._refusals_total{code}` (`RefusalCode`; codes appear once non-zero),
`..._messages_total{type,outcome}`, `..._round_training_seconds` (summary:
`_sum` the time on train messages, `_count` the rounds trained),
`..._last_round_training_seconds`, `..._device_info{device,name}`, `..._info`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from consortia.client.ledger import LedgerError, PrivacyLedger, ledger_path
from consortia.client.node_audit import audit_path
from consortia.client.node_config import NodeConfig
from consortia.client.worker_metrics import read_worker_metrics
from consortia.common.audit import parse_line
from consortia.common.protocol import RefusalCode
from consortia.common.versions import installed_versions

PREFIX = "consortia_node"
REFUSAL_EVENT = "node.refusal"


class RefusalTally:
    """Refusals in the audit log by code, reading only what was appended since the last look.

    The log only grows (appends; a torn tail is cut before the next append,
    after the last complete line read here). A file that shrank or was
    replaced is read again from its start.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._counts: dict[RefusalCode, int] = {}
        self._lock = threading.Lock()

    def counts(self) -> dict[RefusalCode, int]:
        with self._lock:
            try:
                with self.path.open("rb") as handle:
                    stat = os.fstat(handle.fileno())
                    if (stat.st_dev, stat.st_ino) != self._identity or stat.st_size < self._offset:
                        self._identity, self._offset, self._counts = (
                            (stat.st_dev, stat.st_ino),
                            0,
                            {},
                        )
                    handle.seek(self._offset)
                    tail = handle.read()
            except OSError:
                return dict(self._counts)
            complete = tail[: tail.rfind(b"\n") + 1]
            self._offset += len(complete)
            for line in complete.splitlines():
                self._count(line)
            return dict(self._counts)

    def _count(self, line: bytes) -> None:
        try:
            entry = parse_line(line)
        except ValueError:
            return  # `consortia audit verify` names a damaged line; a scrape counts the rest
        if entry.event != REFUSAL_EVENT:
            return
        try:
            code = RefusalCode(str(entry.details.get("code")))
        except ValueError:
            code = RefusalCode.UNKNOWN
        self._counts[code] = self._counts.get(code, 0) + 1


class NodeCollector:
    """A `prometheus_client` collector over one node's state folder."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.refusals = RefusalTally(audit_path(config.state_dir))
        versions = installed_versions()
        self._info = {
            "node": config.name,
            "version": versions.consortia or "",
            "flower_version": versions.flwr or "",
        }

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily(PREFIX, "This node and its software.")
        info.add_metric([], self._info)
        yield info
        yield from self._budgets()
        refusals = CounterMetricFamily(
            f"{PREFIX}_refusals", "Messages this node refused, by code.", labels=["code"]
        )
        for code, count in sorted(self.refusals.counts().items()):
            refusals.add_metric([str(code)], count)
        yield refusals
        yield from self._worker()

    def _budgets(self) -> Iterator[Metric]:
        labels = ["dataset"]
        budget = GaugeMetricFamily(
            f"{PREFIX}_epsilon_budget", "The dataset's total ε budget.", labels=labels
        )
        spent = GaugeMetricFamily(
            f"{PREFIX}_epsilon_spent",
            "ε spent on the dataset, composed over every release of every job.",
            labels=labels,
        )
        remaining = GaugeMetricFamily(
            f"{PREFIX}_epsilon_remaining", "ε the dataset has left.", labels=labels
        )
        releases = CounterMetricFamily(
            f"{PREFIX}_releases", "DP releases recorded for the dataset.", labels=labels
        )
        path = ledger_path(self.config.state_dir)
        if path.is_file():  # opening a missing ledger would create one
            try:
                with PrivacyLedger(path) as ledger:
                    datasets = ledger.datasets()
            except LedgerError:
                datasets = []
            for dataset in datasets:
                budget.add_metric([dataset.name], dataset.epsilon_budget)
                spent.add_metric([dataset.name], dataset.epsilon_spent)
                remaining.add_metric([dataset.name], dataset.epsilon_remaining)
                releases.add_metric([dataset.name], dataset.releases)
        yield from (budget, spent, remaining, releases)

    def _worker(self) -> Iterator[Metric]:
        figures = read_worker_metrics(self.config.worker_metrics_file)
        if figures is None:
            return
        messages = CounterMetricFamily(
            f"{PREFIX}_messages",
            "Messages the ClientApp worker handled, by type and outcome (Flower's sub-status).",
            labels=["type", "outcome"],
        )
        for kind, outcomes in sorted(figures.messages.items()):
            for outcome, count in sorted(outcomes.items()):
                messages.add_metric([str(kind), outcome], count)
        yield messages
        yield SummaryMetricFamily(
            f"{PREFIX}_round_training_seconds",
            "Time spent on a round's train messages (count: rounds trained).",
            count_value=figures.training_rounds,
            sum_value=figures.training_seconds,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_last_round_training_seconds",
            "Time spent on the train messages of the last round trained.",
            value=figures.last_round_seconds,
        )
        if figures.device:
            device = InfoMetricFamily(
                f"{PREFIX}_device", "The device jobs with training.device 'auto' train on."
            )
            device.add_metric([], {"device": figures.device, "name": figures.device_name})
            yield device
