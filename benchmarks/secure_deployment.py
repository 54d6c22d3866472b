"""A deployed round with and without secure aggregation: real SuperLink, SuperNodes, TLS.

One consortium on loopback, built by `tests/consortium.py` (TLS from
`consortia provision`, node authentication, three nodes with the breast
cancer records in thirds, each its own registered dataset and ledger), runs
the same job twice through `consortia job submit --wait`: plain, then with
`[secure_aggregation]` (job defaults: k = n − 1 = 2, t = 2, 32-bit words).
The job: logreg, DP-SGD (target ε 1 over the run), federated evaluation.

Per round, the coordinator's wall time (`rounds[].seconds` of metrics.json:
train, aggregation, evaluation, checkpoint; for the secure job the train
part is the four SecAgg+ exchanges). Reported: the median of rounds 2..
(round 1 includes each node's noise calibration) and the ratio.

    python benchmarks/secure_deployment.py [--rounds 6] [--local-epochs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the consortium harness: tests/consortium.py

from consortium import Consortium, cancer_sites, run_id_of, start_consortium  # noqa: E402
from federation import write_job  # noqa: E402
from worker_process import print_machine  # noqa: E402

NODES = ("st-mary", "riverside", "northgate")


def run_jobs(root: Path, rounds: int, local_epochs: int) -> dict[str, list[float]]:
    """Round seconds of the plain and the secure job on one fresh consortium."""
    root.mkdir(parents=True)
    consortium = Consortium(root)
    node_tomls = cancer_sites(consortium, NODES, budget=100.0)
    for toml in node_tomls.values():  # allow the job's epochs
        toml.write_text(toml.read_text().replace("[policy]\n", "[policy]\nmax_local_epochs = 50\n"))
    seconds: dict[str, list[float]] = {}
    try:
        start_consortium(consortium, node_tomls)
        for mode in ("plain", "secure"):
            job = write_job(
                root / f"{mode}.toml",
                1.0,
                name=f"latency-{mode}",
                rounds=rounds,
                local_epochs=local_epochs,
            )
            if mode == "secure":
                job.write_text(job.read_text() + "\n[secure_aggregation]\n")
            submitted = consortium.submit(job)
            if submitted.returncode != 0:
                raise SystemExit(f"{mode}: the job failed\n{submitted.stdout}\n{submitted.stderr}")
            run_dir = consortium.state / "runs" / f"run-{run_id_of(submitted)}"
            metrics = json.loads((run_dir / "metrics.json").read_text())
            for record in metrics["rounds"]:
                if sorted(record["participants"]) != sorted(NODES):
                    raise SystemExit(f"{mode}: round {record['round']} lacks a node: {record}")
            seconds[mode] = [float(r["seconds"]) for r in metrics["rounds"]]
    finally:
        consortium.stop()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="secdep-") as folder:
        seconds = run_jobs(Path(folder) / "consortium", args.rounds, args.local_epochs)
    facts = print_machine()
    median = {mode: statistics.median(s[1:] or s) for mode, s in seconds.items()}
    print(f"\n3 nodes on loopback, TLS + node auth, logreg, {args.local_epochs} local epochs")
    for mode, values in seconds.items():
        rounds = " ".join(f"{s:.2f}" for s in values)
        print(f"{mode:>7}: rounds {rounds} s, median {median[mode]:.3f} s")
    print(f"  ratio: {median['secure'] / median['plain']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": facts, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
