"""Simulation at scale: 1,000 virtual DP-SGD nodes on this machine, consortia vs stock Flower.

Issue targets (simulation lab, item 3), on 2 CPU cores: a 1,000-node DP
round of `simulations/mnist-1000-nodes.toml` in under 10 s, DP rounds
within 1.5x of non-DP rounds, under 5 s from the command to the first
round, and the peak memory of the whole run reported.

Four runs of the same scenario (1,000 nodes of 60 MNIST records, every node
trains every round), one after the other on an otherwise idle machine,
each a fresh process tree:

* `consortia dp`: `consortia simulate SCENARIO --json` (DP-SGD at the
  scenario's ε, per-node ε each round, checkpoints, metrics, report);
* `consortia no-dp`: the same with `[privacy] enabled = false`;
* `stock dp` / `stock no-dp`: `benchmarks/stock_flower_simulation.py`, the
  scenario written the way Flower's and Opacus' tutorials do it (see that
  file) on Flower's stock simulation engine.

Figures per run: `first round` (s from starting the command to round 1
starting: consortia's `start` event, sent once every node has answered the
roster query; the stock ServerApp's round-0 `evaluate_fn` call, made
before any node is up, so the nodes' start-up falls in its round 1),
round 1, `round 1 done` (their sum: the command to the first result), the
mean of rounds 2.. (warm), final
accuracy, and peak memory of the run's whole process tree (driver, Ray's
GCS and raylet, every actor), sampled every 0.25 s from /proc: the sum of
RSS (counts shared libraries once per process) and of PSS (shares them out:
the memory the run really occupies).

Usage (about 6 minutes on 2 cores)::

    python benchmarks/simulation_scale.py [--data ../shared/data/mnist] [--rounds 5]
                                          [--stock-rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the process helpers: tests/federation.py

from federation import descendants  # noqa: E402
from machine import format_machine_facts, machine_facts  # noqa: E402

SCENARIO = REPO_ROOT / "simulations" / "mnist-1000-nodes.toml"


@dataclass
class RunFigures:
    """What one run measured."""

    name: str
    command: list[str]
    first_round_s: float | None = None
    round_s: list[float] = field(default_factory=list)
    accuracy: float | None = None
    peak_rss_mib: float = 0.0
    peak_pss_mib: float = 0.0
    wall_s: float = 0.0

    @property
    def round_1_done_s(self) -> float | None:
        """From the command to the end of round 1: the first result a user sees."""
        if self.first_round_s is None or not self.round_s:
            return None
        return self.first_round_s + self.round_s[0]

    @property
    def warm_round_s(self) -> float | None:
        warm = self.round_s[1:]
        return statistics.mean(warm) if warm else None


class TreeMemory:
    """Peak RSS and PSS summed over a process and all its descendants (Linux /proc)."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            for pid in (self.pid, *descendants([self.pid])):
                rss += _kib(f"/proc/{pid}/status", "VmRSS:")
                pss += _kib(f"/proc/{pid}/smaps_rollup", "Pss:")
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval_s)


def _kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _run(name: str, command: list[str], consortia: bool) -> RunFigures:
    """Run `command`, reading its JSON lines; consortia's events or the stock script's."""
    figures = RunFigures(name=name, command=command)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    print(f"--- {name}: {' '.join(command)}", flush=True)
    started = time.time()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    memory = TreeMemory(process.pid)
    assert process.stdout is not None
    last = None
    for line in process.stdout:
        event = json.loads(line)
        now = time.time()
        if event["event"] in ("start", "first_round"):
            figures.first_round_s = now - started
            last = now
        elif event["event"] == "round":
            if consortia:
                figures.round_s.append(float(event["seconds"]))
            else:
                assert last is not None
                figures.round_s.append(event["t"] - last)
                last = event["t"]
            figures.accuracy = event.get("accuracy")
            print(f"    round {event['round']}: {figures.round_s[-1]:.2f} s", flush=True)
    process.wait()
    figures.wall_s = time.time() - started
    memory.stop()
    if process.returncode != 0:
        raise SystemExit(f"{name} failed with exit code {process.returncode}")
    figures.peak_rss_mib, figures.peak_pss_mib = memory.peak_rss / 1024, memory.peak_pss / 1024
    return figures


def _scenario_without_dp(folder: Path) -> Path:
    text = SCENARIO.read_text()
    assert "\n[privacy]\n" in text
    path = folder / "mnist-1000-nodes-no-dp.toml"
    path.write_text(text.replace("\n[privacy]\n", "\n[privacy]\nenabled = false\n"))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--rounds", type=int, default=5, help="consortia rounds per run")
    parser.add_argument("--stock-rounds", type=int, default=3, help="stock Flower rounds per run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    data = str(args.data.resolve())
    stock = [sys.executable, str(REPO_ROOT / "benchmarks" / "stock_flower_simulation.py")]
    with tempfile.TemporaryDirectory(prefix="consortia-scale-") as tmp:
        folder = Path(tmp)
        no_dp = _scenario_without_dp(folder)

        def consortia(scenario: Path, out: str) -> list[str]:
            return [
                *("consortia", "simulate", str(scenario), "--data", data),
                *("--rounds", str(args.rounds), "--json", "--out", str(folder / out)),
            ]

        def stock_run(*extra: str) -> list[str]:
            rounds = str(args.stock_rounds)
            return [*stock, str(SCENARIO), "--data", data, "--rounds", rounds, *extra]

        runs = [
            _run("consortia dp", consortia(SCENARIO, "dp"), consortia=True),
            _run("consortia no-dp", consortia(no_dp, "no-dp"), consortia=True),
            _run("stock dp", stock_run(), consortia=False),
            _run("stock no-dp", stock_run("--no-dp"), consortia=False),
        ]
    facts = machine_facts()
    print("\nmachine:\n" + format_machine_facts(facts, "  "))
    print(_table(runs))
    print(_ratios({run.name: run for run in runs}))
    if args.json is not None:
        document = {"machine": facts, "runs": [asdict(run) for run in runs]}
        args.json.write_text(json.dumps(document, indent=2))


def _table(runs: list[RunFigures]) -> str:
    lines = [
        "",
        f"{'run':<16} {'first round':>11} {'round 1':>8} {'round 1 done':>12} {'rounds 2..':>10} "
        f"{'accuracy':>8} {'peak RSS':>9} {'peak PSS':>9}",
    ]
    for run in runs:
        warm = run.warm_round_s
        lines.append(
            f"{run.name:<16} {run.first_round_s or float('nan'):>10.1f}s "
            f"{run.round_s[0] if run.round_s else float('nan'):>7.2f}s "
            f"{run.round_1_done_s or float('nan'):>11.1f}s "
            f"{warm if warm is not None else float('nan'):>9.2f}s "
            f"{run.accuracy if run.accuracy is not None else float('nan'):>8.4f} "
            f"{run.peak_rss_mib:>6.0f}MiB {run.peak_pss_mib:>6.0f}MiB"
        )
    return "\n".join(lines)


def _ratios(runs: dict[str, RunFigures]) -> str:
    def warm(name: str) -> float:
        value = runs[name].warm_round_s
        assert value is not None, f"{name}: needs at least 2 rounds"
        return value

    dp, stock_dp = warm("consortia dp"), warm("stock dp")
    return "\n".join(
        [
            "",
            f"consortia DP round / consortia non-DP round: {dp / warm('consortia no-dp'):.2f}x "
            "(target <= 1.5x)",
            f"consortia DP round: {dp:.2f} s (target < 10 s)",
            f"stock DP round / consortia DP round: {stock_dp / dp:.1f}x",
            f"stock non-DP round / consortia non-DP round: "
            f"{warm('stock no-dp') / warm('consortia no-dp'):.1f}x",
            f"command to first round, consortia: {runs['consortia dp'].first_round_s:.1f} s "
            f"(target < 5 s); stock: {runs['stock dp'].first_round_s:.1f} s (round 1 starts "
            "before any node is up; the nodes' start-up is inside its round 1)",
            f"command to end of round 1, consortia: {runs['consortia dp'].round_1_done_s:.1f} s; "
            f"stock: {runs['stock dp'].round_1_done_s:.1f} s",
        ]
    )


if __name__ == "__main__":
    main()
