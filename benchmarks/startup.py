"""Start-up of `consortia simulate`: imports, Ray, actors, first round; a sweep's one Ray.

Issue acceptance (item 18.7): a sweep of 5 seeds starts Ray once, measured
as the wall time of `consortia simulate ... --seeds 5` against 5 separate
`consortia simulate ... --seed S` commands for the same 5 seeds.

Three sections, each with its baseline measured in the same run:

* `imports`: `python -c "import consortia.cli.main"` and `consortia --help`
  against a bare `python -c pass` (median of `--repeat` launches), and the
  heavy modules (torch, Flower, Ray, matplotlib, ...) the CLI module pulls
  in: none is the goal, so `--help` and config errors answer in a blink.
  Also `import consortia.simulations.engine`: what a run must import.
* `timeline`: one run of the scenario (`--rounds` rounds) in a child
  process, stamped at: the interpreter's start, the engine's imports done,
  Ray's start (Flower's `RayBackend.init_ray`) begun and done, the actor
  pool built (handles only: the actor processes start on first use), the
  roster answered (every actor up, torch and Opacus imported, the nodes'
  first message answered), each round started and done, the process' exit.
  Start-up (launch to round 1 started) is given as a ratio to the mean
  round.
* `sweep`: `--seeds N` separate commands, then one `--seeds N` sweep of
  the same seeds; the ratio sweep / separate, and whether each seed's final
  accuracy, ε and model hash agree between the two.

The child processes import consortia as this interpreter finds it (run it
with the PYTHONPATH of the tree to measure). The machine is shared: compare
figures taken back to back, in one session.

Usage (from the repository root; about 10 minutes at 2 rounds and 5 seeds on 2 loaded cores)::

    python benchmarks/startup.py [--scenario simulations/hospitals-breast-cancer.toml]
                                 [--rounds 2] [--seeds 5] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import format_machine_facts, machine_facts

HEAVY = ("torch", "flwr", "ray", "matplotlib", "opacus", "numpy", "sklearn", "pandas", "scipy")
CLI = (sys.executable, "-m", "consortia.cli.main")

# The timeline child: runs one simulation with Flower's Ray start and actor
# pool build timed (wrapped here, in the benchmark only) and a listener that
# stamps the rounds. argv: launch time, scenario, rounds, out folder.
_TIMELINE = r"""
import json, sys, time
stamps = {"launch": float(sys.argv[1]), "main": time.time()}
from consortia.simulations import engine
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
stamps["imports done"] = time.time()
from pathlib import Path
from consortia.common.config_io import load_scenario

def timed(name, method):
    def wrapper(self, *args):
        stamps.setdefault(name + " begun", time.time())
        result = method(self, *args)
        stamps.setdefault(name + " done", time.time())
        return result
    return wrapper

RayBackend.init_ray = timed("ray start", RayBackend.init_ray)
RayBackend.build = timed("actor pool", RayBackend.build)
rounds = []

class Stamps:
    def on_start(self, total_rounds, roster, skew):
        stamps["roster answered"] = time.time()
    def on_round_started(self, server_round):
        rounds.append([time.time(), None])
    def on_round(self, record):
        rounds[-1][1] = time.time()

loaded = load_scenario(sys.argv[2], {"rounds": int(sys.argv[3])})
engine.simulate(loaded, Path(sys.argv[4]), Stamps())
stamps["run done"] = time.time()
print(json.dumps({"stamps": stamps, "rounds": rounds}))
"""

_HEAVY_PROBE = (
    f"import sys, consortia.cli.main; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="simulations/hospitals-breast-cancer.toml")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5, help="launches per import figure")
    parser.add_argument("--skip", nargs="*", default=[], choices=["imports", "timeline", "sweep"])
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    scenario = str(Path(args.scenario).resolve())

    print(format_machine_facts(machine_facts()))
    print(f"load average: {_load()}")
    report: dict[str, Any] = {"machine": machine_facts(), "load_before": _load()}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        work = Path(tmp)
        if "imports" not in args.skip:
            report["imports"] = imports(args.repeat)
        if "timeline" not in args.skip:
            report["timeline"] = timeline(scenario, args.rounds, work / "timeline")
        if "sweep" not in args.skip:
            report["sweep"] = sweep(scenario, args.rounds, args.seeds, work)
    report["load_after"] = _load()
    print(f"load average: {_load()}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


def imports(repeat: int) -> dict[str, Any]:
    bare = _median_wall([sys.executable, "-c", "pass"], repeat)
    cli = _median_wall([sys.executable, "-c", "import consortia.cli.main"], repeat)
    helped = _median_wall([*CLI, "--help"], repeat)
    engine = _median_wall([sys.executable, "-c", "import consortia.simulations.engine"], repeat)
    heavy = _run([sys.executable, "-c", _HEAVY_PROBE]).stdout.strip()
    print("\n== imports (median wall of launches; baseline: python -c pass)")
    print(f"  python -c pass                         {bare:6.2f} s   1.0×")
    print(f"  import consortia.cli.main              {cli:6.2f} s  {cli / bare:4.1f}×")
    print(f"  consortia --help                       {helped:6.2f} s  {helped / bare:4.1f}×")
    print(f"  import consortia.simulations.engine    {engine:6.2f} s  {engine / bare:4.1f}×")
    print(f"  heavy modules the CLI module imports:  {heavy or 'none'}")
    return {"bare_s": bare, "cli_s": cli, "help_s": helped, "engine_s": engine, "heavy": heavy}


def timeline(scenario: str, rounds: int, out: Path) -> dict[str, Any]:
    launch = time.time()
    result = _run([sys.executable, "-c", _TIMELINE, str(launch), scenario, str(rounds), str(out)])
    exited = time.time()
    data = json.loads(result.stdout.strip().splitlines()[-1])
    stamps: dict[str, float] = data["stamps"]
    round_times: list[tuple[float, float]] = [tuple(r) for r in data["rounds"]]
    first_started = round_times[0][0]
    marks = [
        ("interpreter start", "launch", "main"),
        ("imports (torch, Flower, Ray, consortia)", "main", "imports done"),
        ("scenario, data, model preflight", "imports done", "ray start begun"),
        ("ray.init", "ray start begun", "ray start done"),
        ("actor pool handles", "actor pool begun", "actor pool done"),
        ("actors up + roster query", "actor pool done", "roster answered"),
    ]
    phases = {name: stamps[end] - stamps[begin] for name, begin, end in marks}
    phases["roster to round 1 started"] = first_started - stamps["roster answered"]
    per_round = [done - started for started, done in round_times]
    startup = first_started - launch
    mean_round = statistics.fmean(per_round)
    after = exited - round_times[-1][1]
    print(f"\n== timeline of one run ({rounds} rounds; baseline: its mean round)")
    for name, seconds in phases.items():
        print(f"  {name:<40} {seconds:6.2f} s")
    print(f"  {'rounds':<40} " + ", ".join(f"{s:.2f}" for s in per_round) + " s")
    print(f"  {'last round done to process exit':<40} {after:6.2f} s")
    ratio = startup / mean_round
    print(f"  start-up, launch to round 1 started      {startup:6.2f} s  = {ratio:.1f}× a round")
    return {"phases_s": phases, "rounds_s": per_round, "startup_s": startup, "exit_s": after}


def sweep(scenario: str, rounds: int, seeds: int, work: Path) -> dict[str, Any]:
    base_seed = _scenario_seed(scenario)
    separate_s = 0.0
    separate: dict[int, dict[str, Any]] = {}
    for seed in range(base_seed, base_seed + seeds):
        out = work / f"run-{seed}"
        started = time.perf_counter()
        _run([*CLI, "simulate", scenario, "--rounds", str(rounds), "--seed", str(seed),
              "--out", str(out), "--quiet"])  # fmt: skip
        separate_s += time.perf_counter() - started
        separate[seed] = _final(out)
    started = time.perf_counter()
    _run([*CLI, "simulate", scenario, "--rounds", str(rounds), "--seeds", str(seeds),
          "--out", str(work / "sweep"), "--quiet"])  # fmt: skip
    sweep_s = time.perf_counter() - started
    swept = json.loads((work / "sweep" / "sweep.json").read_text())
    agree = all(
        _final(work / "sweep" / run["folder"]) == separate[run["seed"]] for run in swept["runs"]
    )
    print(f"\n== {seeds} seeds, {rounds} rounds each (baseline: {seeds} separate commands)")
    print(f"  {seeds} separate `consortia simulate --seed S`   {separate_s:7.1f} s   1.00×")
    ratio = sweep_s / separate_s
    print(f"  one `consortia simulate --seeds {seeds}`        {sweep_s:7.1f} s   {ratio:.2f}×")
    print(f"  same accuracy, ε and model per seed: {'yes' if agree else 'NO'}")
    return {"separate_s": separate_s, "sweep_s": sweep_s, "ratio": ratio, "results_agree": agree}


def _final(run_dir: Path) -> dict[str, Any]:
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    return {k: final[k] for k in ("accuracy", "epsilon", "model_sha256")}


def _scenario_seed(scenario: str) -> int:
    import tomllib

    return int(tomllib.loads(Path(scenario).read_text()).get("seed", 0))


def _median_wall(command: list[str], repeat: int) -> float:
    walls = []
    for _ in range(repeat):
        started = time.perf_counter()
        _run(command)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def _run(command: list[str] | tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "120"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:6])} ...: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
