"""Deployment, for real: a flower-superlink and three `consortia node start` SuperNodes on
127.0.0.1, each node with its own registered CSV dataset, SQLite ledger and policy.

No mocks: processes, HTTP, SQLite files. (Plain HTTP here: TLS and node
authentication belong to the coordinator's own tests.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, CliRunner
from sklearn.datasets import load_breast_cancer

from consortia.client.ledger import PrivacyLedger, ledger_path
from consortia.common.privacy import epsilon, opacus_epsilon

pytestmark = pytest.mark.slow

NODES = ("st-mary", "riverside", "northgate")
BUDGET = 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_dataset(folder: Path, rows: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    """A CSV export plus its dataset.toml schema, as a hospital's IT team would write them."""
    folder.mkdir(parents=True)
    header = ",".join([*names, "diagnosis"])
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
        + '\n[[columns]]\nname = "diagnosis"\ntype = "int"\nlabel = true\n'
    )
    (folder / "dataset.toml").write_text(schema)
    return folder / "dataset.toml"


def _job(path: Path, target_epsilon: float) -> Path:
    path.write_text(
        f'name = "cancer-{target_epsilon:g}"\ndataset = "cancer"\nmin_nodes = 3\nseed = 5\n'
        'rounds = 2\nevaluation = "federated"\n\n[model]\nname = "logreg"\n\n'
        "[training]\nbatch_size = 64\nlearning_rate = 2.0\n\n"
        f"[privacy]\ntarget_epsilon = {target_epsilon}\ndelta = 1e-5\nmax_grad_norm = 1.0\n"
    )
    return path


class Federation:
    """The processes of one test federation; every one is ended at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
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

    def spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        handle = (self.root / log).open("wb")
        process = subprocess.Popen(
            args, stdout=handle, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
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

    def start_node(self, node_toml: Path, name: str) -> subprocess.Popen[bytes]:
        cli = [sys.executable, "-m", "consortia.cli.main"]
        return self.spawn([*cli, "node", "start", "--node", str(node_toml)], f"{name}.log")

    def run_job(self, job: Path, out_dir: Path) -> subprocess.CompletedProcess[str]:
        run_config = f'job="{job}" out-dir="{out_dir}"'
        return subprocess.run(
            ["flwr", "run", str(REPO_ROOT), "test", "--stream", "--run-config", run_config],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=400,
            check=False,
        )

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, consortia_cli: CliRunner
) -> Iterator[tuple[Federation, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("deployment")
    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    order = np.random.default_rng(0).permutation(len(data.target))
    federation = Federation(root)
    node_tomls: dict[str, Path] = {}
    for index, (name, part) in enumerate(zip(NODES, np.array_split(order, 3), strict=True)):
        site = root / name
        spec = _write_dataset(site / "data", data.data[part], data.target[part], names)
        node_toml = site / "node.toml"
        node_toml.write_text(
            f'name = "{name}"\nstate_dir = "state"\nserve = ["cancer"]\n'
            f"runtime_port = {_free_port()}\n\n"
            f"[policy]\nepsilon_budget = {BUDGET}\ndelta = 1e-5\n\n"
            f'[superlink]\naddress = "127.0.0.1:{federation.port}"\ninsecure = true\n'
        )
        added = consortia_cli(
            "node",
            "data",
            "add",
            "cancer",
            "--config",
            str(spec),
            "--node",
            str(node_toml),
            cwd=site,
        )
        assert added.returncode == 0, added.stderr
        node_tomls[name] = node_toml
        del index
    try:
        federation.start_superlink()
        for name, node_toml in node_tomls.items():
            federation.start_node(node_toml, name)
        yield federation, node_tomls
    finally:
        federation.stop()


def _ledger_entries(node_toml: Path) -> list[object]:
    with PrivacyLedger(ledger_path(node_toml.parent / "state")) as ledger:
        ledger.verify("cancer")
        return list(ledger.history("cancer"))


def test_job_trains_and_ledgers_hold_the_composed_epsilon(
    federation: tuple[Federation, dict[str, Path]],
) -> None:
    fed, node_tomls = federation
    out = fed.root / "runs"
    result = fed.run_job(_job(fed.root / "job.toml", 0.6), out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run_dir,) = out.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["final"]["accuracy"] > 0.6
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert sorted(manifest["data_fingerprints"]) == sorted(NODES)
    for name, node_toml in node_tomls.items():
        entries = _ledger_entries(node_toml)
        assert len(entries) == 2  # one release per round, recorded before each update left
        history = [entry.release for entry in entries]  # type: ignore[attr-defined]
        composed = epsilon(history, 1e-5)
        assert entries[-1].epsilon == composed  # type: ignore[attr-defined]
        assert composed == pytest.approx(opacus_epsilon(history, 1e-5, "rdp"), rel=1e-9)
        assert metrics["final"]["epsilon"][name] == pytest.approx(composed)
        assert composed <= 0.6


def test_job_over_budget_is_refused_and_trains_nothing(
    federation: tuple[Federation, dict[str, Path]],
) -> None:
    fed, node_tomls = federation
    before = {name: len(_ledger_entries(toml)) for name, toml in node_tomls.items()}
    result = fed.run_job(_job(fed.root / "greedy.toml", 3.0), fed.root / "runs-greedy")
    output = result.stdout + result.stderr
    assert "budget-exhausted" in output
    assert "no node returned a usable update" in output
    after = {name: len(_ledger_entries(toml)) for name, toml in node_tomls.items()}
    assert after == before
    for toml in node_tomls.values():
        log = (fed.root / f"{toml.parent.name}.log").read_text()
        assert "budget-exhausted" in log
