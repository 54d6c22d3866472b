"""A real test federation: a flower-superlink, `consortia node start` SuperNodes, `flwr run`.

Shared by the deployment tests (imported like `conftest`: tests/ is on
sys.path). Everything runs on 127.0.0.1 over plain HTTP; every process a
`Federation` starts, and every process those start, is ended by `stop()`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from conftest import REPO_ROOT, CliRunner

from consortia.client.ledger import LedgerEntry, PrivacyLedger, ledger_path
from consortia.client.onboarding.registry import DatasetRegistry

LABEL_COLUMN = "diagnosis"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_dataset(folder: Path, rows: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    """A CSV export plus its dataset.toml schema, as a hospital's IT team would write them."""
    folder.mkdir(parents=True)
    header = ",".join([*names, LABEL_COLUMN])
    lines = [header] + [
        ",".join([*(f"{v:.6g}" for v in row), str(int(y))])
        for row, y in zip(rows, labels, strict=True)
    ]
    (folder / "export.csv").write_text("\n".join(lines) + "\n")
    columns = "".join(
        f'\n[[columns]]\nname = "{n}"\ntype = "float"\nmin = 0\nmax = 5000\n' for n in names
    )
    schema = (
        'missing = "drop"\nstandardize = true\nnum_classes = 2\n\n'
        '[source]\nformat = "csv"\npath = "export.csv"\nheader = true\n\n'
        "[split]\ntest_fraction = 0.2\nstratified = true\nseed = 1\n"
        + columns
        + f'\n[[columns]]\nname = "{LABEL_COLUMN}"\ntype = "int"\nlabel = true\n'
    )
    (folder / "dataset.toml").write_text(schema)
    return folder / "dataset.toml"


def write_job(
    path: Path,
    target_epsilon: float,
    *,
    name: str | None = None,
    min_nodes: int = 3,
    rounds: int = 2,
    evaluation: str = "federated",
    model: str = "logreg",
    local_epochs: int = 1,
    batch_size: int = 64,
    learning_rate: float = 2.0,
    round_timeout_s: float | None = None,
) -> Path:
    """A deployment job TOML on the registered dataset 'cancer'."""
    timeout = "" if round_timeout_s is None else f"round_timeout_s = {round_timeout_s}\n"
    path.write_text(
        f'name = "{name or f"cancer-{target_epsilon:g}"}"\ndataset = "cancer"\n'
        f"min_nodes = {min_nodes}\nseed = 5\nrounds = {rounds}\n"
        f'evaluation = "{evaluation}"\n{timeout}\n'
        f'[model]\nname = "{model}"\n\n'
        f"[training]\nlocal_epochs = {local_epochs}\nbatch_size = {batch_size}\n"
        f"learning_rate = {learning_rate}\n\n"
        f"[privacy]\ntarget_epsilon = {target_epsilon}\ndelta = 1e-5\nmax_grad_norm = 1.0\n"
    )
    return path


def write_node_toml(
    site: Path,
    name: str,
    superlink_port: int,
    budget: float,
    policy: str = "",
    root_certificates: Path | None = None,
    metrics_port: int | None = None,
) -> Path:
    """node.toml of a node serving 'cancer' from `site/state`; `policy` adds [policy] lines.

    With `root_certificates` the node speaks TLS (trusting that CA) and signs
    its requests with its key; without, plain HTTP. With `metrics_port` it
    serves its Prometheus endpoint there (on 127.0.0.1).
    """
    node_toml = site / "node.toml"
    link = (
        "insecure = true"
        if root_certificates is None
        else f'root_certificates = "{root_certificates}"'
    )
    node_toml.write_text(
        f'name = "{name}"\nstate_dir = "state"\nserve = ["cancer"]\n'
        f"runtime_port = {free_port()}\n\n"
        f"[policy]\nepsilon_budget = {budget}\ndelta = 1e-5\n{policy}\n"
        f'[superlink]\naddress = "127.0.0.1:{superlink_port}"\n{link}\n'
        + ("" if metrics_port is None else f"\n[metrics]\nport = {metrics_port}\n")
    )
    return node_toml


def add_site(
    site: Path,
    name: str,
    rows: np.ndarray,
    labels: np.ndarray,
    feature_names: list[str],
    *,
    superlink_port: int,
    budget: float,
    cli: CliRunner | None = None,
    policy: str = "",
    root_certificates: Path | None = None,
    metrics_port: int | None = None,
) -> Path:
    """One hospital: its CSV export, node.toml, and dataset 'cancer' registered; returns node.toml.

    With `cli`, registration goes through `consortia node data add` (as an
    operator would); without, through `DatasetRegistry` in-process.
    """
    spec = write_dataset(site / "data", rows, labels, feature_names)
    node_toml = write_node_toml(
        site, name, superlink_port, budget, policy, root_certificates, metrics_port
    )
    if cli is None:
        DatasetRegistry(site / "state").add("cancer", spec)
        return node_toml
    added = cli(
        "node", "data", "add", "cancer", "--config", str(spec), "--node", str(node_toml), cwd=site
    )
    assert added.returncode == 0, added.stdout + added.stderr
    return node_toml


def ledger_history(node_toml: Path, dataset: str) -> list[LedgerEntry]:
    """The dataset's releases in the node's ledger (none if the node never opened its budget)."""
    with PrivacyLedger(ledger_path(node_toml.parent / "state")) as ledger:
        if dataset not in [budget.name for budget in ledger.datasets()]:
            return []
        return ledger.history(dataset)


# ------------------------------------------------------------------ processes


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc (a snapshot)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pids: Iterable[int]) -> set[int]:
    """Every live process started, directly or not, by `pids` (the pids not included)."""
    children = _children()
    found: set[int] = set()
    stack = list(pids)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL `process`, its process group, and everything it started (detached ones too).

    flower-superlink starts its SuperExec in a new session, and a SuperExec
    outlives a dead parent for a while: killing the group alone leaves them.
    """
    for _ in range(2):  # a second pass catches what was being spawned during the first
        tree = descendants([process.pid])
        groups = {process.pid}
        for pid in tree:
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(pid))
        for group in groups:
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
        for pid in tree:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


class Federation:
    """The processes of one test federation; every one is ended at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "FLWR_HOME": str(root / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        home = root / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n'
            f'[superlink.test]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def spawn(self, args: list[str], log: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start `args` in its own session (so its whole group can be killed), output to `log`."""
        with (self.root / log).open("ab") as handle:
            process = subprocess.Popen(
                args,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                cwd=cwd,
            )
        self.processes.append(process)
        return process

    def start_superlink(self) -> None:
        self.spawn(
            [
                "flower-superlink",
                "--insecure",
                "--database",
                str(self.root / "superlink.db"),
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
            "superlink.log",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise AssertionError("flower-superlink did not open its port")

    def start_node(self, node_toml: Path, log: str) -> subprocess.Popen[bytes]:
        """`consortia node start` (it execs flower-supernode); output appended to `log`.log."""
        cli = [sys.executable, "-m", "consortia.cli.main"]
        return self.spawn([*cli, "node", "start", "--node", str(node_toml)], f"{log}.log")

    def flwr_run_args(self, job: Path, out_dir: Path) -> list[str]:
        run_config = f'job="{job}" out-dir="{out_dir}"'
        return ["flwr", "run", str(REPO_ROOT), "test", "--stream", "--run-config", run_config]

    def run_job(
        self, job: Path, out_dir: Path, timeout: float = 400
    ) -> subprocess.CompletedProcess[str]:
        """`flwr run` the job to its end (logs streamed into the result)."""
        return subprocess.run(
            self.flwr_run_args(job, out_dir),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def start_job(self, job: Path, out_dir: Path, log: str) -> subprocess.Popen[bytes]:
        """`flwr run` in the background, streaming into `log`; ended at teardown."""
        return self.spawn(self.flwr_run_args(job, out_dir), log)

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Another `flwr` command against this federation's SuperLink."""
        return subprocess.run(
            ["flwr", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            kill_tree(process)
