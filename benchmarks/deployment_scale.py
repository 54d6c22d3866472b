"""Nodes on one coordinator: round time and memory per node at 3, 10, 25, 50 nodes.

For each node count a fresh consortium on loopback, built by
`tests/consortium.py` as operators would (TLS from the consortium's CA,
node authentication with keys enrolled by `consortia coordinator nodes
add`, `consortia node start` per node), each node holding its share of the
breast cancer records as its registered dataset. One job, submitted with
`consortia job submit --wait`: logreg, DP-SGD (target ε 1 over the run),
federated evaluation, `--rounds` rounds, `min_nodes` = every node.

Reported per node count:
- every round's wall time at the coordinator (`rounds[].seconds` of
  metrics.json) and whether every node took part in every round (any
  failure ends the benchmark with the round that lacked a node);
- memory per node, sampled every second during the job over each node's
  process tree (`consortia node start` → flower-supernode → the node's
  ClientApp worker): RSS (what `top` shows; shared library pages counted
  again in every process), PSS (shared pages divided among the processes
  that map them: what the nodes together cost the host) and USS (pages
  no other process maps), as the peak of each node's tree, median over
  nodes; plus a one-node breakdown by process;
- the coordinator's processes (SuperLink, ServerApp) at their peak.

    python benchmarks/deployment_scale.py [--nodes 3 10 25 50] [--rounds 5]
        [--poll-interval-s S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the consortium harness: tests/consortium.py

from consortium import Consortium, cancer_sites, run_id_of  # noqa: E402
from federation import descendants, write_job  # noqa: E402
from worker_process import print_machine  # noqa: E402

MIB = 1024 * 1024


@dataclass(frozen=True)
class Memory:
    """RSS, PSS and USS of a set of processes, in bytes."""

    rss: int = 0
    pss: int = 0
    uss: int = 0

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.pss + other.pss, self.uss + other.uss)

    def peak(self, other: Memory) -> Memory:
        return Memory(max(self.rss, other.rss), max(self.pss, other.pss), max(self.uss, other.uss))

    def mib(self) -> dict[str, float]:
        return {k: round(v / MIB, 1) for k, v in vars(self).items()}


def memory_of(pid: int) -> Memory:
    """From /proc/PID/smaps_rollup (Linux); a process that ended counts 0."""
    values: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return Memory()
    private = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return Memory(values.get("Rss", 0), values.get("Pss", 0), private)


def command_of(pid: int) -> str:
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [p.decode(errors="replace") for p in parts if p]
    script = next((w for w in words[1:] if not w.startswith("-")), words[0] if words else "?")
    module = words[words.index("-m") + 1] if "-m" in words else None
    name = module or Path(script).name
    if "node" in words and "start" in words:
        return "consortia node start"
    return name


@dataclass
class Sampler:
    """Samples the peak memory of each node's tree, and of the coordinator's, every second."""

    nodes: dict[str, int]  # node name -> pid of its `consortia node start`
    coordinator: int
    peaks: dict[str, Memory] = field(default_factory=dict)
    per_process: dict[str, Memory] = field(default_factory=dict)  # the first node, by command
    coordinator_peak: Memory = Memory()
    _stop: threading.Event = field(default_factory=threading.Event)

    def _tree(self, pid: int) -> Iterable[int]:
        return {pid} | descendants([pid])

    def sample(self) -> None:
        for index, (name, pid) in enumerate(self.nodes.items()):
            total = Memory()
            for member in self._tree(pid):
                one = memory_of(member)
                total = total + one
                if index == 0:
                    label = command_of(member)
                    self.per_process[label] = self.per_process.get(label, Memory()).peak(one)
            self.peaks[name] = self.peaks.get(name, Memory()).peak(total)
        coordinator = Memory()
        for member in self._tree(self.coordinator):
            coordinator = coordinator + memory_of(member)
        self.coordinator_peak = self.coordinator_peak.peak(coordinator)

    def run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_count(root: Path, count: int, rounds: int, poll_s: float | None) -> dict[str, object]:
    """Start a consortium of `count` nodes, run the job, return its figures."""
    names = tuple(f"site-{i:02d}" for i in range(count))
    root.mkdir(parents=True)
    consortium = Consortium(root)
    node_tomls = cancer_sites(consortium, names, budget=100.0)
    if poll_s is not None:  # node.toml's top-level key, written before its first table
        for toml in node_tomls.values():
            toml.write_text(f"poll_interval_s = {poll_s}\n" + toml.read_text())
    try:
        coordinator = consortium.start_coordinator()
        began = time.monotonic()
        pids: dict[str, int] = {}
        for name, node_toml in node_tomls.items():
            consortium.enroll(name, node_toml)
            pids[name] = consortium.start_node(node_toml, name).pid
        started_s = time.monotonic() - began
        job = write_job(root / "job.toml", 1.0, name=f"scale-{count}", min_nodes=count)
        job.write_text(job.read_text().replace("rounds = 2", f"rounds = {rounds}"))
        with Sampler(pids, coordinator.pid) as sampler:
            # `submit` waits 10 minutes; 40 nodes on two cores take longer than that.
            submitted = consortium.consortia(
                "job", "submit", str(job), "--config", str(consortium.config), "--wait",
                timeout=3 * 3600,
            )  # fmt: skip
        if submitted.returncode != 0:
            tail = (submitted.stdout + submitted.stderr)[-3000:]
            raise SystemExit(f"{count} nodes: the job failed\n{tail}")
        run_dir = consortium.state / "runs" / f"run-{run_id_of(submitted)}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        for record in metrics["rounds"]:
            if sorted(record["participants"]) != sorted(names):
                missing = sorted(set(names) - set(record["participants"]))
                raise SystemExit(f"{count} nodes: round {record['round']} lacks {missing}")
        seconds = [float(r["seconds"]) for r in metrics["rounds"]]
        peaks = list(sampler.peaks.values())
        return {
            "nodes": count,
            "poll_interval_s": poll_s,
            "rounds": len(seconds),
            "round_seconds": seconds,
            "median_round_s": statistics.median(seconds[1:] or seconds),
            "enroll_and_start_s": round(started_s, 1),
            "node_memory_mib": {
                kind: statistics.median(getattr(p, kind) for p in peaks) / MIB
                for kind in ("rss", "pss", "uss")
            },
            "nodes_total_pss_mib": sum(p.pss for p in peaks) / MIB,
            "one_node_by_process_mib": {k: m.mib() for k, m in sampler.per_process.items()},
            "coordinator_mib": sampler.coordinator_peak.mib(),
        }
    finally:
        consortium.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 25, 50])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--poll-interval-s", type=float, default=None, help="node.toml poll_interval_s"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for count in args.nodes:
        with tempfile.TemporaryDirectory(prefix=f"scale{count}-") as folder:
            began = time.monotonic()
            root = Path(folder) / "consortium"
            result = one_count(root, count, args.rounds, args.poll_interval_s)
            result["wall_s"] = round(time.monotonic() - began, 1)
            results.append(result)
            print(json.dumps(result), flush=True)
    facts = print_machine()
    print(f"\n{args.rounds} rounds, logreg, DP-SGD, TLS + node auth on loopback")
    print(" nodes  round s (median, 2..)  node RSS / PSS / USS MiB (median)  all nodes PSS MiB")
    for r in results:
        mem = r["node_memory_mib"]
        assert isinstance(mem, dict)
        print(
            f"{r['nodes']:>6}  {r['median_round_s']:>20.2f}  "
            f"{mem['rss']:>10.0f} / {mem['pss']:>5.0f} / {mem['uss']:>5.0f}"
            f"  {r['nodes_total_pss_mib']:>18.0f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": facts, "results": results}, indent=2))


if __name__ == "__main__":
    main()
