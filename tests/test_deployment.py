"""Deployment, for real: a flower-superlink and three `consortia node start` SuperNodes on
127.0.0.1, each node with its own registered CSV dataset, SQLite ledger and policy.

No mocks: processes, HTTP, SQLite files. (Plain HTTP here: TLS and node
authentication belong to the coordinator's own tests.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import CliRunner
from federation import Federation, add_site, write_job
from sklearn.datasets import load_breast_cancer

from consortia.client.ledger import PrivacyLedger, ledger_path
from consortia.common.privacy import epsilon, opacus_epsilon

pytestmark = pytest.mark.slow

NODES = ("st-mary", "riverside", "northgate")
BUDGET = 1.0


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, consortia_cli: CliRunner
) -> Iterator[tuple[Federation, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("deployment")
    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    order = np.random.default_rng(0).permutation(len(data.target))
    federation = Federation(root)
    node_tomls = {
        name: add_site(
            root / name,
            name,
            data.data[part],
            data.target[part],
            names,
            superlink_port=federation.port,
            budget=BUDGET,
            cli=consortia_cli,
        )
        for name, part in zip(NODES, np.array_split(order, 3), strict=True)
    }
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
    result = fed.run_job(write_job(fed.root / "job.toml", 0.6), out)
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
    result = fed.run_job(write_job(fed.root / "greedy.toml", 3.0), fed.root / "runs-greedy")
    output = result.stdout + result.stderr
    assert "budget-exhausted" in output
    assert "no node returned a usable update" in output
    after = {name: len(_ledger_entries(toml)) for name, toml in node_tomls.items()}
    assert after == before
    for toml in node_tomls.values():
        log = (fed.root / f"{toml.parent.name}.log").read_text()
        assert "budget-exhausted" in log
