"""Privacy ledger cost: recording a release and its ε on top of a long history.

Builds a ledger (in `--dir`, default a new temporary folder) holding one RDP
dataset with `--releases` releases (default 10,000: 100 jobs of 100 rounds,
each job its own calibrated-looking σ and q, 10-50 steps a round), recorded
through `record_release` itself, so every one is a durable commit. Then
times, median and p90 over `--calls` calls (default 200, after a warm-up):

* `record_release` + ε, warm: the (σ, q) was used before in this process
  (the normal case: `projected_epsilon` before training warms it)
* `projected_epsilon` (read the composed state, compose, no write)
* the ε arithmetic alone, in memory (vector add + Opacus' get_privacy_spent)
* the durable commit alone: a one-row INSERT transaction on a scratch SQLite
  file in the same folder, WAL + synchronous=FULL, against synchronous=OFF
  (their difference is the fsync), and a raw os.fsync of a 4 KiB append
* `record_release` with a (σ, q) this process never saw (cold: Opacus'
  `compute_rdp` of the new curve), over `--cold-calls` calls (default 20)
* opening the 10,000-release ledger (quick_check) and `verify` over it
* PRV datasets (unless `--skip-prv`): `record_release` with 1, 3 and 10
  distinct (σ, q) pairs in the history, and with 1 pair of 300,000 steps in
  all (what 10,000 releases of 30 steps compose to)

Prints machine facts, the filesystem of the ledger's folder, and the figures.

    python benchmarks/ledger_cost.py [--dir DIR] [--releases 10000] [--calls 200]
                                     [--cold-calls 20] [--skip-prv] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from machine import format_machine_facts, machine_facts
from opacus.accountants.analysis import rdp as rdp_analysis

from consortia.client.ledger import PrivacyLedger, ledger_path
from consortia.common.privacy import RDP_ORDERS, Release, rdp_per_step

DELTA = 1e-5
ROUNDS_PER_JOB = 100
RDP_DATASET = "bench-rdp"


def timed(fn: Callable[[], Any], calls: int, warmup: int = 5) -> dict[str, float]:
    """Median, p90 and best of `calls` timed calls of `fn`, in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p90_ms": samples[int(0.9 * (len(samples) - 1))],
        "best_ms": samples[0],
        "mean_ms": statistics.fmean(samples),
        "max_ms": samples[-1],
        "calls": float(calls),
    }


def filesystem_of(folder: Path) -> str:
    """`device fstype` of the mount holding `folder` (from /proc/mounts), or 'unknown'."""
    mounts = Path("/proc/mounts")
    if not mounts.is_file():
        return "unknown"
    best, answer = "", "unknown"
    resolved = str(folder.resolve())
    for line in mounts.read_text(encoding="utf-8").splitlines():
        device, mount_point, fstype, *_ = line.split()
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, answer = mount_point, f"{device} {fstype} (mounted at {mount_point})"
    return answer


def build_history(ledger: PrivacyLedger, releases: int, rng: random.Random) -> Release:
    """Record `releases` releases, a job of ROUNDS_PER_JOB rounds per (σ, q); the last one."""
    ledger.register_dataset(RDP_DATASET, epsilon_budget=1e12, delta=DELTA)
    release = Release(noise_multiplier=1.0, sample_rate=0.01, steps=1)
    for index in range(releases):
        job, server_round = divmod(index, ROUNDS_PER_JOB)
        if server_round == 0:
            sigma, q = round(rng.uniform(1.5, 3.0), 4), rng.choice([0.002, 0.005, 0.01])
        release = Release(noise_multiplier=sigma, sample_rate=q, steps=rng.randint(10, 50))
        ledger.record_release(
            RDP_DATASET, release, run_id=f"job-{job}", server_round=server_round + 1
        )
    return release


def commit_probe(folder: Path, synchronous: str, calls: int) -> dict[str, float]:
    """One-row INSERT transactions on a scratch WAL database: the commit alone."""
    probe = folder / f"commit-probe-{synchronous.lower()}.sqlite3"
    conn = sqlite3.connect(probe, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x BLOB)")

    def commit() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (randomblob(200))")
        conn.execute("COMMIT")

    try:
        return timed(commit, calls)
    finally:
        conn.close()


def fsync_probe(folder: Path, calls: int) -> dict[str, float]:
    """A 4 KiB append + os.fsync on a file in `folder`: the disk's durable-write floor."""
    fd = os.open(folder / "fsync-probe.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = os.urandom(4096)

    def write_and_sync() -> None:
        os.write(fd, block)
        os.fsync(fd)

    try:
        return timed(write_and_sync, calls)
    finally:
        os.close(fd)


def epsilon_arithmetic(release: Release, calls: int) -> dict[str, float]:
    """What `record_release` computes, without SQLite: add one release, read ε off the curve."""
    vector = np.full(len(RDP_ORDERS), 0.5)
    orders = list(RDP_ORDERS)
    curve = rdp_per_step(release.noise_multiplier, release.sample_rate)

    def compose() -> None:
        rdp_analysis.get_privacy_spent(
            orders=orders, rdp=vector + release.steps * curve, delta=1e-5
        )

    return timed(compose, calls)


def rdp_figures(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    path = ledger_path(folder)
    figures: dict[str, Any] = {}
    with PrivacyLedger(path) as ledger:
        start = time.perf_counter()
        last = build_history(ledger, args.releases, rng)
        build_s = time.perf_counter() - start
        figures["build"] = {
            "releases": args.releases,
            "seconds": build_s,
            "ms_per_release": build_s * 1e3 / args.releases,
        }
        rounds = iter(range(10**9))

        def record_warm() -> None:
            ledger.record_release(RDP_DATASET, last, run_id="bench", server_round=next(rounds))

        figures["record_release_warm"] = timed(record_warm, args.calls)
        figures["projected_epsilon"] = timed(
            lambda: ledger.projected_epsilon(RDP_DATASET, last), args.calls
        )
        cold = iter(range(10**9))

        def record_cold() -> None:
            sigma = 5.0 + next(cold) * 1e-3  # a σ this process never used: compute_rdp
            release = Release(noise_multiplier=sigma, sample_rate=0.01, steps=20)
            ledger.record_release(RDP_DATASET, release, run_id="bench-cold", server_round=1)

        figures["record_release_cold_curve"] = timed(record_cold, args.cold_calls, warmup=0)
        figures["history_releases"] = len(ledger.history(RDP_DATASET))
        figures["epsilon_spent"] = ledger.spent(RDP_DATASET)
    start = time.perf_counter()
    with PrivacyLedger(path) as ledger:
        figures["open_ms"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        report = ledger.verify(RDP_DATASET)
        figures["verify"] = {
            "seconds": time.perf_counter() - start,
            "releases": report.releases,
            "distinct_pairs": len(
                {(e.noise_multiplier, e.sample_rate) for e in ledger.history(RDP_DATASET)}
            ),
        }
    figures["ledger_bytes"] = path.stat().st_size
    figures["epsilon_arithmetic"] = epsilon_arithmetic(last, args.calls)
    figures["commit_wal_sync_full"] = commit_probe(folder, "FULL", args.calls)
    figures["commit_wal_sync_off"] = commit_probe(folder, "OFF", args.calls)
    figures["fsync_4kib"] = fsync_probe(folder, args.calls)
    return figures


def prv_figures(folder: Path) -> dict[str, Any]:
    """record_release on PRV datasets: the cost grows with distinct pairs and total steps."""
    figures: dict[str, Any] = {}
    with PrivacyLedger(folder / "prv-ledger.sqlite3") as ledger:
        for pairs in (1, 3, 10):
            name = f"prv-{pairs}-pairs"
            ledger.register_dataset(name, epsilon_budget=1e6, delta=DELTA, accountant="prv")
            history = [
                Release(noise_multiplier=1.0 + 0.1 * i, sample_rate=0.01, steps=100)
                for i in range(pairs)
            ]
            for server_round, release in enumerate(history, start=1):
                ledger.record_release(name, release, run_id="build", server_round=server_round)
            rounds = iter(range(10**9))
            figures[name] = timed(
                lambda name=name, last=history[-1], rounds=rounds: ledger.record_release(
                    name, last, run_id="bench", server_round=next(rounds)
                ),
                calls=3,
                warmup=0,
            )
        name = "prv-1-pair-300000-steps"
        ledger.register_dataset(name, epsilon_budget=1e6, delta=DELTA, accountant="prv")
        long = Release(noise_multiplier=1.0, sample_rate=0.01, steps=300_000)
        ledger.record_release(name, long, run_id="build", server_round=1)
        step = Release(noise_multiplier=1.0, sample_rate=0.01, steps=30)
        figures[name] = timed(
            lambda: ledger.record_release(name, step, run_id="bench", server_round=2),
            calls=1,
            warmup=0,
        )
    return figures


def print_figures(rdp: dict[str, Any], prv: dict[str, Any] | None) -> None:
    build = rdp["build"]
    print(
        f"\nbuilt {build['releases']} releases in {build['seconds']:.1f} s "
        f"({build['ms_per_release']:.2f} ms each, durable commits); ledger "
        f"{rdp['ledger_bytes'] / 1024:.0f} KiB, ε spent {rdp['epsilon_spent']:.3f} at δ={DELTA}"
    )
    print(f"history after the timed calls: {rdp['history_releases']} releases\n")
    rows = [
        ("record_release + ε (RDP, warm curve)", rdp["record_release_warm"]),
        ("projected_epsilon (RDP, no write)", rdp["projected_epsilon"]),
        ("ε arithmetic alone (in memory)", rdp["epsilon_arithmetic"]),
        ("commit: WAL, synchronous=FULL", rdp["commit_wal_sync_full"]),
        ("commit: WAL, synchronous=OFF", rdp["commit_wal_sync_off"]),
        ("os.fsync of a 4 KiB append", rdp["fsync_4kib"]),
        ("record_release + ε (RDP, new (σ, q))", rdp["record_release_cold_curve"]),
    ]
    if prv is not None:
        rows += [(f"record_release + ε ({name})", figures) for name, figures in prv.items()]
    width = max(len(label) for label, _ in rows)
    columns = ("median", "p90", "mean", "best", "max")
    print(f"{'':<{width}}" + "".join(f"  {c + ' ms':>10}" for c in columns) + "  calls")
    for label, figures in rows:
        cells = "".join(f"  {figures[c + '_ms']:>10.3f}" for c in columns)
        print(f"{label:<{width}}{cells}  {figures['calls']:.0f}")
    verify = rdp["verify"]
    print(
        f"\nopen (quick_check) of the ledger: {rdp['open_ms']:.1f} ms; verify over "
        f"{verify['releases']} releases ({verify['distinct_pairs']} distinct (σ, q)): "
        f"{verify['seconds']:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="folder for the ledgers")
    parser.add_argument("--releases", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--cold-calls", type=int, default=20)
    parser.add_argument("--skip-prv", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()
    # Large synthetic ε make Opacus note that the best order is at the edge.
    warnings.filterwarnings("ignore", message="Optimal order is the")

    owned = args.dir is None
    folder = Path(tempfile.mkdtemp(prefix="consortia-ledger-bench-")) if owned else args.dir
    folder.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    facts["ledger folder"] = str(folder)
    facts["filesystem"] = filesystem_of(folder)
    facts["sqlite"] = sqlite3.sqlite_version
    print(format_machine_facts(facts))
    try:
        rdp = rdp_figures(folder, args)
        prv = None if args.skip_prv else prv_figures(folder)
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
    print_figures(rdp, prv)
    if args.json is not None:
        report = {"machine": facts, "rdp": rdp, "prv": prv}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
