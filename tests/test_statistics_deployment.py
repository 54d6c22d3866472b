"""Statistics on the deployment engine: real SuperLink and SuperNodes on 127.0.0.1 (TLS, node auth).

Three hospitals; two answer statistics queries, northgate's policy does
not. A training job runs first; `consortia job stats` then asks every node
for DP statistics of its registered dataset and the trained model's
accuracy, and each answer is paid from the same per-dataset ledger.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliRunner
from consortium import Consortium, cancer_sites, run_id_of, start_consortium
from federation import ledger_history, write_job

from consortia.client.ledger import LedgerEntry

pytestmark = pytest.mark.slow

NODES = ("st-mary", "riverside", "northgate")
SILENT = "northgate"
MIN_COUNT = 5
ANSWERS = "answer_statistics = true\nmax_statistics_epsilon = 1.0\n"


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, consortia_cli: CliRunner
) -> Iterator[tuple[Consortium, dict[str, Path]]]:
    fed = Consortium(tmp_path_factory.mktemp("insight"))
    policies = {name: ANSWERS for name in NODES if name != SILENT}
    node_tomls = cancer_sites(fed, NODES, 5.0, cli=consortia_cli, policies=policies)
    try:
        start_consortium(fed, node_tomls)
        yield fed, node_tomls
    finally:
        fed.stop()


def _ledger(node_toml: Path) -> list[LedgerEntry]:
    return ledger_history(node_toml, "cancer")


def test_a_statistics_job_with_a_trained_model(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    fed, node_tomls = federation
    trained = fed.submit(write_job(fed.root / "train.toml", 1.0, rounds=1))
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    train_run = run_id_of(trained)
    before = {name: len(_ledger(toml)) for name, toml in node_tomls.items()}

    job = write_job(fed.root / "stats.toml", 1.0, name="insight")
    job.write_text(
        job.read_text()
        + f"\n[statistics]\ntarget_epsilon = 0.5\nmin_count = {MIN_COUNT}\n"
        + f'model = "run-{train_run}"\n'
    )
    result = fed.consortia("job", "stats", str(job), "--config", str(fed.config), "--wait")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "statistics-not-answered" in result.stdout  # the summary names the refusal
    run = run_id_of(result)
    folder = fed.state / "runs" / f"run-{run}"
    stats = json.loads((folder / "stats.json").read_text())
    assert (folder / "stats.html").is_file()

    assert stats["answered"] == ["riverside", "st-mary"]
    (refusal,) = stats["refusals"]
    assert (refusal["node"], refusal["code"]) == (SILENT, "statistics-not-answered")
    assert stats["model"]["run_dir"].endswith(f"run-{train_run}") and stats["model"]["round"] == 1

    summary = stats["summary"]
    for name in ("riverside", "st-mary"):
        entries = _ledger(node_tomls[name])
        assert len(entries) == before[name] + 1
        entry = entries[-1]
        assert entry.run_id == str(run) and entry.mechanism == "gaussian"
        assert summary["spend"][name]["epsilon_spent"] == pytest.approx(entry.epsilon)
        assert summary["spend"][name]["epsilon"] <= 0.5
        # A noisy count below min_count is suppressed, with its ratio: the
        # noise is fresh, so either branch can happen and each must be right.
        accuracy = summary["accuracy"][name]["accuracy"]
        tested = stats["releases"][name]["accuracy"]["total"]
        if tested >= MIN_COUNT:
            assert accuracy["error"] > 0 and 0 <= accuracy["value"] <= 1
        else:
            assert accuracy == {"value": None, "error": None}
        # 569 / 3 records: st-mary and riverside hold 190 each; 5 noise stds (fresh noise keys)
        records = summary["labels"][name]["records"]
        release = stats["releases"][name]
        std = release["noise_multiplier"] * release["sensitivity"]["labels"] * 2**0.5
        assert abs(records["value"] - 190) < 5 * std
    assert len(_ledger(node_tomls[SILENT])) == before[SILENT]

    # Feature means come back in the schema's units, standardisation undone.
    features = {f["name"]: f for f in summary["features"]}
    assert features["f00"]["low"] == 0 and features["f00"]["high"] == 5000
    read = summary["missing"]["st-mary"]["records_read"]
    released = stats["releases"]["st-mary"]["missing"]["records_read"]
    assert read["value"] == (released if released >= MIN_COUNT else None)

    events = [e for e in fed.audit_events() if e["details"].get("run_id") == str(run)]
    kinds = [e["event"] for e in events]
    assert kinds == ["statistics.started", "statistics.finished"]
    assert events[-1]["details"]["refused"] == {SILENT: "statistics-not-answered"}
