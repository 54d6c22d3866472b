"""Per-round latency of a deployed consortium on loopback: Flower's stock node vs consortia's.

Issue acceptance (item 8): on loopback, with TLS and node authentication,
the deployment engine's overhead per round (round time minus the nodes'
own work) is under 1 s, without a busy loop.

What runs, twice, each time a fresh consortium built by
`tests/consortium.py` (imported, not copied): `consortia coordinator start`
(TLS from `consortia provision`, node authentication, the gatekeeper), three
nodes with the breast-cancer records split in thirds (each its own
registered CSV dataset, ledger, audit log and enrolled key), and one job
through `consortia job submit --wait`: logreg, DP-SGD (target ε 1 over the
run), federated evaluation, `--rounds` rounds of `--local-epochs` epochs.
The two runs differ only in how the nodes are started:

* `stock`: `consortia node start --stock`, Flower's own node path:
  flower-supernode whose SuperExec starts one `flwr-clientapp` process per
  message (each imports torch, Flower and consortia and installs the FAB),
  3 s sleeps between empty pulls, 0.5 s between looks for the reply, 1 s
  first backoff on not-yet-stored objects;
* `consortia`: `consortia node start`, the node path of this repository:
  the launcher (waits capped at `poll_interval_s` = 0.2 s) and the
  long-lived ClientApp worker.

The coordinator is the same in both (consortia's ServerApp with its own
adaptive push/pull loop).

Figures, per round (from the job's `metrics.json` and the nodes' logs):

* `round`: `rounds[].seconds`, the coordinator's wall time from the end of
  one round to the end of the next (train exchange, aggregation, evaluate
  exchange, checkpoint);
* `node work`: the slowest node's train message plus the slowest node's
  evaluate message of that round, as the worker times its ClientApp call
  ("... message handled in X s" in the node log: the handler itself, from
  decoding the task to the reply, ledger commit included). Flower's stock
  path runs the same handler in a fresh process and cannot report it, so
  the stock run is charged the node work measured in the consortia run (same
  job, data and code; only the process around the handler differs);
* `overhead` = round − node work: what the deployment engine adds.

Round 1 includes each node's once-per-job noise calibration, so means are
given over rounds 2.. as well as over all rounds.

Per exchange (rounds 2.., median over nodes and exchanges), from the nodes'
log lines as they arrived: `coordinator` (from the last reply of the
previous exchange to this node's next message), `message in` (the SuperNode
pulls the weights), `node` (stored message to reply ready: ClientApp
process or worker, and the handler), `reply out` (the SuperNode pushes the
reply). And the CPU that idle polling costs (`--idle-s` seconds, % of one
core, the coordinator's and all nodes' process trees): right after the
nodes connect ("between jobs") and right after the job ("in a job": within
a minute of a node's last message, when consortia's nodes poll every
`poll_interval_s`).

Usage (from the repository root; about 5 minutes for the stock run and 2
for consortia's at 5 rounds on 2 cores)::

    python benchmarks/round_latency.py [--rounds 5] [--local-epochs 20] [--idle-s 20]
                                       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the consortium harness: tests/consortium.py

import numpy as np  # noqa: E402
from consortium import CLI, Consortium, run_id_of  # noqa: E402
from federation import add_site, descendants, write_job  # noqa: E402
from machine import format_machine_facts, machine_facts  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402

NODES = ("st-mary", "riverside", "northgate")
BUDGET = 100.0  # the nodes' ε budget: never the limit here
HANDLED = re.compile(
    r"consortia worker: \[RUN (?P<run>\d+), ROUND [^\]]*\] (?P<kind>\w+) message "
    r"handled in (?P<seconds>[0-9.]+) s"
)
MODES = ("stock", "consortia")
# The SuperNode's own lines for one exchange, after the stamp `_spawn_stamped` puts first.
_EVENT = re.compile(
    r"^(?P<t>[0-9.]+) .*?(?:Receiving: (?P<kind>\w+) message|Received successfully"
    r"|Sending: \w+ message|Sent successfully)",
    re.MULTILINE,
)


@dataclass
class ModeResult:
    """One mode's run: per round, the coordinator's wall time and (consortia) the node work."""

    mode: str
    round_s: list[float]
    train_s: list[float] = field(default_factory=list)  # slowest node's train message
    evaluate_s: list[float] = field(default_factory=list)  # slowest node's evaluate message
    accuracy: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # median seconds, rounds 2..
    # % of one core, nodes connected and no message: between jobs, and within a job's minute
    idle_cpu: dict[str, dict[str, float]] = field(default_factory=dict)

    def node_work(self) -> list[float]:
        return [t + e for t, e in zip(self.train_s, self.evaluate_s, strict=True)]


def run_mode(mode: str, root: Path, rounds: int, local_epochs: int, idle_s: float) -> ModeResult:
    """A fresh consortium, three nodes started in `mode`, one job; its figures."""
    root.mkdir(parents=True)
    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    order = np.random.default_rng(0).permutation(len(data.target))
    consortium = Consortium(root)
    node_tomls = {
        name: add_site(
            root / name,
            name,
            data.data[part],
            data.target[part],
            names,
            superlink_port=consortium.port,
            budget=BUDGET,
            policy=f"max_local_epochs = {local_epochs}\n",
            root_certificates=consortium.ca,
        )
        for name, part in zip(NODES, np.array_split(order, len(NODES)), strict=True)
    }
    stock = ["--stock"] if mode == "stock" else []
    readers: list[threading.Thread] = []
    try:
        consortium.start_coordinator()
        for name, node_toml in node_tomls.items():
            consortium.enroll(name, node_toml)
            command = [*CLI, "node", "start", "--node", str(node_toml), *stock]
            readers.append(_spawn_stamped(consortium, command, root / f"{name}.log"))
        _wait_connected(consortium, set(NODES))
        if mode == "consortia":  # its workers import torch and Flower once, at start: wait
            for name in NODES:
                _wait_for(root / f"{name}.log", "consortia worker: serving")
        coordinator, nodes = consortium.processes[0], consortium.processes[1:]
        idle: dict[str, dict[str, float]] = {}
        if idle_s > 0:
            idle["between jobs"] = _idle_cpu(coordinator, nodes, idle_s)
        job = write_job(
            root / "job.toml",
            1.0,
            name=f"latency-{mode}",
            min_nodes=len(NODES),
            rounds=rounds,
            evaluation="federated",
            model="logreg",
            local_epochs=local_epochs,
        )
        submitted = consortium.submit(job)
        if submitted.returncode != 0:
            raise SystemExit(f"{mode}: the job failed\n{submitted.stdout}\n{submitted.stderr}")
        run_id = run_id_of(submitted)
        if idle_s > 0:  # within a minute of the job's last message: the nodes' job-time polling
            idle["in a job"] = _idle_cpu(coordinator, nodes, min(idle_s, 40))
    finally:
        consortium.stop()
        for reader in readers:
            reader.join(timeout=10)
    metrics = json.loads((consortium.state / "runs" / f"run-{run_id}" / "metrics.json").read_text())
    for record in metrics["rounds"]:
        if sorted(record["participants"]) != sorted(NODES):
            raise SystemExit(f"{mode}: round {record['round']} did not have every node: {record}")
    result = ModeResult(
        mode,
        [float(r["seconds"]) for r in metrics["rounds"]],
        accuracy=metrics["final"]["accuracy"],
        phases=_phases({name: root / f"{name}.log" for name in NODES}, rounds),
        idle_cpu=idle,
    )
    if mode == "consortia":
        handled = {name: _handled(root / f"{name}.log", run_id) for name in NODES}
        for kind, slowest in (("train", result.train_s), ("evaluate", result.evaluate_s)):
            per_node = [handled[name][kind] for name in NODES]
            if any(len(times) != rounds for times in per_node):
                raise SystemExit(f"{mode}: expected {rounds} {kind} messages per node: {per_node}")
            slowest.extend(max(times) for times in zip(*per_node, strict=True))
    return result


def _spawn_stamped(consortium: Consortium, command: list[str], log: Path) -> threading.Thread:
    """Start a node as `Consortium.spawn` does, its output lines stamped with the time they came.

    The SuperNode's log lines carry no time; the stamps (monotonic seconds)
    give each exchange's phases. The process is ended by `consortium.stop()`.
    """
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=consortium.env,
        start_new_session=True,
    )
    consortium.processes.append(process)

    def stamp() -> None:
        assert process.stdout is not None
        with log.open("ab") as handle:
            for raw in process.stdout:
                handle.write(f"{time.monotonic():.3f} ".encode() + raw)
                handle.flush()

    reader = threading.Thread(target=stamp, daemon=True)
    reader.start()
    return reader


@dataclass
class _Exchange:
    """One message through one node, as its SuperNode logs it (monotonic seconds)."""

    kind: str
    receiving: float
    times: list[float] = field(default_factory=list)  # received, sending, sent


def _exchanges(log: Path) -> list[_Exchange]:
    exchanges: list[_Exchange] = []
    for match in _EVENT.finditer(log.read_text(errors="replace")):
        at = float(match["t"])
        if match["kind"]:
            exchanges.append(_Exchange(match["kind"], at))
        elif exchanges and len(exchanges[-1].times) < 3:
            exchanges[-1].times.append(at)
    return exchanges


def _phases(logs: dict[str, Path], rounds: int) -> dict[str, float]:
    """Median seconds of each phase of the train and evaluate exchanges of rounds 2..

    `coordinator`: from the last node's reply of the previous exchange to
    this node's next message (the coordinator pulls the replies, aggregates,
    checkpoints, pushes; the node's idle pull finds the message); `message in`:
    the SuperNode pulls the message's objects; `node`: from stored message to
    reply ready (the ClientApp process, or the worker, and the handler);
    `reply out`: the SuperNode pushes the reply and its objects.
    """
    per_node = {name: _exchanges(log) for name, log in logs.items()}
    expected = 1 + 2 * rounds  # the roster query, then train and evaluate per round
    if any(len(exchanges) != expected for exchanges in per_node.values()):
        counts = {name: len(exchanges) for name, exchanges in per_node.items()}
        raise SystemExit(f"expected {expected} exchanges per node in the logs, found {counts}")
    phases: dict[str, list[float]] = {
        "coordinator": [],
        "message in": [],
        "node": [],
        "reply out": [],
    }
    for k in range(3, expected):  # rounds 2..: exchanges 3, 4, ... (0 is the query)
        previous_sent = max(exchanges[k - 1].times[2] for exchanges in per_node.values())
        for exchanges in per_node.values():
            exchange = exchanges[k]
            received, sending, sent = exchange.times
            phases["coordinator"].append(exchange.receiving - previous_sent)
            phases["message in"].append(received - exchange.receiving)
            phases["node"].append(sending - received)
            phases["reply out"].append(sent - sending)
    return {name: statistics.median(values) for name, values in phases.items()}


def _idle_cpu(
    coordinator: subprocess.Popen[bytes], nodes: list[subprocess.Popen[bytes]], seconds: float
) -> dict[str, float]:
    """CPU (% of one core) of the coordinator's and the nodes' process trees while no message.

    What idle polling costs: each empty pull of a SuperNode is an authenticated
    request the SuperLink serves.
    """
    time.sleep(5)  # past the connection's (or the job's) own work
    trees = {
        "coordinator": {coordinator.pid, *descendants([coordinator.pid])},
        "nodes": {pid for node in nodes for pid in (node.pid, *descendants([node.pid]))},
    }
    before = {role: _cpu_seconds(pids) for role, pids in trees.items()}
    time.sleep(seconds)
    return {
        role: 100 * (_cpu_seconds(pids) - before[role]) / seconds for role, pids in trees.items()
    }


def _cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds of `pids` so far (from /proc; a process gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _wait_for(log: Path, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise SystemExit(f"{log}: no {text!r} within {timeout:.0f} s")
        time.sleep(0.5)


def _wait_connected(consortium: Consortium, names: set[str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = consortium.audit_events() if consortium.audit_log.exists() else []
        connected = {e["details"].get("node") for e in events if e["event"] == "node.connected"}
        if names <= connected:
            return
        time.sleep(0.5)
    raise SystemExit(f"nodes did not connect within {timeout:.0f} s; logs under {consortium.root}")


def _handled(log: Path, run_id: int) -> dict[str, list[float]]:
    """The worker's handler times of run `run_id`, by message type, in order (= by round)."""
    times: dict[str, list[float]] = {"train": [], "evaluate": [], "query": []}
    for match in HANDLED.finditer(log.read_text(errors="replace")):
        if int(match["run"]) == run_id:
            times.setdefault(match["kind"], []).append(float(match["seconds"]))
    return times


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def report(results: dict[str, ModeResult]) -> dict[str, dict[str, float]]:
    """Print the per-round table and the summary; the summary as numbers."""
    work = results["consortia"].node_work()
    print("\nper round (s):")
    print(f"{'round':>5} {'stock':>8} {'consortia':>10} {'node work':>10} {'of which train':>15}")
    for i, (before, after) in enumerate(
        zip(results["stock"].round_s, results["consortia"].round_s, strict=True)
    ):
        train = results["consortia"].train_s[i]
        print(f"{i + 1:>5} {before:>8.2f} {after:>10.2f} {work[i]:>10.2f} {train:>15.2f}")
    summary: dict[str, dict[str, float]] = {}
    print(
        f"\n{'mean over':<12} {'mode':<10} {'round':>7} {'node work':>10} {'train':>7} "
        f"{'overhead':>9}"
    )
    for label, first in (("rounds 1..", 0), ("rounds 2..", 1)):
        for mode in MODES:
            rounds = results[mode].round_s[first:]
            works = work[first:]
            overhead = [r - w for r, w in zip(rounds, works, strict=True)]
            row = {
                "round_s": _mean(rounds),
                "node_work_s": _mean(works),
                "train_s": _mean(results["consortia"].train_s[first:]),
                "overhead_s": _mean(overhead),
            }
            summary[f"{mode} {label}"] = row
            print(
                f"{label:<12} {mode:<10} {row['round_s']:>7.2f} {row['node_work_s']:>10.2f} "
                f"{row['train_s']:>7.2f} {row['overhead_s']:>9.2f}"
            )
    print("\nper exchange, rounds 2.. (median over nodes and exchanges, s):")
    names = list(results["consortia"].phases)
    print(f"{'mode':<10} " + " ".join(f"{name:>12}" for name in names))
    for mode in MODES:
        phases = results[mode].phases
        print(f"{mode:<10} " + " ".join(f"{phases[name]:>12.2f}" for name in names))
        summary[f"{mode} phases"] = phases
    if results["consortia"].idle_cpu:
        print("\nidle (no message): CPU, % of one core")
        for mode in MODES:
            for state, idle in results[mode].idle_cpu.items():
                summary[f"{mode} idle cpu % {state}"] = idle
                cells = "  ".join(f"{role} {value:5.1f}" for role, value in idle.items())
                print(f"{mode:<10} {state:<13} {cells}")
    for label in ("rounds 1..", "rounds 2.."):
        before = summary[f"stock {label}"]["overhead_s"]
        after = summary[f"consortia {label}"]["overhead_s"]
        print(f"overhead, {label}: stock / consortia = {before / after:.1f}x")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=20)
    parser.add_argument(
        "--idle-s", type=float, default=20, help="seconds of idle CPU measured (0: skip)"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the consortia run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    print(format_machine_facts(machine_facts()))
    base = Path(tempfile.mkdtemp(prefix="round-latency-", dir=args.dir))
    print(f"consortia under {base}; {args.rounds} rounds, {args.local_epochs} local epochs")
    results: dict[str, ModeResult] = {}
    for mode in MODES:
        started = time.monotonic()
        results[mode] = run_mode(mode, base / mode, args.rounds, args.local_epochs, args.idle_s)
        print(
            f"{mode}: {time.monotonic() - started:.0f} s in all, "
            f"final accuracy {results[mode].accuracy:.3f}"
        )
    summary = report(results)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine_facts(),
                    "rounds": args.rounds,
                    "local_epochs": args.local_epochs,
                    "results": {mode: asdict(result) for mode, result in results.items()},
                    "summary": summary,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
