"""Soak: a 20-round job on 10 nodes while nodes are killed, restarted and lost for good.

A consortium on loopback, built by `tests/consortium.py` as operators would
(TLS, node authentication, keys enrolled by `consortia coordinator nodes
add`, one `consortia node start` per node, each with its share of the breast
cancer records as its registered dataset and its own privacy ledger). One
job: an MLP, DP-SGD (target ε 2 over the run), federated evaluation,
submitted with `consortia job submit`. While it runs, from a seeded plan:

- two nodes are each killed (SIGKILL of the whole process tree: service,
  SuperNode, ClientApp worker) at a random moment of a random round, and
  started again from the same node.toml and state folder after a random
  pause;
- one node is killed for good at a random moment of another round.

Checked at the end, each a line of the report (and a non-zero exit if any
fails):
- the run finished (`consortia job status`: finished (completed)) with all
  rounds, and every round aggregated at least `update_checks.min_updates`;
- every ledger ≥ what was released: each node's ledger has an entry of this
  run for every round the coordinator aggregated its update (a killed node
  may have recorded a round it never sent: ≥, never <);
- `consortia audit verify` of the coordinator's log and of every node's log
  is ok;
- repeated with the same plan (`--repeat 2`): the models' sha256 are
  printed. They differ between repetitions, and must: a deployed node draws
  its DP-SGD noise from the operating system's CSPRNG (Opacus secure mode),
  never from a seed, or anyone who knew the seed could subtract the noise;
  and a kill lands at a moment in a round, so which nodes' updates that
  round aggregates depends on timing. The coordinator's part is
  deterministic given its inputs: `tests/test_coordinator_crash.py`
  checks a SIGKILL-and-resume ends on the byte-identical model.

    python benchmarks/soak.py [--nodes 10] [--rounds 20] [--seed 7] [--repeat 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the consortium harness: tests/consortium.py

from consortium import Consortium, cancer_sites, run_id_of, start_consortium  # noqa: E402
from federation import kill_tree, ledger_history, write_job  # noqa: E402

MIN_UPDATES = 2


@dataclass(frozen=True)
class Kill:
    """Kill `node` `after_s` seconds into round `round`; start it again `restart_s` later."""

    node: str
    round: int
    after_s: float
    restart_s: float | None  # None: killed for good


def plan(names: tuple[str, ...], rounds: int, seed: int) -> list[Kill]:
    """Two kill-and-restarts and one kill for good, in distinct nodes and rounds (seeded)."""
    rng = random.Random(seed)
    victims = rng.sample(names, 3)
    when = sorted(rng.sample(range(2, rounds - 2), 3))
    return [
        Kill(victims[0], when[0], round(rng.uniform(0.5, 3.0), 2), round(rng.uniform(1, 20), 1)),
        Kill(victims[1], when[1], round(rng.uniform(0.5, 3.0), 2), round(rng.uniform(1, 90), 1)),
        Kill(victims[2], when[2], round(rng.uniform(0.5, 3.0), 2), None),
    ]


def _round_started(log: Path, run_id: int, server_round: int) -> bool:
    """Whether the node's log says it admitted `server_round` of the run (it began training)."""
    if not log.exists():
        return False
    return f"run {run_id} round {server_round}: admitted" in log.read_text(errors="replace")


def _status(fed: Consortium, run_id: int) -> str:
    done = fed.consortia("job", "status", str(run_id), "--config", str(fed.config))
    return done.stdout


def one_repetition(root: Path, nodes: int, rounds: int, kills: list[Kill]) -> dict[str, object]:
    root.mkdir(parents=True)
    names = tuple(f"site-{i:02d}" for i in range(nodes))
    fed = Consortium(root)
    epochs = 1
    policy = f"max_local_epochs = {epochs}\n"
    node_tomls = cancer_sites(fed, names, 50.0, seed=3, policies={n: policy for n in names})
    job = write_job(
        root / "job.toml",
        2.0,
        name="soak",
        min_nodes=nodes,
        rounds=rounds,
        model="mlp",
        local_epochs=epochs,
        batch_size=16,
        learning_rate=0.1,
        round_timeout_s=300,
    )
    job.write_text(job.read_text() + f"\n[update_checks]\nmin_updates = {MIN_UPDATES}\n")
    events: list[str] = []
    try:
        start_consortium(fed, node_tomls)
        services = dict(zip(names, fed.processes[1:], strict=True))  # after the coordinator
        submitted = fed.consortia("job", "submit", str(job), "--config", str(fed.config))
        if submitted.returncode != 0:
            raise SystemExit(f"submit failed:\n{submitted.stdout}\n{submitted.stderr}")
        run_id = run_id_of(submitted)
        began = time.monotonic()

        def carry_out(kill: Kill) -> None:
            log = root / f"{kill.node}.log"
            while not _round_started(log, run_id, kill.round):
                if "finished" in _status(fed, run_id):
                    events.append(f"{kill.node}: the run ended before round {kill.round}")
                    return
                time.sleep(0.5)
            time.sleep(kill.after_s)
            kill_tree(services[kill.node])
            events.append(
                f"{time.monotonic() - began:7.1f} s: killed {kill.node} in round {kill.round}"
            )
            if kill.restart_s is None:
                return
            time.sleep(kill.restart_s)
            fed.start_node(node_tomls[kill.node], f"{kill.node}-restarted")
            events.append(f"{time.monotonic() - began:7.1f} s: restarted {kill.node}")

        threads = [threading.Thread(target=carry_out, args=(k,), daemon=True) for k in kills]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60 * 60
        while "finished" not in _status(fed, run_id):
            if time.monotonic() > deadline:
                raise SystemExit("the run did not finish within an hour")
            time.sleep(2)
        for thread in threads:
            thread.join(timeout=5)
        wall_s = time.monotonic() - began
        return _check(fed, run_id, names, node_tomls, rounds, events, wall_s)
    finally:
        fed.stop()


def _check(
    fed: Consortium,
    run_id: int,
    names: tuple[str, ...],
    node_tomls: dict[str, Path],
    rounds: int,
    events: list[str],
    wall_s: float,
) -> dict[str, object]:
    problems: list[str] = []
    status = _status(fed, run_id)
    if "finished (completed)" not in status:
        problems.append(f"run status: {status.strip()}")
    run_dir = fed.state / "runs" / f"run-{run_id}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    records = metrics["rounds"]
    if [r["round"] for r in records] != list(range(1, rounds + 1)):
        problems.append(f"rounds recorded: {[r['round'] for r in records]}")
    failures: dict[int, list[str]] = {}
    for record in records:
        if len(record["participants"]) < MIN_UPDATES:
            problems.append(f"round {record['round']}: {len(record['participants'])} updates")
        failures[record["round"]] = [f"{f['node']} ({f['kind']})" for f in record["failures"]]
    for name in names:
        recorded = {e.server_round for e in ledger_history(node_tomls[name], "cancer")}
        sent = {r["round"] for r in records if name in r["participants"]}
        if not sent <= recorded:
            problems.append(f"{name}: ledger lacks rounds {sorted(sent - recorded)}")
    logs = [fed.audit_log, *(t.parent / "state" / "audit.jsonl" for t in node_tomls.values())]
    for log in logs:
        done = fed.consortia("audit", "verify", str(log))
        if done.returncode != 0:
            problems.append(f"audit verify {log}: {(done.stdout + done.stderr).strip()}")
    models = sorted(run_dir.glob("**/*.safetensors")) or sorted(run_dir.glob("**/*.pt"))
    final = models[-1] if models else None
    return {
        "run_id": run_id,
        "wall_s": round(wall_s, 1),
        "events": events,
        "failures": {k: v for k, v in failures.items() if v},
        "participants": [len(r["participants"]) for r in records],
        "final_accuracy": records[-1].get("accuracy") if records else None,
        "model": None if final is None else final.name,
        "model_sha256": None if final is None else hashlib.sha256(final.read_bytes()).hexdigest(),
        "problems": problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    names = tuple(f"site-{i:02d}" for i in range(args.nodes))
    kills = plan(names, args.rounds, args.seed)
    print("plan:", *(vars(k) for k in kills), sep="\n  ", flush=True)
    results = []
    for repetition in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="soak-") as folder:
            result = one_repetition(Path(folder) / "consortium", args.nodes, args.rounds, kills)
        results.append(result)
        print(f"\nrepetition {repetition + 1}:", json.dumps(result, indent=1), flush=True)
    hashes = {r["model_sha256"] for r in results}
    print(
        f"\nfinal models: {len(hashes)} distinct sha256 over {len(results)} repetitions "
        "(DP noise from each node's CSPRNG and kill timing: see the module docstring)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"plan": [vars(k) for k in kills], "results": results}))
    failed = [p for r in results for p in r["problems"]]  # type: ignore[attr-defined]
    print("problems:", *failed, sep="\n  ") if failed else print("no problems")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
