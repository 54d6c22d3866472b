"""Benchmark runs in worker processes of their own: Ray up and down cleanly, nothing shared.

Each measured run is `python <script> --worker ...` in a new process group
(Ray's GCS, raylet and workers join it), with Flower's and Ray's state in
temporary folders and telemetry off; the worker prints one JSON object as
its last `{`-line, which `run_worker_script` returns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WORKER_TIMEOUT_S = 3600.0


def run_worker_script(command: list[str], result_key: str) -> dict[str, Any]:
    """Run one worker (`command`, a full argv); its JSON report, which must hold `result_key`."""
    with flower_environment() as env:
        stdout, stderr, returncode = run_in_own_group(command, env, WORKER_TIMEOUT_S)
    if returncode != 0:
        tail = "\n".join(stderr.splitlines()[-40:])
        raise RuntimeError(f"worker {' '.join(command[1:])} exited {returncode}:\n{tail}")
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            report = json.loads(line)
            if result_key in report:
                return dict(report)
    raise RuntimeError(f"worker printed no result; stdout:\n{stdout[-2000:]}")


def prepare_worker() -> None:
    """Inside a worker: telemetry off, Flower's and Ray's state in temp folders if unset."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # quiets a Ray warning
    for variable, prefix in (("FLWR_HOME", "flwr-"), ("RAY_TMPDIR", "ray-")):
        if not os.environ.get(variable):
            os.environ[variable] = tempfile.mkdtemp(prefix=prefix)


def simulate(server_app: Any, client_app: Any, nodes: int) -> float:
    """Flower's `run_simulation` with `one_cpu_per_node`, Flower's log quiet; its wall seconds."""
    import logging

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    start = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=nodes,
        backend_config=one_cpu_per_node(),
    )
    return time.perf_counter() - start


def noted(report: dict[str, Any], label: str) -> dict[str, Any]:
    """`report` with its `median` of rounds 2.. added, and a progress line on stderr."""
    seconds = [float(s) for s in report["round_seconds"]]
    report["median"] = statistics.median(seconds[1:] or seconds)
    print(f"{label}: rounds " + " ".join(f"{s:.2f}" for s in seconds), file=sys.stderr, flush=True)
    return report


def print_machine() -> dict[str, Any]:
    """Print this machine's facts (benchmarks/machine.py) and return them."""
    from machine import format_machine_facts, machine_facts  # this folder

    facts = machine_facts()
    print("machine:\n" + format_machine_facts(facts, "  "))
    return facts


def one_cpu_per_node() -> dict[str, Any]:
    """Flower's Ray backend config: one CPU per virtual node, Ray started as `consortia
    simulate` starts it (quiet, every core of this machine: `ray_init_args`)."""
    from consortia.common.config import BackendConfig
    from consortia.simulations.ray_start import ray_init_args

    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": ray_init_args(BackendConfig()),
    }


@contextmanager
def flower_environment() -> Iterator[dict[str, str]]:
    """The worker's environment: no telemetry, Flower's and Ray's state in temp folders.

    FLWR_HOME and RAY_TMPDIR are kept when already set (tests/conftest.py sets
    them); folders made here are removed afterwards.
    """
    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    made: list[str] = []
    for variable, prefix in (("FLWR_HOME", "flwr-"), ("RAY_TMPDIR", "ray-")):
        if not env.get(variable):
            # Short prefix: Ray's socket paths under RAY_TMPDIR must fit in 107 bytes.
            folder = tempfile.mkdtemp(prefix=prefix)
            made.append(folder)
            env[variable] = folder
    try:
        yield env
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def run_in_own_group(
    command: list[str], env: dict[str, str], timeout: float
) -> tuple[str, str, int]:
    """Run `command` as the leader of a new process group; stop the group if it lingers.

    Ray's processes (GCS, raylet, workers) start in the worker's group, so a
    worker that times out or is interrupted takes them with it instead of
    leaving a cluster behind.
    """
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(process)
        stdout, stderr = process.communicate()
        raise RuntimeError(f"worker ran past {timeout:.0f} s:\n{stderr[-2000:]}") from None
    except BaseException:
        _stop_group(process)
        process.communicate()
        raise
    _stop_group(process)  # anything of the worker's Ray left running
    return stdout, stderr, process.returncode


def _stop_group(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL, the process group that `process` leads (ours, by its id)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            process.poll()  # reap the leader: a zombie would keep the group alive
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
