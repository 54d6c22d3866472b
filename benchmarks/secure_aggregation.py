"""What consortia's secure aggregation costs per round, beside plain FedAvg and Flower's SecAgg+.

Same machine, same run of this script, same engine: Flower's simulation
(`run_simulation`, Ray, one CPU per virtual node), N nodes, a model of one
float32 array of P values, every node in every round, no training (each
node's update is `stock_secagg.node_delta`, so only the aggregation
machinery is measured). Four ways, each a fresh worker process:

* consortia plain   consortia's round (Message API, `server/rounds/exchange.py`,
                    `server/aggregation.weighted_average`), updates in the clear;
* consortia secure  `server/secure_aggregation.run_secure_round` against the
                    nodes' `client/secure_aggregation` stages: SecAgg+ with
                    the job defaults (k = 2⌈log2 N⌉ neighbours, t = ⌊k/2⌋ + 1,
                    32-bit words) and the range bound R = 1 (a DP job's bound
                    is of that order or larger; the step is R / ⌊(2^31 − 1)/N⌋);
* Flower plain and Flower SecAgg+ (num_shares 3, threshold 2), from
  `stock_secagg.py` (legacy `DefaultWorkflow` / `SecAggPlusWorkflow`).

A round is timed on the coordinator from building the train messages to the
new global model (for consortia secure: all four stages, unmasking and
decoding). Round 1 (actor warm-up) is dropped; the median of rounds 2.. is
reported. Every worker checks its final model against exact FedAvg (within
the quantization error for the secure runs), so a wrong sum reports no time.

    python benchmarks/secure_aggregation.py [--nodes 5,20,100]
        [--params 100000,1000000] [--rounds 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from stock_secagg import (  # this folder (run as a script)
    exact_fedavg,
    flower_run,
    initial_model,
    node_delta,
)
from worker_process import (
    WORKER_TIMEOUT_S,
    noted,
    prepare_worker,
    print_machine,
    run_worker_script,
    simulate,
)

BOUND = 10.0  # the range R of the secure runs: an L2 bound (a 1M-parameter update has norm ≈ 1)
_SCRIPT = Path(__file__).resolve()
_RUN: dict[str, Any] = {}


def consortia_run(
    nodes: int, params: int, *, secure: bool, rounds: int, neighbours: int | None = None
) -> dict[str, Any]:
    """One consortia run in a fresh worker process; its JSON report.

    `neighbours` (k) with t = ⌊k/2⌋ + 1; None: the job default k = 2⌈log2 N⌉.
    """
    command = [
        sys.executable,
        str(_SCRIPT),
        "--worker",
        *("--nodes", str(nodes), "--params", str(params), "--rounds", str(rounds)),
        *(["--secure"] if secure else []),
        *(["--neighbours", str(neighbours)] if neighbours is not None else []),
    ]
    return run_worker_script(command, "round_seconds")


# ------------------------------------------------------------------ the worker side


def _delta(message: Any, context: Any) -> np.ndarray:
    """The node's update this round (`stock_secagg.node_delta`, float32 as a real node's)."""
    from consortia.common import protocol as p

    partition = int(context.node_config["partition-id"])
    server_round = int(message.content[p.CONFIG_KEY][p.ROUND_KEY])
    size = message.content[p.ARRAYS_KEY]["w"].numpy().size  # stage 3 carries the model
    return node_delta(partition, server_round, size)


# The handlers live at module level, as consortia's own ClientApp does, so that Ray
# pickles them by reference (`secure_aggregation._train`), not by value on every message.
def _train(message: Any, context: Any) -> Any:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from consortia.common import protocol as p

    local = message.content[p.ARRAYS_KEY]["w"].numpy() + _delta(message, context)
    content = RecordDict(
        {
            p.ARRAYS_KEY: ArrayRecord({"w": Array(local)}),
            p.METRICS_KEY: MetricRecord({p.WEIGHT: 1.0}),
        }
    )
    return Message(content, reply_to=message)


def _secure(message: Any, context: Any) -> Any:
    from flwr.app import Message, MetricRecord, RecordDict

    from consortia.client import secure_aggregation as secagg
    from consortia.common import protocol as p
    from consortia.common.secagg.wire import SECAGG_KEY, Setup, read_stage

    request = read_stage(message.content[SECAGG_KEY])
    if isinstance(request, Setup):
        keys = secagg.begin_round(request, context.state)
        content = RecordDict({SECAGG_KEY: keys, p.METRICS_KEY: MetricRecord({p.WEIGHT: 1.0})})
        return Message(content, reply_to=message)
    content = secagg.answer(request, context.state, lambda: _delta(message, context))
    return Message(content, reply_to=message)


def _client_app() -> Any:
    from flwr.clientapp import ClientApp

    from consortia.common.secagg.wire import MESSAGE_ACTION

    app = ClientApp()
    app.train()(_train)
    app.train(MESSAGE_ACTION)(_secure)
    return app


def _server_app() -> Any:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.serverapp import Grid, ServerApp

    from consortia.common import protocol as p
    from consortia.common.config import SecureAggregationConfig
    from consortia.server.rounds.aggregation import weighted_average
    from consortia.server.rounds.exchange import exchange
    from consortia.server.rounds.secure_aggregation import run_secure_round

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes, secure = int(_RUN["nodes"]), bool(_RUN["secure"])
        while len(node_ids := sorted(grid.get_node_ids())) < nodes:
            time.sleep(0.05)
        arrays = ArrayRecord({"w": Array(initial_model(int(_RUN["params"])))})
        for server_round in range(1, int(_RUN["rounds"]) + 1):
            start = time.perf_counter()
            content = RecordDict(
                {p.ARRAYS_KEY: arrays, p.CONFIG_KEY: ConfigRecord({p.ROUND_KEY: server_round})}
            )
            messages = [Message(content, dst_node_id=n, message_type="train") for n in node_ids]
            if secure:
                outcome = run_secure_round(
                    grid,
                    messages,
                    arrays,
                    SecureAggregationConfig(neighbours=_RUN["neighbours"]),
                    context=f"benchmark round {server_round}",
                    timeout_s=WORKER_TIMEOUT_S,
                    bound_of=lambda reply: BOUND,
                )
                aggregated = outcome.aggregate(arrays)
                if aggregated is None or len(outcome.survivors) != nodes:
                    raise RuntimeError(
                        f"round {server_round}: {outcome.failure or outcome.dropped}"
                    )
                _RUN["error_bound"] = outcome.mean_error_bound
            else:
                replies = exchange(grid, messages, WORKER_TIMEOUT_S)
                if len(replies) != nodes:
                    raise RuntimeError(f"round {server_round}: {len(replies)} replies")
                aggregated = weighted_average(
                    [r.content[p.ARRAYS_KEY] for r in replies], [1.0] * nodes
                )
            arrays = aggregated
            _RUN["round_seconds"].append(time.perf_counter() - start)
        _RUN["final"] = arrays["w"].numpy()

    return app


def run_worker(
    nodes: int, params: int, *, secure: bool, rounds: int, neighbours: int | None
) -> dict[str, Any]:
    """Run one simulation in this process and check its final model."""
    from consortia.simulations.link_state import indexed_link_state

    prepare_worker()
    _RUN.clear()
    _RUN.update(locals(), round_seconds=[])
    with indexed_link_state():  # consortia's engine, as `consortia simulate` runs it
        simulate(_server_app(), _client_app(), nodes)
    final = _RUN.get("final")
    if final is None or len(_RUN["round_seconds"]) != rounds:
        raise RuntimeError("the run did not finish its rounds")
    error = float(np.max(np.abs(final.astype(np.float64) - exact_fedavg(nodes, params, rounds))))
    # float32 storage of the model each round, plus (secure) half a step per round.
    allowed = rounds * (float(_RUN.get("error_bound", 0.0)) + 1e-6)
    if not error <= allowed:
        raise RuntimeError(f"final model {error:.3g} from exact FedAvg (allowed {allowed:.3g})")
    return {
        "nodes": nodes,
        "params": params,
        "secure": secure,
        "neighbours": neighbours,
        "rounds": rounds,
        "round_seconds": list(_RUN["round_seconds"]),
        "max_abs_error": error,
    }


# ------------------------------------------------------------------ command line


def _int_list(text: str) -> list[int]:
    return [int(item.replace("_", "")) for item in text.split(",") if item.strip()]


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'nodes':>6} {'params':>10} {'plain':>7} {'secure':>7} {'ratio':>6}"
        f" {'k=2':>7} {'ratio':>6} {'flwr plain':>10} {'secagg+':>8} {'ratio':>6}"
        f" {'secagg+/secure':>14} {'secagg+/k=2':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cp, cs, c2, fp, fs = (
            row[k]["median"] for k in ("cplain", "csecure", "csecure2", "fplain", "fsecagg")
        )
        lines.append(
            f"{row['nodes']:>6} {row['params']:>10,} {cp:>7.3f} {cs:>7.3f} {cs / cp:>5.2f}x"
            f" {c2:>7.3f} {c2 / cp:>5.2f}x {fp:>10.3f} {fs:>8.3f} {fs / fp:>5.2f}x"
            f" {fs / cs:>13.2f}x {fs / c2:>10.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=_int_list, default=[5, 20, 100])
    parser.add_argument("--params", type=_int_list, default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=4, help="round 1 is the warm-up")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--secure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--neighbours", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report = run_worker(
            args.nodes[0],
            args.params[0],
            secure=args.secure,
            rounds=args.rounds,
            neighbours=args.neighbours,
        )
        print(json.dumps(report), flush=True)
        return
    rows = []
    for nodes in args.nodes:
        for params in args.params:
            row: dict[str, Any] = {"nodes": nodes, "params": params}
            runs = {
                "cplain": (consortia_run, {"secure": False}),
                "csecure": (consortia_run, {"secure": True}),
                "csecure2": (consortia_run, {"secure": True, "neighbours": 2}),
                "fplain": (flower_run, {"secagg": False}),
                "fsecagg": (flower_run, {"secagg": True}),
            }
            for key, (run, mode) in runs.items():
                report = run(nodes, params, rounds=args.rounds, **mode)  # type: ignore[operator]
                row[key] = noted(report, f"{nodes} x {params:,} {key}")
            rows.append(row)
    facts = print_machine()
    print(
        f"\nFlower simulation engine (Ray, 1 CPU per node), {args.rounds} rounds, median of "
        "rounds 2..; consortia secure: k = 2⌈log2 N⌉ (job default) and k = 2 (Flower's "
        "num_shares 3 = 2 neighbours), t = ⌊k/2⌋ + 1, 32-bit; Flower SecAgg+: num_shares 3, "
        "threshold 2\n"
    )
    print(_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": facts, "runs": rows}, indent=2))


if __name__ == "__main__":
    # Ray pickles the apps' functions by reference to their module: import it by name.
    import secure_aggregation

    secure_aggregation.main()
