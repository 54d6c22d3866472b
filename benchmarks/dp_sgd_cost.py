"""What DP-SGD costs per local epoch: fused path vs plain Opacus vs no DP.

For each default model of the bundled scenarios, on the real scikit-learn
data it trains on (the whole pool, not one node's share):

* logreg on breast-cancer (569 records, 30 features, 2 classes)
* mlp with hidden (64,) on digits (1,797 records, 1x8x8, 10 classes)

times one local epoch of `consortia.client.training.train_locally` three ways,
with the same batch size and seed:

* fused   DP-SGD through `client/fused_dpsgd.py` (the default for these models)
* opacus  DP-SGD through Opacus' `PrivacyEngine` (hooks mode), forced with
          `training.USE_FUSED_DP_SGD = False`
* plain   no DP (shuffled batches, plain SGD)

Runs are round-robin (so drift in machine load hits all three alike), one
thread as in the simulation, median over `--repeats` after a warm-up. Also
checks that fused and Opacus end on the same weights (same batches and noise).

    python benchmarks/dp_sgd_cost.py [--json PATH] [--repeats 11]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from machine import format_machine_facts, machine_facts

from consortia.client import training
from consortia.common.config import DataConfig, ModelConfig, TrainingConfig
from consortia.common.datasets import load_source
from consortia.common.models import build_model

MODES = ("plain", "fused", "opacus")
DP = training.DpSettings(noise_multiplier=1.0, max_grad_norm=1.0)
TRAINING = TrainingConfig(local_epochs=1, batch_size=32, learning_rate=0.5)
SEED = 7
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    """One default model on the data its bundled scenario trains on."""

    label: str
    source: str
    model: ModelConfig


CASES = (
    Case("logreg / breast_cancer", "breast_cancer", ModelConfig(name="logreg")),
    Case("mlp(64) / digits", "digits", ModelConfig(name="mlp", hidden=(64,))),
)


def run_epoch(case: Case, mode: str) -> tuple[float, torch.nn.Module, training.LocalTrainResult]:
    """Seconds for one `train_locally` epoch in `mode`, the trained model, its result."""
    source = load_source(DataConfig(source=case.source))
    model = build_model(case.model, source.feature_shape, source.num_classes, seed=0)
    training.USE_FUSED_DP_SGD = mode != "opacus"
    try:
        start = time.perf_counter()
        result = training.train_locally(
            model, source.pool, TRAINING, None if mode == "plain" else DP, seed=SEED, device=CPU
        )
        elapsed = time.perf_counter() - start
    finally:
        training.USE_FUSED_DP_SGD = True
    return elapsed, model, result


def bench_case(case: Case, repeats: int) -> dict[str, Any]:
    """Median ms per epoch for every mode, their ratios and an agreement check."""
    for mode in MODES:  # warm-up: data cache, lazy imports, allocator
        run_epoch(case, mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(repeats):
        order = MODES[repeat % 3 :] + MODES[: repeat % 3]
        for mode in order:
            times[mode].append(run_epoch(case, mode)[0])
    _, fused_model, fused_result = run_epoch(case, "fused")
    _, opacus_model, opacus_result = run_epoch(case, "opacus")
    max_diff = max(
        float((a - b).abs().max())
        for a, b in zip(fused_model.parameters(), opacus_model.parameters(), strict=True)
    )
    median_ms = {mode: statistics.median(values) * 1e3 for mode, values in times.items()}
    n = len(load_source(DataConfig(source=case.source)).pool)
    return {
        "case": case.label,
        "records": n,
        "batch_size": TRAINING.batch_size,
        "steps_per_epoch": fused_result.steps,
        "expected_steps": math.ceil(n / TRAINING.batch_size),
        "median_ms": median_ms,
        "min_ms": {mode: min(values) * 1e3 for mode, values in times.items()},
        "ratio_fused_vs_plain": median_ms["fused"] / median_ms["plain"],
        "ratio_opacus_vs_plain": median_ms["opacus"] / median_ms["plain"],
        "speedup_fused_vs_opacus": median_ms["opacus"] / median_ms["fused"],
        "max_abs_weight_diff_fused_vs_opacus": max_diff,
        "same_steps_fused_and_opacus": fused_result.steps == opacus_result.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=11, help="timed epochs per mode (>= 7)")
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error("--repeats must be at least 7")

    warnings.filterwarnings("ignore")  # Opacus' per-call notices (secure RNG, hooks)
    logging.getLogger("opacus").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as every simulated node does
    facts = machine_facts()
    print(format_machine_facts(facts, prefix="# "))
    print(
        f"# one local epoch of train_locally, batch size {TRAINING.batch_size}, "
        f"noise multiplier {DP.noise_multiplier}, max grad norm {DP.max_grad_norm}, "
        f"median of {args.repeats} after a warm-up\n"
    )

    results = [bench_case(case, args.repeats) for case in CASES]

    header = (
        f"{'model / data':<24} {'steps':>5} {'plain ms':>9} {'fused ms':>9} {'opacus ms':>10} "
        f"{'fused/plain':>12} {'opacus/plain':>13} {'opacus/fused':>13} {'max|dw|':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        ms = row["median_ms"]
        print(
            f"{row['case']:<24} {row['steps_per_epoch']:>5} {ms['plain']:>9.2f} "
            f"{ms['fused']:>9.2f} {ms['opacus']:>10.2f} {row['ratio_fused_vs_plain']:>11.2f}x "
            f"{row['ratio_opacus_vs_plain']:>12.2f}x {row['speedup_fused_vs_opacus']:>12.2f}x "
            f"{row['max_abs_weight_diff_fused_vs_opacus']:>9.1e}"
        )
    print("\nmax|dw|: largest weight difference between the fused and the Opacus run (same seed)")

    if args.json:
        payload = {
            "machine": facts,
            "settings": {
                "batch_size": TRAINING.batch_size,
                "local_epochs": TRAINING.local_epochs,
                "noise_multiplier": DP.noise_multiplier,
                "max_grad_norm": DP.max_grad_norm,
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
            },
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
