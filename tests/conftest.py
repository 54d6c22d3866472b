"""Test-wide environment: every tool that writes state gets a temporary home."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flwr.app import Context

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="consortia-tests-"))
for _variable, _folder in {
    "FLWR_HOME": "flwr",
    "RAY_TMPDIR": "ray",
    "UV_CACHE_DIR": "uv",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "MPLCONFIGDIR": "matplotlib",
}.items():
    os.environ[_variable] = str(_SESSION_TMP / _folder)
    (_SESSION_TMP / _folder).mkdir(parents=True, exist_ok=True)
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's temporary homes go with it (each xdist worker has its own)."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def mnist_dir() -> Iterator[Path]:
    if not MNIST_DIR.is_dir():
        pytest.fail(f"the MNIST IDX files are expected in {MNIST_DIR} (shared/ beside the repo)")
    yield MNIST_DIR


@pytest.fixture
def task_identity() -> None:
    """Messages are created inside a Flower task; stand in for the coordinator's one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


CliRunner = Callable[..., subprocess.CompletedProcess[str]]

# One Ray "cluster" per test worker for the tests marked `ray`: started by a child
# process on first use and kept until the session ends. Each simulation joins it
# through Ray's own RAY_ADDRESS (simulations/ray_start.py `cluster_address`) with
# actors of its own, as `--ray-address` runs do, instead of starting and stopping
# a Ray of its own (seconds of CPU each). Where the virtual nodes run is not part
# of a run's results; the tests of Ray's own start (test_sweep.py, test_ray_cluster.py)
# are not marked and start theirs.
_RAY_HEAD = """
import json, os, sys, ray
from ray._private import state
ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
print(json.dumps(sorted({a["ActorClassName"] for a in state.actors().values()})), flush=True)
ray.shutdown()
"""


@contextlib.contextmanager
def ray_head() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A Ray "cluster" of one machine: (its GCS address, the process that holds it).

    The process keeps the head until its stdin closes, then prints the actor
    classes the cluster ran (`head.communicate(input="")`) and stops it.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = subprocess.Popen(
        [sys.executable, "-c", _RAY_HEAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert head.stdout is not None
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        yield address, head
    finally:
        if head.poll() is None:
            with contextlib.suppress(OSError, ValueError, subprocess.TimeoutExpired):
                head.communicate(input="", timeout=60)
        if head.poll() is None:
            head.kill()
        head.wait(timeout=30)


@pytest.fixture(scope="session")
def shared_ray() -> Iterator[str]:
    """The address of this worker's Ray cluster (see the comment above `_RAY_HEAD`)."""
    with ray_head() as (address, _):
        yield address


@pytest.fixture(scope="module", autouse=True)
def _module_ray_address(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module marked `ray` (its `pytestmark`): its module-scoped runs use the shared Ray too.

    Autouse fixtures come first within their scope, so the variable is set
    before the module's own fixtures run their simulations.
    """
    if request.node.get_closest_marker("ray") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", request.getfixturevalue("shared_ray"))
        yield


@pytest.fixture(autouse=True)
def _ray_address(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests marked `ray` run their simulations on the worker's shared Ray."""
    if request.node.get_closest_marker("ray") is not None:
        monkeypatch.setenv("RAY_ADDRESS", request.getfixturevalue("shared_ray"))


@pytest.fixture(scope="session")
def consortia_cli() -> CliRunner:
    """Run the real `consortia` command line in a subprocess: `run(*args, cwd=...)`."""

    def run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "consortia.cli.main", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout,
            check=False,
            env={**os.environ, "COLUMNS": "120"},
        )

    return run


def one_cli_error(
    result: subprocess.CompletedProcess[str], *, nothing_on_stdout: bool = False
) -> str:
    """Exit 2, no traceback, one `error:` message; returns it with line wrapping undone.

    `nothing_on_stdout`: also assert that the command printed nothing else, for
    commands that must fail before any output.
    """
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    if nothing_on_stdout:
        assert result.stdout.strip() == ""
    assert result.stderr.count("error:") == 1, result.stderr
    return " ".join(result.stderr.split())


def flower_context(
    *,
    partition_id: int | None = None,
    num_partitions: int = 5,
    node_toml: Path | None = None,
    run_id: int = 1,
    node_id: int = 7,
) -> Context:
    """A node's Flower `Context` as its SuperNode (or the simulation engine) hands it over.

    A fresh `state` and no run config; `node_config` says which node it is:
    `partition_id` for a simulated node (the engine sets partition-id and
    num-partitions; 5 is the bundled scenario's node count), `node_toml` for a
    deployed one (its node.toml under NODE_CONFIG_KEY), neither for a node with
    no data of its own. Flower is imported here, not at the top: most tests
    never need it.
    """
    from flwr.app import Context, RecordDict, UserConfig

    from consortia.client.node_config import NODE_CONFIG_KEY

    node_config: UserConfig = {}
    if partition_id is not None:
        node_config.update({"partition-id": partition_id, "num-partitions": num_partitions})
    if node_toml is not None:
        node_config[NODE_CONFIG_KEY] = str(node_toml)
    return Context(
        run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
    )


# The longest test files first (seconds per file, measured on 2 cores, 2026-12-07), so that
# xdist's `--dist loadfile` hands them out early and both workers finish together instead of
# one running the last long file alone. Order within a file is kept (the sort is stable).
_LONGEST_FIRST = (
    "test_node_loss.py",
    "test_simulation.py",
    "test_sweep.py",
    "test_secure_simulation.py",
    "test_secure_deployment.py",
    "test_deployment.py",
    "test_privacy_audit.py",
    "test_examples.py",
    "test_coordinator_crash.py",
    "test_resume.py",
    "test_adversaries.py",
    "test_statistics_simulation.py",
    "test_node_crash.py",
    "test_statistics_deployment.py",
    "test_ray_cluster.py",
    "test_node_privacy_audit.py",
    "test_update_checks.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
