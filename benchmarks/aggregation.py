"""FedAvg aggregation: consortia against Flower on the same replies, in one process.

Builds `--replies` reply Messages (default 100), each carrying an ArrayRecord
of ~1M float32 parameters under "arrays" and a MetricRecord with the
aggregation weight under "metrics", as real `flwr.app.Message` replies to the
instructions `ConsortiaStrategy.configure_train` sends. Then times, round-robin
and after a warm-up:

* Flower   `FedAvg.aggregate_train(round, replies)` (its public strategy)
* Flower   `aggregate_arrayrecords(contents, key)` (its averaging alone)
* consortia `weighted_average(records, weights)` (received records -> new arrays)
* consortia `ConsortiaStrategy.aggregate_train(round, replies)` (with screening:
  roster lookup, weight/shape/dtype/finiteness checks, name-order sort, run log)
* the memory-bandwidth bound: reading the same input bytes once
  (`np.add.reduce` and `torch.sum` over every array's zero-copy view).

Prints machine facts, a table (median and best ms, multiple of the bound,
GB/s of input read), the speed-ups, and how far the results agree.

    python benchmarks/aggregation.py [--json PATH] [--replies 100] [--repeats 9]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity
from machine import format_machine_facts, machine_facts

from consortia.common import protocol as p
from consortia.server.rounds.aggregation import array_view, weighted_average
from consortia.server.rounds.cohort import Cohort
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.server.rounds.run_log import RunLog
from consortia.server.rounds.strategies import ConsortiaStrategy

# ~1M float32 parameters per reply (1,001,500), two large matrices and two biases.
SHAPES = {"w1": (1000, 500), "b1": (500,), "w2": (500, 1000), "b2": (1000,)}
ROUND = 1

FLOWER_TRAIN = "flower FedAvg.aggregate_train"
FLOWER_AVERAGE = "flower aggregate_arrayrecords"
CONSORTIA_AVERAGE = "consortia weighted_average"
CONSORTIA_TRAIN = "consortia ConsortiaStrategy.aggregate_train"
BOUND_NUMPY = "read once: np.add.reduce"
BOUND_TORCH = "read once: torch.sum"


# --------------------------------------------------------------------- setup


def build_round(replies: int, seed: int) -> tuple[ConsortiaStrategy, list[Message]]:
    """A consortia strategy attached to a roster of `replies` nodes, and their replies.

    The replies answer the strategy's own train instructions (so `src_node_id`
    is each node's id) and are returned in a shuffled "arrival" order.
    """
    # Outside a ServerApp nobody sets the process's task identity, which every
    # instruction Message reads; set it as `flwr.server.compat.app` does.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    rng = np.random.default_rng(seed)
    node_ids = rng.choice(2**62, size=replies, replace=False).tolist()
    roster = Roster(
        nodes=tuple(
            NodeEntry(
                node_id=int(nid),
                name=f"node-{i:03d}",
                data_fingerprint="",
                feature_shape=(1000,),
                num_classes=500,
            )
            for i, nid in enumerate(node_ids)
        )
    )
    strategy = ConsortiaStrategy(
        weighted_by_key=p.WEIGHT, arrayrecord_key=p.ARRAYS_KEY, configrecord_key=p.CONFIG_KEY
    )
    strategy.attach(Cohort(roster, per_round=None, seed=seed), RunLog(roster), False)
    global_model = ArrayRecord({k: Array(np.zeros(s, dtype=np.float32)) for k, s in SHAPES.items()})
    instructions = strategy.configure_train(ROUND, global_model, ConfigRecord(), grid=None)
    messages = []
    for instruction in instructions:
        arrays = ArrayRecord(
            {k: Array(rng.standard_normal(s, dtype=np.float32)) for k, s in SHAPES.items()}
        )
        metrics = MetricRecord(
            {
                p.WEIGHT: int(rng.integers(100, 5000)),
                p.TRAIN_LOSS: float(rng.uniform(0.1, 1.0)),
                p.EPSILON: float(rng.uniform(0.5, 3.0)),
            }
        )
        content = RecordDict({p.ARRAYS_KEY: arrays, p.METRICS_KEY: metrics})
        messages.append(Message(content, reply_to=instruction))
    random.Random(seed).shuffle(messages)
    return strategy, messages


# --------------------------------------------------------------------- timing


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds one call of `fn` took (garbage collector off), and its result."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    return seconds, result


def run_round_robin(
    paths: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Time every path `repeats` times, interleaved (rotating order), after warm-up."""
    names = list(paths)
    for _ in range(warmup):
        for name in names:
            time_call(paths[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, _ = time_call(paths[name])
            times[name].append(seconds)
    return times


# --------------------------------------------------------------------- checks


def max_abs_diff(a: ArrayRecord, b: ArrayRecord) -> float:
    return max(
        float(np.max(np.abs(a[k].numpy().astype(np.float64) - b[k].numpy()))) for k in SHAPES
    )


def float64_reference(records: Sequence[ArrayRecord], weights: Sequence[float]) -> ArrayRecord:
    total = float(sum(weights))
    out = {}
    for key in SHAPES:
        acc = np.zeros(SHAPES[key], dtype=np.float64)
        for record, weight in zip(records, weights, strict=True):
            acc += array_view(record[key]) * (weight / total)
        out[key] = Array(acc)
    return ArrayRecord(out)


def same_bytes(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a) == list(b) and all(a[k].data == b[k].data for k in a)


def _load_average() -> str:
    loadavg = Path("/proc/loadavg")
    return loadavg.read_text(encoding="utf-8").split()[0] if loadavg.is_file() else "n/a"


# --------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per path (≥ 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per path first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error("--repeats must be at least 7")
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    # Flower logs one INFO line per aggregate_train call; keep the output readable.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    facts = machine_facts()
    print("# Aggregation benchmark (FedAvg)")
    print(format_machine_facts(facts, prefix="  "))

    build_start = time.perf_counter()
    consortia_strategy, replies = build_round(args.replies, args.seed)
    flower_strategy = FedAvg(
        weighted_by_key=p.WEIGHT, arrayrecord_key=p.ARRAYS_KEY, configrecord_key=p.CONFIG_KEY
    )
    contents = [reply.content for reply in replies]
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    views = [array_view(c[p.ARRAYS_KEY][k]) for c in contents for k in SHAPES]
    input_bytes = sum(v.nbytes for v in views)
    print(
        f"\n{args.replies} replies × {params:,} float32 parameters "
        f"({input_bytes / 1e6:,.1f} MB of input), built in "
        f"{time.perf_counter() - build_start:.1f} s; {args.warmup} warm-up + "
        f"{args.repeats} timed calls per path, interleaved\n"
    )

    def consortia_average() -> ArrayRecord:
        return weighted_average(
            [c[p.ARRAYS_KEY] for c in contents],
            [float(c[p.METRICS_KEY][p.WEIGHT]) for c in contents],
        )

    def read_numpy() -> float:
        return float(sum(float(np.add.reduce(v, axis=None)) for v in views))

    def read_torch() -> float:
        return float(sum(float(torch.from_numpy(v).sum()) for v in views))

    paths: dict[str, Callable[[], Any]] = {
        FLOWER_TRAIN: lambda: flower_strategy.aggregate_train(ROUND, replies),
        FLOWER_AVERAGE: lambda: aggregate_arrayrecords(contents, p.WEIGHT),
        CONSORTIA_AVERAGE: consortia_average,
        CONSORTIA_TRAIN: lambda: consortia_strategy.aggregate_train(ROUND, replies),
        BOUND_NUMPY: read_numpy,
        BOUND_TORCH: read_torch,
    }
    load_before = _load_average()
    run_start = time.perf_counter()
    times = run_round_robin(paths, args.warmup, args.repeats)
    timing_seconds = time.perf_counter() - run_start
    load_after = _load_average()

    bound = min(min(times[BOUND_NUMPY]), min(times[BOUND_TORCH]))
    rows = {}
    for name, samples in times.items():
        best, median = min(samples), statistics.median(samples)
        rows[name] = {
            "median_ms": median * 1e3,
            "best_ms": best * 1e3,
            "times_ms": [t * 1e3 for t in samples],
            "x_bound_best": best / bound,
            "x_bound_median": median / bound,
            "gb_per_s_best": input_bytes / best / 1e9,
            "gb_per_s_median": input_bytes / median / 1e9,
        }

    header = f"{'path':<46}{'median ms':>10}{'best ms':>10}{'× bound':>9}{'GB/s':>8}"
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(
            f"{name:<46}{row['median_ms']:>10.1f}{row['best_ms']:>10.1f}"
            f"{row['x_bound_median']:>9.2f}{row['gb_per_s_median']:>8.2f}"
        )
    print(
        f"(× bound and GB/s from medians; bound = best single read of the input, "
        f"{bound * 1e3:.1f} ms = {input_bytes / bound / 1e9:.2f} GB/s)"
    )

    noisy = [name for name, row in rows.items() if row["median_ms"] > 1.5 * row["best_ms"]]
    print(f"1-min load average before/after timing: {load_before} / {load_after}")
    if noisy:
        print(
            "WARNING: median > 1.5 × best for " + ", ".join(noisy) + ": something else "
            "competed for the CPU (multi-threaded torch suffers most); rerun on a quiet machine"
        )

    ratios = {}
    print(f"\n{'Speed-up (Flower ÷ consortia, same replies)':<62}{'median':>8}{'best':>8}")
    for flower, ours in (
        (FLOWER_TRAIN, CONSORTIA_AVERAGE),
        (FLOWER_TRAIN, CONSORTIA_TRAIN),
        (FLOWER_AVERAGE, CONSORTIA_AVERAGE),
    ):
        median = statistics.median(times[flower]) / statistics.median(times[ours])
        best = min(times[flower]) / min(times[ours])
        ratios[f"{flower} / {ours}"] = {"median": median, "best": best}
        label = f"{flower.removeprefix('flower ')} ÷ {ours.removeprefix('consortia ')}"
        print(f"  {label:<60}{median:>7.2f}×{best:>7.2f}×")

    # ------------------------------------------------------------- agreement
    weights = [float(c[p.METRICS_KEY][p.WEIGHT]) for c in contents]
    records = [c[p.ARRAYS_KEY] for c in contents]
    flower_arrays, _ = flower_strategy.aggregate_train(ROUND, replies)
    ours = consortia_average()
    ours_train, _ = consortia_strategy.aggregate_train(ROUND, replies)
    ours_train_reversed, _ = consortia_strategy.aggregate_train(ROUND, replies[::-1])
    reference = float64_reference(records, weights)
    checks = {
        "max_abs_diff_weighted_average_vs_flower_aggregate_train": max_abs_diff(
            ours, flower_arrays
        ),
        "max_abs_diff_consortia_aggregate_train_vs_flower_aggregate_train": max_abs_diff(
            ours_train, flower_arrays
        ),
        "max_abs_err_flower_vs_float64": max_abs_diff(flower_arrays, reference),
        "max_abs_err_weighted_average_vs_float64": max_abs_diff(ours, reference),
        "weighted_average_repeat_bit_identical": same_bytes(ours, consortia_average()),
        "consortia_aggregate_train_arrival_order_independent": same_bytes(
            ours_train, ours_train_reversed
        ),
    }
    agree = checks["max_abs_diff_weighted_average_vs_flower_aggregate_train"] < 1e-5
    agree_train = checks["max_abs_diff_consortia_aggregate_train_vs_flower_aggregate_train"] < 1e-5
    print("\nAgreement")
    for key, value in checks.items():
        shown = f"{value:.3e}" if isinstance(value, float) else str(value)
        print(f"  {key:<66}{shown}")
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"\nresults agree (< 1e-5): {agree and agree_train}; peak RSS {peak_rss_mb:,.0f} MB; "
        f"timing took {timing_seconds:.1f} s"
    )

    if args.json is not None:
        report = {
            "machine": facts,
            "config": {
                "replies": args.replies,
                "params_per_reply": params,
                "shapes": {k: list(s) for k, s in SHAPES.items()},
                "input_bytes": input_bytes,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "seed": args.seed,
                "torch_threads": torch.get_num_threads(),
            },
            "bound_ms": bound * 1e3,
            "paths": rows,
            "speedups": ratios,
            "checks": checks,
            "agree": agree and agree_train,
            "peak_rss_mb": peak_rss_mb,
            "load_average_1min": {"before": load_before, "after": load_after},
            "noisy_paths": noisy,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if not (agree and agree_train):
        raise SystemExit("consortia's and Flower's averages disagree by 1e-5 or more")


if __name__ == "__main__":
    main()
