"""What the privacy ledger adds to a round of a default-scenario node, against the round itself.

Issue acceptance: the per-round overhead of the ledger, fsync included, is
under 2% of a local round on the default scenario (`hospitals-breast-cancer`:
5 nodes, `logreg`, breast-cancer records, DP-SGD with calibrated noise).

The node (`--node`, default `st-mary`, partition 0) gets its real partition
(`simulated_node_data`) and the scenario's job; its noise multiplier is
calibrated once, as the node does once per job (timed and printed apart: it
is not a per-round cost).

**What "a local round" includes** (the denominators), each timed here:

* `train`: `train_locally` alone on the node's train split, one torch thread
  as the handler sets: the DP-SGD work (Poisson sampling, clipping, noise,
  steps). The model is built and the global weights loaded outside the timer.
* `handler (simulation)`: the ClientApp `train` handler called in-process
  with a real Flower `Message`, as `tests/test_client_app.py` does: decode the
  task, find the node's data, admit (calibrated noise from the `Context`),
  build the model, load the global weights, train, record the release in the
  job's `Context`, serialise the update into the reply. This is the local
  round of `consortia simulate`; it holds no ledger, and each job of
  `rounds` rounds starts from a `Context` whose noise is already calibrated.
* `handler (deployed)`: the same handler on a deployed node (a `node.toml`,
  the node's partition registered as an npz dataset and re-split by the
  registry, a policy with a large ε budget): it also re-reads and
  re-fingerprints the registered file, opens the SQLite ledger, admits under
  the policy and records the release durably. Its ledger is included.
* `process start`: a fresh interpreter importing `consortia.client.app`.
  Flower 1.41's SuperNode (subprocess isolation, the default) launches one
  `flwr-clientapp` process per message, so a deployed round costs at least
  this plus `handler (deployed)` (transport, FAB unpacking and polling not
  counted). Timed `--process-starts` times, spread over the run. The ratio
  against `process start + handler (deployed)` is what a deployed node pays
  (a slight overestimate: the per-message ledger is counted on top, though
  the handler's time already holds most of it).

**What the ledger does per round** (the numerators), on a real SQLite file in
a temporary folder (`--dir` to choose), for each history size of
`--histories` (prior releases, built with `ledger_cost.build_history`):

* `ledger, warm`: `LedgerAccount.admit` (policy checks, calibrated noise from
  the Context, ε spent, projected ε of the round) + `LedgerAccount.record`
  (`record_release`: one transaction, committed with fsync) on an open ledger
  whose RDP curve is cached: a long-lived node process.
* `ledger, per message`: what the deployed handler does in a fresh
  process: `LedgerAccount.admit` and then `.record`, each of which opens the
  ledger (connection, pragmas, SQLite's `quick_check`, which reads the whole
  file, schema check, the dataset's budget: a no-op write), works and closes
  it. The in-process RDP-curve cache is cleared before each call and
  refilled after it, outside the timer, so the curve comes from the ledger
  file's `step_curves` table, as in a new process. (Without that table,
  Opacus' `compute_rdp` for q < 1 cost ~0.5 s a message on `hillcrest`.)
  Closing a WAL database as its last connection checkpoints it (more fsyncs).

Also, for attribution: a one-row SQLite commit with `synchronous=FULL` and
with `synchronous=OFF` (their difference is the fsync) and a raw `os.fsync`
(`ledger_cost.commit_probe`, `ledger_cost.fsync_probe`).

Every probe runs once per repetition, in an order rotated each repetition
(interleaved, so load drifts hit all probes alike); medians over
`--repeats` repetitions. Ratios are ratios of medians, and the median of the
ratios taken within each repetition. Prints machine facts, load averages,
the figures and the ratios.

    python benchmarks/ledger_overhead.py [--node st-mary] [--repeats 200]
        [--histories 0,100,10000] [--process-starts 5] [--dir DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from ledger_cost import (
    DELTA,
    RDP_DATASET,
    build_history,
    commit_probe,
    filesystem_of,
    fsync_probe,
)
from machine import format_machine_facts, machine_facts

from consortia.client import training
from consortia.client.app import app as deployed_app
from consortia.client.ledger import PrivacyLedger, ledger_path
from consortia.client.node_config import NODE_CONFIG_KEY, load_node_config
from consortia.client.onboarding.registry import DatasetRegistry
from consortia.client.policy import NodePolicy
from consortia.client.privacy_state import JobPrivacyState, save_state
from consortia.client.spend import (
    LedgerAccount,
    admit_under_policy,
    other_releases,
    planned_noise,
    planned_release,
    register_budget,
)
from consortia.common import protocol as p
from consortia.common.arrays import concat
from consortia.common.config import JobConfig, ScenarioConfig
from consortia.common.config_io import load_scenario
from consortia.common.models import architecture_hash, build_model
from consortia.common.privacy import Release, rdp_per_step
from consortia.common.weights import load_arrays, model_to_arrays
from consortia.simulations.node_data import NodeData, simulated_node_data
from consortia.simulations.virtual_node import virtual_node_app

DATASET = "bench"  # the deployed node's registered dataset
ACCEPTANCE = 0.02  # the bound: ledger ≤ 2% of a local round
BIG_BUDGET = 1e12  # ledger_cost.build_history registers its dataset with this budget
CPU = torch.device("cpu")

Probe = Callable[[], dict[str, float]]
"""One timed call; returns milliseconds by part, always with a 'total'."""


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def summary(samples: list[float]) -> dict[str, float]:
    """Median, p10, p90, mean, best, worst of `samples` (ms)."""
    ordered = sorted(samples)
    last = len(ordered) - 1
    return {
        "median_ms": statistics.median(ordered),
        "p10_ms": ordered[int(0.1 * last)],
        "p90_ms": ordered[int(0.9 * last)],
        "mean_ms": statistics.fmean(ordered),
        "best_ms": ordered[0],
        "max_ms": ordered[-1],
        "n": float(len(ordered)),
    }


# ------------------------------------------------------------------ the node


@dataclass
class BenchNode:
    """One default-scenario node: its data, the job, its calibrated mechanism."""

    name: str
    partition_id: int
    scenario: ScenarioConfig
    job: JobConfig
    data: NodeData
    noise_multiplier: float
    calibration_ms: float
    global_arrays: ArrayRecord
    architecture: str
    release: Release = field(init=False)

    def __post_init__(self) -> None:
        self.release = planned_release(self.job, len(self.data.train), self.noise_multiplier)

    @property
    def dp(self) -> training.DpSettings:
        return training.DpSettings(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.job.privacy.max_grad_norm,
        )

    def fresh_model(self) -> torch.nn.Module:
        """The job's model holding the global weights, as the handler builds it."""
        model = build_model(
            self.job.model, self.data.feature_shape, self.data.num_classes, self.job.seed
        )
        load_arrays(model, self.global_arrays)
        return model


def default_node(name: str) -> BenchNode:
    scenario = load_scenario(None, {}).config
    sim = scenario.simulation
    names = [sim.node_name(i) for i in range(sim.nodes)]
    if name not in names:
        raise SystemExit(f"--node: {name!r} is not a node of {scenario.name} ({names})")
    partition_id = names.index(name)
    data = simulated_node_data(sim, scenario.seed, partition_id)
    job = scenario.job()
    start = time.perf_counter()
    sigma = _calibrate(job, len(data.train))
    calibration_ms = _ms(start)
    model = build_model(job.model, data.feature_shape, data.num_classes, job.seed)
    return BenchNode(
        name=name,
        partition_id=partition_id,
        scenario=scenario,
        job=job,
        data=data,
        noise_multiplier=sigma,
        calibration_ms=calibration_ms,
        global_arrays=model_to_arrays(model),
        architecture=architecture_hash(model),
    )


def calibrated_context(sigma: float, node_config: dict[str, Any]) -> Context:
    """A node's Context at the start of a job whose noise is already calibrated."""
    context = Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
    )
    save_state(context, JobPrivacyState(noise_multiplier=sigma))
    return context


def train_message(node: BenchNode, task: str, server_round: int) -> Message:
    config = ConfigRecord({p.TASK_KEY: task, p.ROUND_KEY: server_round})
    content = RecordDict({p.ARRAYS_KEY: node.global_arrays, p.CONFIG_KEY: config})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def deploy(node: BenchNode, folder: Path) -> tuple[Path, JobConfig, float]:
    """The node as deployed: node.toml, its partition registered as an npz dataset.

    Returns node.toml, the job naming the dataset, and the noise the deployed
    node calibrates for the registry's train split.
    """
    site = folder / "deployed-node"
    site.mkdir(parents=True)
    records = concat([node.data.train, node.data.test])
    np.savez(site / "records.npz", x=records.x, y=records.y)
    test_fraction = node.scenario.simulation.data.test_fraction
    (site / "dataset.toml").write_text(
        f'num_classes = {node.data.num_classes}\n\n[source]\nformat = "npz"\n'
        f'path = "records.npz"\n\n[split]\ntest_fraction = {test_fraction}\n',
        encoding="utf-8",
    )
    node_toml = site / "node.toml"
    node_toml.write_text(
        f'name = "{node.name}"\nstate_dir = "state"\nserve = ["{DATASET}"]\n\n'
        f"[policy]\nepsilon_budget = {BIG_BUDGET}\ndelta = {node.job.privacy.delta}\n",
        encoding="utf-8",
    )
    registry = DatasetRegistry(load_node_config(node_toml).state_dir)
    registry.add(DATASET, site / "dataset.toml")
    job = node.job.model_copy(update={"dataset": DATASET})
    sigma = _calibrate(job, len(registry.load(DATASET).train))
    return node_toml, job, sigma


def _calibrate(job: JobConfig, num_records: int) -> float:
    """The job's noise multiplier, as a node calibrates it once per job."""
    return planned_noise(
        job, num_records, JobPrivacyState(), job.privacy.accountant, other_releases(job)
    )


# ------------------------------------------------------------------ probes


def train_probe(node: BenchNode) -> Probe:
    seeds = iter(range(10**9))

    def probe() -> dict[str, float]:
        model = node.fresh_model()
        seed = next(seeds)
        start = time.perf_counter()
        training.train_locally(
            model, node.data.train, node.job.training, node.dp, seed=seed, device=CPU
        )
        return {"total": _ms(start)}

    return probe


def handler_probe(node: BenchNode, task: str, sigma: float, node_config: dict[str, Any]) -> Probe:
    """The ClientApp train handler; a new job (Context) every `rounds` rounds."""
    rounds = node.job.rounds
    calls = iter(range(10**9))
    context = calibrated_context(sigma, node_config)

    def probe() -> dict[str, float]:
        nonlocal context
        server_round = next(calls) % rounds + 1
        if server_round == 1:
            context = calibrated_context(sigma, node_config)
        message = train_message(node, task, server_round)
        start = time.perf_counter()
        app = deployed_app if NODE_CONFIG_KEY in node_config else virtual_node_app
        reply = app(message, context)
        elapsed = _ms(start)
        if reply.has_error() or p.METRICS_KEY not in reply.content:
            raise SystemExit(f"the train handler did not train: {reply.content or reply.error}")
        return {"total": elapsed}

    return probe


def warm_ledger_probe(node: BenchNode, path: Path) -> tuple[Probe, Callable[[], None]]:
    """admit + record on a ledger kept open, curve cached (a long-lived node); and its closer."""
    policy = NodePolicy(epsilon_budget=BIG_BUDGET, delta=DELTA)
    ledger = PrivacyLedger(path)
    register_budget(ledger, RDP_DATASET, policy)
    state = JobPrivacyState(noise_multiplier=node.noise_multiplier)
    rounds = iter(range(1, 10**9))
    n = len(node.data.train)

    def probe() -> dict[str, float]:
        start = time.perf_counter()
        admit_under_policy(node.job, n, node.architecture, policy, ledger, RDP_DATASET, state)
        admitted = time.perf_counter()
        ledger.record_release(RDP_DATASET, node.release, run_id="bench", server_round=next(rounds))
        end = time.perf_counter()
        return {
            "total": (end - start) * 1e3,
            "admit": (admitted - start) * 1e3,
            "record": (end - admitted) * 1e3,
        }

    return probe, ledger.close


def message_ledger_probe(node: BenchNode, path: Path) -> Probe:
    """What the deployed handler does in a fresh process: `LedgerAccount` admit, then record.

    Each opens the file (pragmas, `quick_check`, schema, budget), works, and closes it.
    """
    policy = NodePolicy(epsilon_budget=BIG_BUDGET, delta=DELTA)
    rounds = iter(range(1, 10**9))
    n = len(node.data.train)
    release = node.release

    def probe() -> dict[str, float]:
        context = calibrated_context(node.noise_multiplier, {})
        rdp_per_step.cache_clear()  # a new process has computed no curve yet
        start = time.perf_counter()
        account = LedgerAccount(context, path, RDP_DATASET, policy)
        account.admit(node.job, n, node.architecture)
        admitted = time.perf_counter()
        account.record(release, next(rounds))
        end = time.perf_counter()
        rdp_per_step(release.noise_multiplier, release.sample_rate)  # warm again, untimed
        return {
            "total": (end - start) * 1e3,
            "admit (open, cold curve, close)": (admitted - start) * 1e3,
            "record (open, commit, close)": (end - admitted) * 1e3,
        }

    return probe


def reused_probe(measure: Callable[[Path, int], dict[str, float]], folder: Path) -> Probe:
    """One timed call of a `ledger_cost` probe (after its own warm-up)."""
    return lambda: {"total": measure(folder, 1)["median_ms"]}


def process_start_ms() -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import consortia.client.app"],
        check=True,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    return _ms(start)


# ------------------------------------------------------------------ the run


def run_interleaved(
    probes: dict[str, Probe], repeats: int, process_starts: int
) -> tuple[dict[str, dict[str, list[float]]], list[float]]:
    """Every probe once per repetition, rotated; process starts spread over the run."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in probes}
    names = list(probes)
    for name in names:  # warm-up: imports, first-use caches, SQLite pages
        probes[name]()
    starts_at = set(np.linspace(0, repeats - 1, process_starts, dtype=int).tolist())
    starts: list[float] = []
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            for part, value in probes[name]().items():
                samples[name].setdefault(part, []).append(value)
        if rep in starts_at:
            starts.append(process_start_ms())
        if (rep + 1) % max(1, repeats // 10) == 0:
            print(f"  {rep + 1}/{repeats} repetitions", flush=True)
    return samples, starts


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def build_ledgers(
    folder: Path, histories: list[int]
) -> tuple[dict[int, Path], dict[int, Path], dict[str, Any]]:
    """Two ledgers per history size (warm and per-message probes), built by build_history."""
    warm, message = {}, {}
    built: dict[str, Any] = {}
    for size in histories:
        for kind, paths in (("warm", warm), ("message", message)):
            sub = folder / f"{kind}-{size}"
            sub.mkdir()
            paths[size] = ledger_path(sub)
            start = time.perf_counter()
            with PrivacyLedger(paths[size]) as ledger:
                build_history(ledger, size, random.Random(size))
                spent = ledger.spent(RDP_DATASET)
            built[f"{kind}-{size}"] = {"seconds": time.perf_counter() - start, "epsilon": spent}
        print(f"  history of {size} releases built", flush=True)
    return warm, message, built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", default="st-mary", help="a node of the default scenario")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--histories", default="0,100,10000", help="prior releases, comma list")
    parser.add_argument("--process-starts", type=int, default=5, help="0 leaves them out")
    parser.add_argument("--dir", type=Path, default=None, help="folder for ledgers and node")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()
    histories = [int(h) for h in args.histories.split(",") if h.strip()]
    warnings.filterwarnings("ignore", message="Optimal order is the")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    torch.set_num_threads(1)  # what the train handler sets on CPU
    # Messages are created inside a Flower task; stand in for the coordinator's one.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    owned = args.dir is None
    folder = Path(tempfile.mkdtemp(prefix="consortia-ledger-overhead-")) if owned else args.dir
    folder.mkdir(parents=True, exist_ok=True)
    closers: list[Callable[[], None]] = []
    try:
        node = default_node(args.node)
        facts = machine_facts()
        facts["ledger folder"] = str(folder)
        facts["filesystem"] = filesystem_of(folder)
        facts["sqlite"] = sqlite3.sqlite_version
        print(format_machine_facts(facts))
        load_before = os.getloadavg()
        describe_node(node)

        node_toml, deployed_job, deployed_sigma = deploy(node, folder)
        sim_task = p.TaskSpec(job=node.job, simulation=node.scenario.simulation).encode()
        deployed_task = p.TaskSpec(job=deployed_job).encode()
        print("building ledger histories ...", flush=True)
        warm_paths, message_paths, built = build_ledgers(folder, histories)

        probes: dict[str, Probe] = {
            "train": train_probe(node),
            "handler (simulation)": handler_probe(
                node,
                sim_task,
                node.noise_multiplier,
                {"partition-id": node.partition_id, "num-partitions": 5},
            ),
            "handler (deployed)": handler_probe(
                node, deployed_task, deployed_sigma, {NODE_CONFIG_KEY: str(node_toml)}
            ),
        }
        for size in histories:
            probe, close = warm_ledger_probe(node, warm_paths[size])
            closers.append(close)
            probes[f"ledger, warm, {size} prior"] = probe
            probes[f"ledger, per message, {size} prior"] = message_ledger_probe(
                node, message_paths[size]
            )
        probes["commit, synchronous=FULL"] = reused_probe(
            lambda f, c: commit_probe(f, "FULL", c), folder
        )
        probes["commit, synchronous=OFF"] = reused_probe(
            lambda f, c: commit_probe(f, "OFF", c), folder
        )
        probes["os.fsync 4 KiB"] = reused_probe(fsync_probe, folder)

        print(f"timing {len(probes)} probes × {args.repeats} repetitions, interleaved ...")
        samples, starts = run_interleaved(probes, args.repeats, args.process_starts)
    finally:
        for close in closers:
            close()
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
    load_after = os.getloadavg()

    figures = {
        name: {part: summary(v) for part, v in parts.items()} for name, parts in samples.items()
    }
    if starts:
        figures["process start"] = {"total": summary(starts)}
    ratios = overhead_ratios(samples, histories, starts)
    print_figures(figures, ratios, load_before, load_after)
    print_verdict(figures, ratios, histories)
    if args.json is not None:
        report = {
            "machine": facts,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "node": node_facts(node),
            "histories_built": built,
            "figures": figures,
            "ratios": ratios,
            "acceptance": ACCEPTANCE,
            "repeats": args.repeats,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


# ------------------------------------------------------------------ reporting


def node_facts(node: BenchNode) -> dict[str, Any]:
    return {
        "scenario": node.scenario.name,
        "node": node.name,
        "train_records": len(node.data.train),
        "test_records": len(node.data.test),
        "feature_shape": list(node.data.feature_shape),
        "num_classes": node.data.num_classes,
        "model": node.job.model.name,
        "batch_size": node.job.training.batch_size,
        "noise_multiplier": node.noise_multiplier,
        "sample_rate": node.release.sample_rate,
        "steps_per_round": node.release.steps,
        "calibration_ms_once_per_job": node.calibration_ms,
    }


def describe_node(node: BenchNode) -> None:
    facts = node_facts(node)
    print(
        f"\nnode {facts['node']} of {facts['scenario']}: {facts['train_records']} train / "
        f"{facts['test_records']} test records, features {tuple(facts['feature_shape'])}, "
        f"{facts['num_classes']} classes, {facts['model']}, batch {facts['batch_size']}\n"
        f"calibrated σ = {facts['noise_multiplier']:.4g} (once per job: "
        f"{facts['calibration_ms_once_per_job']:.1f} ms), q = {facts['sample_rate']:.4g}, "
        f"{facts['steps_per_round']} DP-SGD step(s) a round\n",
        flush=True,
    )


def _denominators(
    samples: dict[str, dict[str, list[float]]], starts: list[float]
) -> dict[str, float]:
    medians = {
        "train": statistics.median(samples["train"]["total"]),
        "handler (simulation)": statistics.median(samples["handler (simulation)"]["total"]),
        "handler (deployed)": statistics.median(samples["handler (deployed)"]["total"]),
    }
    if starts:
        medians["process start + handler (deployed)"] = (
            statistics.median(starts) + medians["handler (deployed)"]
        )
    return medians


def overhead_ratios(
    samples: dict[str, dict[str, list[float]]], histories: list[int], starts: list[float]
) -> dict[str, dict[str, dict[str, float]]]:
    """ledger ÷ round, per ledger probe and per definition of the round."""
    denominators = _denominators(samples, starts)
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for size in histories:
        for kind in ("warm", "per message"):
            name = f"ledger, {kind}, {size} prior"
            ledger = samples[name]["total"]
            ratios[name] = {}
            for label, median in denominators.items():
                entry = {"of_medians": statistics.median(ledger) / median}
                if label in samples:
                    entry["paired_median"] = paired_ratio(ledger, samples[label]["total"])
                ratios[name][label] = entry
    return ratios


def print_figures(
    figures: dict[str, dict[str, dict[str, float]]],
    ratios: dict[str, dict[str, dict[str, float]]],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    print(
        f"\nload average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after {', '.join(f'{x:.2f}' for x in load_after)}\n"
    )
    rows = [
        (name if part == "total" else f"  {part}", stats)
        for name, parts in figures.items()
        for part, stats in sorted(parts.items(), key=lambda item: item[0] != "total")
    ]
    width = max(len(label) for label, _ in rows)
    columns = ("median", "p10", "p90", "mean", "best")
    print(f"{'':<{width}}" + "".join(f"  {c + ' ms':>10}" for c in columns) + "      n")
    for label, stats in rows:
        cells = "".join(f"  {stats[c + '_ms']:>10.3f}" for c in columns)
        print(f"{label:<{width}}{cells}  {stats['n']:>5.0f}")

    labels = list(next(iter(ratios.values())))
    print("\nledger ÷ round (ratio of medians; in brackets: median of per-repetition ratios)")
    head = f"{'':<{width}}" + "".join(f"  {label:>24}" for label in labels)
    print(head)
    for name, by_label in ratios.items():
        cells = ""
        for label in labels:
            entry = by_label[label]
            text = f"{entry['of_medians']:.1%}"
            if "paired_median" in entry:
                text += f" [{entry['paired_median']:.1%}]"
            cells += f"  {text:>24}"
        print(f"{name:<{width}}{cells}")


def print_verdict(
    figures: dict[str, dict[str, dict[str, float]]],
    ratios: dict[str, dict[str, dict[str, float]]],
    histories: list[int],
) -> None:
    print(
        f"\nagainst the acceptance bound (ledger ≤ {ACCEPTANCE:.0%} of a local round), worst "
        "history size:"
    )
    for kind in ("warm", "per message"):
        names = [f"ledger, {kind}, {size} prior" for size in histories]
        for label in ratios[names[0]]:
            ratio = max(ratios[name][label]["of_medians"] for name in names)
            verdict = (
                "within" if ratio <= ACCEPTANCE else f"OVER, {ratio / ACCEPTANCE:.1f}× the bound"
            )
            print(f"  ledger {kind} ÷ {label}: {ratio:.2%} ({verdict})")
    size = histories[-1]
    full = figures["commit, synchronous=FULL"]["total"]["median_ms"]
    off = figures["commit, synchronous=OFF"]["total"]["median_ms"]
    print(
        f"\nwhere the ledger's time goes, {size} prior releases (each part's median, as a "
        "share of the total's median; they need not add up to 100%):"
    )
    for kind in ("warm", "per message"):
        parts = figures[f"ledger, {kind}, {size} prior"]
        total = parts["total"]["median_ms"]
        shares = sorted(
            ((part, stats["median_ms"]) for part, stats in parts.items() if part != "total"),
            key=lambda item: -item[1],
        )
        listed = ", ".join(f"{part} {ms:.3f} ms ({ms / total:.0%})" for part, ms in shares)
        print(f"  {kind}: {total:.3f} ms = {listed}")
    print(
        f"  one fsync'd commit: {full:.3f} ms with synchronous=FULL, {off:.3f} ms with OFF: "
        f"the fsync ≈ {full - off:.3f} ms"
    )


if __name__ == "__main__":
    main()
