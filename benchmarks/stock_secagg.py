"""What Flower's own SecAgg+ costs per round, against plain FedAvg, in Flower's simulation.

The reference point for secure aggregation: stock Flower, nothing of
consortia. For N virtual nodes and a model of P float32 parameters (one
array), two runs of `flwr.simulation.run_simulation` (Ray backend, one CPU
per virtual node) with Flower's legacy workflow API (`LegacyContext` +
`DefaultWorkflow` + `flwr.server.strategy.FedAvg`, every node every round):

* plain   the default fit workflow;
* secagg  `SecAggPlusWorkflow(num_shares, reconstruction_threshold)` as the
          fit workflow, `secaggplus_mod` on the ClientApp (num_shares=3,
          reconstruction_threshold=2 unless told otherwise).

The ClientApp does no training, so that the figures are of the aggregation
machinery alone (messages, Ray, SecAgg+'s four stages, the averaging): its
fit returns the received parameters plus 0.001 x a standard normal drawn
from a generator seeded with (partition id, round), and reports one example
(every node weighs the same). Evaluation is off (`fraction_evaluate=0`, no
`evaluate_fn`).

How one round is timed. `DefaultWorkflow` runs, per round, the fit workflow,
then centralized evaluation, then the evaluate workflow. The fit workflow is
wrapped (`_TimedFit`), and a round's time is the wall time of that call: from
`configure_fit` through every message exchange (for SecAgg+: setup, share
keys, collect masked vectors, unmask) to `aggregate_fit` and the new global
parameters stored in the context. The other two steps do nothing here (no
`evaluate_fn`; `configure_evaluate` selects no node), so the wrapped call is
the whole round, without the run's start-up (Ray, actors, the initial
parameters) and tear-down. Round 1 also pays the first ClientApp load in each
Ray actor, so the reported figure is the median of rounds 2.. (round 1 only
when a single round ran).

What to expect of small runs: every `send_and_receive` pays Flower's
in-memory polling (the simulation engine looks for new instructions every
0.1 s, the in-memory grid for replies every 0.1 s), and a SecAgg+ round is
four such exchanges where a plain round is one; so SecAgg+ has a floor of
about 0.5 s a round, before any cryptography, and the ratio at small P is
mostly that floor.

SecAgg+ quantizes what a node uploads: it multiplies the parameters (not the
update) by num_examples / max_weight, clips every value to
[-clipping_range, clipping_range] *without a warning*, and quantizes to
integers. Here num_examples = max_weight = 1, so the clip applies to the
parameter values themselves; the initial model is 0.1 x a standard normal
(|values| < 1 at P = 1e7) and CLIPPING_RANGE is 8, Flower's default, far
above it. Each worker also checks the result: it recomputes the exact FedAvg
model (initial + the mean delta of every round) and fails if the run's final
global model is further from it than SecAgg+'s quantization can explain, so a
run that clipped (or otherwise aggregated wrongly) reports no time.

Each run is a fresh `python benchmarks/stock_secagg.py --worker ...`
subprocess (printing one JSON object on stdout), so that Ray is started and
torn down cleanly and runs cannot interfere:

    python benchmarks/stock_secagg.py [--nodes 5,20] [--params 100000,1000000]
        [--rounds 3] [--num-shares 3] [--threshold 2] [--json PATH]

From Python (with this folder importable)::

    from stock_secagg import flower_round_seconds
    flower_round_seconds(5, 100_000, secagg=True)  # [round 1 s, round 2 s, round 3 s]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from worker_process import (  # this folder
    noted,
    prepare_worker,
    print_machine,
    run_worker_script,
    simulate,
)

# SecAgg+ clips uploaded values to [-CLIPPING_RANGE, CLIPPING_RANGE] silently; see above.
CLIPPING_RANGE = 8.0
# Flower's defaults, named here because the result check depends on them.
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
INITIAL_SCALE = 0.1  # the initial model: INITIAL_SCALE x standard normal, seed INITIAL_SEED
INITIAL_SEED = 0
DELTA_SCALE = 1e-3  # each node's "update": DELTA_SCALE x standard normal
# A run that has not finished by then is stopped (its whole process group).

_SCRIPT = Path(__file__).resolve()
_RESULT_KEY = "round_seconds"


# ------------------------------------------------------------------ public API


def flower_round_seconds(nodes: int, params: int, *, secagg: bool, **settings: int) -> list[float]:
    """Per-round wall times (all rounds, round 1 first) of one Flower simulation run.

    `settings`: `flower_run`'s rounds, num_shares and threshold.
    """
    result = flower_run(nodes, params, secagg=secagg, **settings)
    return [float(seconds) for seconds in result[_RESULT_KEY]]


def flower_run(
    nodes: int,
    params: int,
    *,
    secagg: bool,
    rounds: int = 3,
    num_shares: int = 3,
    threshold: int = 2,
) -> dict[str, Any]:
    """One run in a fresh worker process; its whole JSON report (times, error, dtype).

    Besides `round_seconds`: `max_abs_error` (final global model against the
    exact FedAvg result), `global_dtype` (the dtype Flower keeps the global
    model in), `run_seconds` (the whole `run_simulation` call).
    """
    if nodes < 2 or params < 1 or rounds < 1:
        raise ValueError("need nodes >= 2 (SecAgg+ needs two), params >= 1 and rounds >= 1")
    command = [
        sys.executable,
        str(_SCRIPT),
        "--worker",
        *("--nodes", str(nodes), "--params", str(params), "--rounds", str(rounds)),
        *("--num-shares", str(num_shares), "--threshold", str(threshold)),
        *(["--secagg"] if secagg else []),
    ]
    return run_worker_script(command, _RESULT_KEY)


def median_after_warmup(round_seconds: list[float]) -> float:
    """Median of rounds 2.. (round 1 pays the ClientApp's first load); round 1 if alone."""
    kept = round_seconds[1:] or round_seconds
    return statistics.median(kept)


# ------------------------------------------------------------------ the parent side


# ------------------------------------------------------------------ the model and updates


def initial_model(params: int) -> np.ndarray:
    """The one float32 array the run starts from."""
    rng = np.random.default_rng(INITIAL_SEED)
    return (INITIAL_SCALE * rng.standard_normal(params, dtype=np.float32)).astype(np.float32)


def node_delta(partition: int, server_round: int, params: int) -> np.ndarray:
    """What node `partition` adds to the global model in `server_round` (deterministic)."""
    rng = np.random.default_rng([partition, server_round])
    return (DELTA_SCALE * rng.standard_normal(params, dtype=np.float32)).astype(np.float32)


def exact_fedavg(nodes: int, params: int, rounds: int) -> np.ndarray:
    """The global model after `rounds` rounds of exact FedAvg (equal weights), float64."""
    model = initial_model(params).astype(np.float64)
    for server_round in range(1, rounds + 1):
        total = np.zeros(params, dtype=np.float64)
        for partition in range(nodes):
            total += node_delta(partition, server_round, params)
        model += total / nodes
    return model


def error_bound(rounds: int) -> float:
    """How far SecAgg+'s result may be from exact FedAvg without anything being wrong.

    Stochastic rounding moves each uploaded value by less than one step,
    2 x clipping_range / quantization_range, so the mean by less than one step
    per round; errors add up over rounds. Twice that, plus float32 round-off.
    """
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    return 2 * rounds * step + 1e-5


# ------------------------------------------------------------------ the Flower apps (worker side)


class _TimedFit:
    """A fit workflow that records its own wall time: one round, see the module docstring."""

    def __init__(self, inner: Any, seconds: list[float]) -> None:
        self.inner = inner
        self.seconds = seconds

    def __call__(self, grid: Any, context: Any) -> None:
        start = time.perf_counter()
        self.inner(grid, context)
        self.seconds.append(time.perf_counter() - start)


_RUN: dict[str, Any] = {}  # the worker's settings and results; the ServerApp runs in a thread


def _client_fn(context: Any) -> Any:
    """A NumPyClient that 'trains' by adding its deterministic delta."""
    from flwr.client import NumPyClient

    partition = int(context.node_config["partition-id"])

    class _Client(NumPyClient):
        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            # float32 like a real model's load: SecAgg+ hands back float64 (see the report).
            received = np.asarray(parameters[0], dtype=np.float32)
            server_round = int(config["round"])
            return [received + node_delta(partition, server_round, received.size)], 1, {}

    return _Client().to_client()


def _build_client_app(secagg: bool) -> Any:
    from flwr.client import ClientApp
    from flwr.client.mod import secaggplus_mod

    return ClientApp(client_fn=_client_fn, mods=[secaggplus_mod] if secagg else [])


def _build_server_app() -> Any:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    server = ServerApp()

    @server.main()
    def serve(grid: Any, context: Any) -> None:
        nodes, params = int(_RUN["nodes"]), int(_RUN["params"])
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=nodes,
            min_evaluate_clients=0,
            min_available_clients=nodes,
            initial_parameters=ndarrays_to_parameters([initial_model(params)]),
            on_fit_config_fn=lambda server_round: {"round": server_round},
        )
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=int(_RUN["rounds"])),
            strategy=strategy,
        )
        inner: Any = None  # None: DefaultWorkflow's own default_fit_workflow
        if _RUN["secagg"]:
            inner = SecAggPlusWorkflow(
                num_shares=int(_RUN["num_shares"]),
                reconstruction_threshold=int(_RUN["threshold"]),
                max_weight=1.0,  # = each node's num_examples: the clip applies to the values
                clipping_range=CLIPPING_RANGE,
                quantization_range=QUANTIZATION_RANGE,
                modulus_range=MODULUS_RANGE,
            )
        else:
            from flwr.server.workflow.default_workflows import default_fit_workflow

            inner = default_fit_workflow
        DefaultWorkflow(fit_workflow=_TimedFit(inner, _RUN["round_seconds"]))(grid, legacy)
        record = legacy.state.array_records[MAIN_PARAMS_RECORD]
        arrays = [array.numpy() for array in record.values()]
        _RUN["final"] = arrays[0] if len(arrays) == 1 else None

    return server


def run_worker(
    nodes: int, params: int, *, secagg: bool, rounds: int, num_shares: int, threshold: int
) -> dict[str, Any]:
    """Run one simulation in this process (call it once per process) and check its result."""
    prepare_worker()
    _RUN.clear()
    _RUN.update(locals(), round_seconds=[], final=None)
    run_seconds = simulate(_build_server_app(), _build_client_app(secagg), nodes)
    round_seconds = list(_RUN["round_seconds"])
    final = _RUN["final"]
    if len(round_seconds) != rounds or final is None:
        raise RuntimeError(
            f"the run timed {len(round_seconds)} of {rounds} rounds"
            + ("" if final is not None else " and left no single-array global model")
        )
    error = float(np.max(np.abs(final.astype(np.float64) - exact_fedavg(nodes, params, rounds))))
    bound = error_bound(rounds) if secagg else 1e-5
    if not error <= bound:
        raise RuntimeError(
            f"final global model is {error:.3g} from exact FedAvg (allowed {bound:.3g}):"
            " values clipped by SecAgg+, or a wrong aggregate"
        )
    return {
        "nodes": nodes,
        "params": params,
        "secagg": secagg,
        "num_shares": num_shares if secagg else None,
        "threshold": threshold if secagg else None,
        "rounds": rounds,
        _RESULT_KEY: round_seconds,
        "run_seconds": run_seconds,
        "max_abs_error": error,
        "global_dtype": str(final.dtype),
    }


# ------------------------------------------------------------------ command line


def _int_list(text: str) -> list[int]:
    return [int(item.replace("_", "")) for item in text.split(",") if item.strip()]


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'nodes':>6} {'params':>10} {'plain s':>9} {'secagg s':>9} {'ratio':>7}"
        f" {'plain rounds s':>22} {'secagg rounds s':>24} {'secagg err':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        plain, secure = row["plain"], row["secagg"]
        lines.append(
            f"{row['nodes']:>6} {row['params']:>10,} {plain['median']:>9.3f}"
            f" {secure['median']:>9.3f} {secure['median'] / plain['median']:>6.1f}x"
            f" {_rounds(plain['round_seconds']):>22} {_rounds(secure['round_seconds']):>24}"
            f" {secure['max_abs_error']:>10.1e}"
        )
    return "\n".join(lines)


def _rounds(seconds: list[float]) -> str:
    return " ".join(f"{s:.2f}" for s in seconds)


def main() -> None:
    """Plain FedAvg against SecAgg+ for every nodes x params pair; prints a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=_int_list, default=[5, 20], help="comma list")
    parser.add_argument("--params", type=_int_list, default=[100_000, 1_000_000], help="ditto")
    parser.add_argument("--rounds", type=int, default=3, help="round 1 is the warm-up")
    parser.add_argument("--num-shares", type=int, default=3)
    parser.add_argument("--threshold", type=int, default=2, help="reconstruction threshold")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--secagg", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = {"rounds": args.rounds, "num_shares": args.num_shares, "threshold": args.threshold}
    if args.worker:
        if len(args.nodes) != 1 or len(args.params) != 1:
            parser.error("--worker takes one --nodes and one --params")
        report = run_worker(args.nodes[0], args.params[0], secagg=args.secagg, **settings)
        print(json.dumps(report), flush=True)
        return

    rows: list[dict[str, Any]] = []
    for nodes in args.nodes:
        for params in args.params:
            row: dict[str, Any] = {"nodes": nodes, "params": params}
            for mode, secagg in (("plain", False), ("secagg", True)):
                report = flower_run(nodes, params, secagg=secagg, **settings)
                label = f"{nodes} nodes x {params:,} params {mode} ({report['global_dtype']})"
                row[mode] = noted(report, label)
            rows.append(row)
    facts = print_machine()
    print(
        f"\nFlower simulation (Ray, 1 CPU per node), FedAvg, {args.rounds} rounds;"
        f" median round time of rounds 2..; SecAgg+ num_shares={args.num_shares},"
        f" threshold={args.threshold}, clipping_range={CLIPPING_RANGE}\n"
    )
    print(_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": facts, "runs": rows}, indent=2))


if __name__ == "__main__":
    # Ray pickles the ClientApp's functions by reference to their module: run
    # from the importable module (this folder reaches Ray's workers through
    # the PYTHONPATH Flower's Ray backend builds from sys.path), not `__main__`.
    import stock_secagg

    stock_secagg.main()
