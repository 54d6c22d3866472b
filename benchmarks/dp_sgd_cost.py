"""What DP-SGD costs per local epoch: each DP engine vs no DP.

For each default model of the bundled scenarios, on the real scikit-learn
data it trains on (the whole pool, not one node's share):

* logreg on breast-cancer (569 records, 30 features, 2 classes)
* mlp with hidden (64,) on digits (1,797 records, 1x8x8, 10 classes)
* cnn on digits (the image model; the fused path does not apply to it)

times one local epoch of `consortia.client.training.train_locally` in each
mode, with the same batch size and seed:

* plain   no DP (shuffled batches, plain SGD)
* fused   DP-SGD through `client/fused_dpsgd.py` (`dp_engine = "auto"`, the
          default for Linear-only models; skipped for the cnn)
* opacus  DP-SGD through Opacus' `PrivacyEngine`, per-sample hooks
          (`dp_engine = "opacus"`)
* ghost   Opacus' fast gradient (ghost) clipping (`dp_engine = "ghost"`)
* bmm     Opacus hooks with each Poisson batch processed in physical chunks
          of at most `--physical` records (`max_physical_batch_size`,
          Opacus' `BatchMemoryManager`)

Runs on the GPU when CUDA is present (`resolve_device("auto")`), else on the
CPU. Runs are round-robin (so drift in machine load hits all modes alike),
one torch thread as in the simulation, median over `--repeats` after a
warm-up. Also checks that every DP mode takes the same number of noisy steps
and ends on the same weights as the Opacus hooks run (same batches and noise).

    python benchmarks/dp_sgd_cost.py [--json PATH] [--repeats 11] [--physical 8]
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

from consortia.client import fused_dpsgd, training
from consortia.client.device import resolve_device
from consortia.common.config import DataConfig, ModelConfig, TrainingConfig
from consortia.common.models import build_model
from consortia.simulations.sources import load_source

MODES = ("plain", "fused", "opacus", "ghost", "bmm")
DP_MODES = MODES[1:]
REFERENCE = "opacus"  # every DP mode is compared with Opacus' hooks
DP = training.DpSettings(noise_multiplier=1.0, max_grad_norm=1.0)
BATCH_SIZE = 32
SEED = 7
DEVICE = resolve_device("auto")


@dataclass(frozen=True)
class Case:
    """One default model on the data its bundled scenario trains on."""

    label: str
    source: str
    model: ModelConfig


CASES = (
    Case("logreg / breast_cancer", "breast_cancer", ModelConfig(name="logreg")),
    Case("mlp(64) / digits", "digits", ModelConfig(name="mlp", hidden=(64,))),
    Case("cnn / digits", "digits", ModelConfig(name="cnn")),
)


def training_config(mode: str, physical: int) -> TrainingConfig:
    """The `TrainingConfig` that selects `mode` (the DP engine and chunking)."""
    engine = {"fused": "auto", "ghost": "ghost"}.get(mode, "opacus")
    return TrainingConfig(
        local_epochs=1,
        batch_size=BATCH_SIZE,
        learning_rate=0.5,
        dp_engine=engine,
        max_physical_batch_size=physical if mode == "bmm" else None,
    )


def modes_for(case: Case) -> tuple[str, ...]:
    """The modes that apply to `case`: the fused path only where it supports the model."""
    source = load_source(DataConfig(source=case.source))
    model = build_model(case.model, source.feature_shape, source.num_classes, seed=0)
    return tuple(m for m in MODES if m != "fused" or fused_dpsgd.supports_fused(model))


def run_epoch(
    case: Case, mode: str, physical: int
) -> tuple[float, torch.nn.Module, training.LocalTrainResult]:
    """Seconds for one `train_locally` epoch in `mode`, the trained model, its result."""
    source = load_source(DataConfig(source=case.source))
    model = build_model(case.model, source.feature_shape, source.num_classes, seed=0)
    config = training_config(mode, physical)
    dp = None if mode == "plain" else DP
    _synchronize()
    start = time.perf_counter()
    result = training.train_locally(model, source.pool, config, dp, seed=SEED, device=DEVICE)
    _synchronize()  # GPU kernels run asynchronously: time them to the end
    return time.perf_counter() - start, model, result


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def bench_case(case: Case, repeats: int, physical: int) -> dict[str, Any]:
    """Median ms per epoch for every mode, their ratios and an agreement check."""
    modes = modes_for(case)
    for mode in modes:  # warm-up: data cache, lazy imports, allocator, CUDA context
        run_epoch(case, mode, physical)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        shift = repeat % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            times[mode].append(run_epoch(case, mode, physical)[0])
    finals = {mode: run_epoch(case, mode, physical)[1:] for mode in modes if mode != "plain"}
    reference_model, reference_result = finals[REFERENCE]
    max_diff = {
        mode: max(
            float((a - b).abs().max())
            for a, b in zip(model.parameters(), reference_model.parameters(), strict=True)
        )
        for mode, (model, _) in finals.items()
        if mode != REFERENCE
    }
    median_ms = {mode: statistics.median(values) * 1e3 for mode, values in times.items()}
    n = len(load_source(DataConfig(source=case.source)).pool)
    return {
        "case": case.label,
        "records": n,
        "batch_size": BATCH_SIZE,
        "max_physical_batch_size": physical,
        "steps_per_epoch": reference_result.steps,
        "expected_steps": math.ceil(n / BATCH_SIZE),
        "median_ms": median_ms,
        "min_ms": {mode: min(values) * 1e3 for mode, values in times.items()},
        "ratio_vs_plain": {mode: median_ms[mode] / median_ms["plain"] for mode in median_ms},
        "max_abs_weight_diff_vs_opacus": max_diff,
        "same_steps_all_dp_modes": len({r.steps for _, r in finals.values()}) == 1,
        "same_sample_rate_all_dp_modes": len({r.sample_rate for _, r in finals.values()}) == 1,
    }


def _cell(values: dict[str, float], mode: str, spec: str, suffix: str = "") -> str:
    return f"{values[mode]:{spec}}{suffix}" if mode in values else "-"


def print_table(results: list[dict[str, Any]]) -> None:
    """Milliseconds per epoch, ratios to no DP, and agreement with the Opacus run."""
    ms_heads = [f"{mode} ms" for mode in MODES]
    ratio_heads = [f"{mode}/plain" for mode in DP_MODES]
    header = f"{'model / data':<24} {'steps':>5} " + " ".join(
        f"{h:>12}" for h in ms_heads + ratio_heads
    )
    print(header)
    print("-" * len(header))
    for row in results:
        ms, ratio = row["median_ms"], row["ratio_vs_plain"]
        cells = [_cell(ms, mode, ".2f") for mode in MODES]
        cells += [_cell(ratio, mode, ".2f", "x") for mode in DP_MODES]
        print(
            f"{row['case']:<24} {row['steps_per_epoch']:>5} " + " ".join(f"{c:>12}" for c in cells)
        )
    print()
    agree_modes = [m for m in DP_MODES if m != REFERENCE]
    header = f"{'model / data':<24} {'same steps':>10} " + " ".join(
        f"{'max|dw| ' + m:>14}" for m in agree_modes
    )
    print(header)
    print("-" * len(header))
    for row in results:
        diffs = row["max_abs_weight_diff_vs_opacus"]
        same = "yes" if row["same_steps_all_dp_modes"] else "NO"
        print(
            f"{row['case']:<24} {same:>10} "
            + " ".join(f"{_cell(diffs, m, '.1e'):>14}" for m in agree_modes)
        )
    print(
        "\nmax|dw|: largest weight difference from the Opacus hooks run (same seed, same "
        "batches and noise); same steps: every DP mode took the same number of noisy steps"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--repeats", type=int, default=11, help="timed epochs per mode (>= 7)")
    parser.add_argument(
        "--physical", type=int, default=8, help="max physical batch size of the bmm mode"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=[case.model.name for case in CASES],
        default=[case.model.name for case in CASES],
        help="models to time (default: all)",
    )
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error("--repeats must be at least 7")
    if not 1 <= args.physical < BATCH_SIZE:
        parser.error(f"--physical must be between 1 and {BATCH_SIZE - 1} (the batch size)")

    warnings.filterwarnings("ignore")  # Opacus' per-call notices (secure RNG, hooks)
    logging.getLogger("opacus").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as every simulated node does
    facts = machine_facts()
    facts["device"] = (
        f"cuda ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else "cpu"
    )
    print(format_machine_facts(facts, prefix="# "))
    print(
        f"# one local epoch of train_locally on {DEVICE.type}, batch size {BATCH_SIZE}, "
        f"bmm physical batch {args.physical}, noise multiplier {DP.noise_multiplier}, "
        f"max grad norm {DP.max_grad_norm}, median of {args.repeats} after a warm-up\n"
    )

    cases = [case for case in CASES if case.model.name in args.cases]
    results = [bench_case(case, args.repeats, args.physical) for case in cases]
    print_table(results)

    if args.json:
        payload = {
            "machine": facts,
            "settings": {
                "device": DEVICE.type,
                "batch_size": BATCH_SIZE,
                "max_physical_batch_size": args.physical,
                "local_epochs": 1,
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
