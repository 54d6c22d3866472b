"""One Ray for many simulations: a head on this machine that a sweep's runs all join.

Flower's Ray backend ends every simulation with `ray.shutdown()`
(`RayBackend.terminate`), and a Ray that the calling process started dies
with that call: run one after another in one process, each simulation would
start Ray again (10–15 s on a loaded 2-core machine, as long as a run's
rounds). So a sweep starts Ray once, in a child process (the head), and runs
each simulation as a driver that joins it by address, as `--ray-address`
joins a cluster (0.2 s): a run's `ray.shutdown()` then only disconnects.

Each run is still a Ray job of its own: its actors are owned by the run's
driver, run in worker processes started for that job, and end when the run
disconnects; the next run starts fresh actors, so no node state crosses
from one run to the next.

Free of torch and Flower imports; the head process imports only Ray.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from consortia.common.errors import FederationError

# The head shuts Ray down within seconds once told; past this it is killed.
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RayHead:
    """A Ray started on this machine for several simulations; `address` is its GCS."""

    address: str
    process: subprocess.Popen[str]

    def check_running(self) -> None:
        """Fail with one message, not minutes of Ray's retries, where the head has exited."""
        code = self.process.poll()
        if code is not None:
            raise FederationError(
                f"the Ray this sweep started (process {self.process.pid}) exited with code "
                f"{code}; the runs after it cannot run (the finished ones are written)"
            )


@contextmanager
def ray_head(init_args: dict[str, Any]) -> Iterator[RayHead]:
    """Start Ray with `init_args` (`ray.init`'s) in a child process; stop it on exit.

    The head stops when its stdin closes: here on exit, or when this process
    dies whatever the way, so no Ray outlives the sweep that started it.
    """
    with tempfile.TemporaryFile(mode="w+") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, json.dumps(init_args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            address = process.stdout.readline().strip() if process.stdout else ""
            if not address:
                process.wait()
                errors.seek(0)
                last = errors.read().strip().splitlines()[-1:] or ["no message"]
                raise FederationError(
                    f"Ray did not start (exit code {process.returncode}): {last[0]}"
                )
            yield RayHead(address, process)
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()  # the head's cue to shut Ray down
    try:
        process.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _serve(init_args: dict[str, Any]) -> None:
    """The head: start Ray, print its address, hold it until stdin closes."""
    # Ctrl-C reaches the whole process group; the sweep decides when Ray stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import ray

    ray.init(**init_args)
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()
    ray.shutdown()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
