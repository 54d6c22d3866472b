"""A deployed node's statistics answers through its ClientApp: policy, ledger, missing values.

The node is real (node.toml, a registered CSV with blanks and a category
column, a SQLite ledger); its ClientApp is called in-process with real
Flower `query.statistics` messages, as its SuperNode would call it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CliRunner, flower_context
from federation import free_port, ledger_history
from flwr.app import ConfigRecord, Message, RecordDict

from consortia.client.app import app
from consortia.client.onboarding.registry import DatasetRegistry
from consortia.common import protocol as p
from consortia.common.config import JobConfig
from consortia.common.models import build_model
from consortia.common.statistics import MESSAGE_TYPE, STATISTICS_KEY, StatisticsRelease
from consortia.common.weights import model_to_arrays

pytestmark = pytest.mark.usefixtures("task_identity")

RECORDS = 400
SITES = ("north", "south")


def _write_site(
    folder: Path, policy: str, budget: float = 3.0, extra: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """A node with 400 records: age (0-100, 40 blank), site (category), a binary label.

    `extra`: one more CSV line (a neighbouring dataset).
    """
    rng = np.random.default_rng(3)
    age = rng.integers(20, 80, RECORDS).astype(float)  # ties on the histogram's bin edges
    blank = rng.permutation(RECORDS)[:40]
    site = rng.choice(SITES, RECORDS, p=[0.7, 0.3])
    label = (age > 50).astype(int)
    lines = ["age,site,outcome"] + [
        f"{'' if i in set(blank) else f'{age[i]:.3f}'},{site[i]},{label[i]}" for i in range(RECORDS)
    ]
    (folder / "data").mkdir(parents=True)
    lines += [extra] if extra is not None else []
    (folder / "data" / "export.csv").write_text("\n".join(lines) + "\n")
    (folder / "data" / "dataset.toml").write_text(
        'missing = "impute"\nnum_classes = 2\n\n[source]\nformat = "csv"\npath = "export.csv"\n\n'
        "[split]\ntest_fraction = 0.25\nseed = 1\n\n"
        '[[columns]]\nname = "age"\ntype = "float"\nmin = 0\nmax = 100\n\n'
        '[[columns]]\nname = "site"\ntype = "category"\ncategories = ["north", "south"]\n\n'
        '[[columns]]\nname = "outcome"\ntype = "int"\nlabel = true\n'
    )
    node_toml = folder / "node.toml"
    node_toml.write_text(
        'name = "clinic"\nstate_dir = "state"\nserve = ["registry"]\n'
        f"runtime_port = {free_port()}\n\n"
        f"[policy]\nepsilon_budget = {budget}\ndelta = 1e-5\n{policy}\n"
        f'[superlink]\naddress = "127.0.0.1:{free_port()}"\ninsecure = true\n'
    )
    DatasetRegistry(folder / "state").add("registry", folder / "data" / "dataset.toml")
    truth = {
        "records": RECORDS,
        "missing_age": 40,
        "mean_age": float(np.delete(age, blank).mean()),
        "labels": np.bincount(label, minlength=2),
    }
    return node_toml, truth


def _job(**statistics: Any) -> JobConfig:
    return JobConfig.model_validate(
        {
            "name": "insight",
            "dataset": "registry",
            "seed": 4,
            "model": {"name": "logreg"},
            "statistics": {"target_epsilon": 0.5, "min_count": 0, **statistics},
        }
    )


def _ask(node_toml: Path, job: JobConfig, run_id: int, model: bool = False) -> Message:
    content = RecordDict({p.CONFIG_KEY: ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode()})})
    if model:
        content[p.ARRAYS_KEY] = model_to_arrays(build_model(job.model, (3,), 2, job.seed))
    message = Message(content, dst_node_id=7, message_type=MESSAGE_TYPE)
    return app(message, flower_context(node_toml=node_toml, run_id=run_id))


def _release(reply: Message) -> StatisticsRelease:
    assert not reply.has_error(), reply.error.reason
    assert p.read_refusal(reply.content) is None, p.read_refusal(reply.content)
    return StatisticsRelease.decode(reply.content[STATISTICS_KEY][STATISTICS_KEY])


def _ledger(node_toml: Path) -> list[Any]:
    return ledger_history(node_toml, "registry")


def _refusal(reply: Message) -> str:
    refusal = p.read_refusal(reply.content)
    assert refusal is not None, list(reply.content.keys())
    assert STATISTICS_KEY not in reply.content
    return refusal[0]


ANSWERS = "answer_statistics = true\nmax_statistics_epsilon = 1.0\n"


def test_a_node_records_the_query_then_releases_noisy_statistics(tmp_path: Path) -> None:
    node_toml, truth = _write_site(tmp_path / "clinic", ANSWERS)
    release = _release(_ask(node_toml, _job(), run_id=31))
    assert release.sensitivity["labels"] == 1.0 and release.epsilon > 0.4
    (entry,) = _ledger(node_toml)
    assert entry.run_id == "31" and entry.mechanism == "gaussian"
    assert entry.epsilon == pytest.approx(release.epsilon_spent) and release.epsilon <= 0.5
    # the audit log names the job beside the spend
    audit = node_toml.parent / "state" / "audit.jsonl"
    spends = [json.loads(line) for line in audit.read_text().splitlines()]
    assert any(e["event"] == "privacy.spend" and e["details"]["job"] == "insight" for e in spends)
    # noisy, within a few noise stds of the truth (features: age, site=north, site=south)
    z = 4.0
    for noisy, exact in zip(release.label_counts, truth["labels"], strict=True):
        assert abs(noisy - exact) < z * release.std("labels")
    assert release.missing is not None
    assert abs(release.missing.records_read - RECORDS) < z * release.std("missing")
    assert abs(release.missing.per_column["age"] - 40) < z * release.std("missing")
    assert [f.name for f in release.features] == ["age", "site=north", "site=south"]
    age = release.features[0]
    assert (age.low, age.high) == (0.0, 100.0)
    # Blanks are missing, never imputed: the age histogram counts the 360 present values.
    assert abs(sum(age.histogram) - (RECORDS - 40)) < z * release.std("histograms") * np.sqrt(10)
    mean = 50 + 50 * age.sum / (RECORDS - 40)
    assert abs(mean - truth["mean_age"]) < z * release.std("sums") * 50 / (RECORDS - 40)


def test_the_policy_decides_and_a_refusal_spends_nothing(tmp_path: Path) -> None:
    silent, _ = _write_site(tmp_path / "silent", "")
    assert _refusal(_ask(silent, _job(), run_id=1)) == "statistics-not-answered"
    assert _ledger(silent) == []
    frugal, _ = _write_site(tmp_path / "frugal", "answer_statistics = true\n")  # ε ≤ 0.5
    assert _refusal(_ask(frugal, _job(target_epsilon=0.9), run_id=2)) == "statistics-too-costly"
    assert _ledger(frugal) == []


def test_a_node_whose_budget_would_be_exceeded_refuses(tmp_path: Path) -> None:
    node_toml, _ = _write_site(tmp_path / "clinic", ANSWERS, budget=0.6)  # one query fits
    _release(_ask(node_toml, _job(), run_id=1))
    assert _refusal(_ask(node_toml, _job(), run_id=2)) == "budget-exhausted"
    assert [e.run_id for e in _ledger(node_toml)] == ["1"]


def test_model_accuracy_per_class_and_group_is_released_with_its_spend(tmp_path: Path) -> None:
    generous = "answer_statistics = true\nmax_statistics_epsilon = 50\n"  # σ = 1: ε ≈ 15
    node_toml, _ = _write_site(tmp_path / "clinic", generous, budget=100.0)
    job = _job(model="unused-here", group_column="site", noise_multiplier=1.0, target_epsilon=None)
    release = _release(_ask(node_toml, job, run_id=5, model=True))
    accuracy = release.accuracy
    assert accuracy is not None and accuracy.group_column == "site"
    assert set(accuracy.group_total) == {"north", "south", "(missing)"}  # declared, not observed
    assert accuracy.total == pytest.approx(RECORDS * 0.25, abs=5 * release.std("accuracy"))
    assert set(release.sensitivity) >= {"accuracy", "classes", "groups"}
    assert _ledger(node_toml)[0].epsilon == pytest.approx(release.epsilon_spent)
    unknown = _job(model="unused-here", group_column="outcome")
    assert _refusal(_ask(node_toml, unknown, run_id=6, model=True)) == "unknown-group-column"


def test_check_job_says_whether_the_node_would_answer(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    job = tmp_path / "stats.toml"
    job.write_text('name = "insight"\ndataset = "registry"\n\n[statistics]\ntarget_epsilon = 0.5\n')
    answers, _ = _write_site(tmp_path / "answers", ANSWERS)
    check = ("node", "check-job", str(job), "--statistics", "--node")
    result = consortia_cli(*check, str(answers), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would answer the statistics query" in result.stdout
    assert "ε of the query" in result.stdout and _ledger(answers) == []  # nothing spent
    silent, _ = _write_site(tmp_path / "silent", "")
    result = consortia_cli(*check, str(silent), cwd=tmp_path)
    assert result.returncode == 1 and "statistics-not-answered" in result.stdout
    grouped = job.read_text().replace("0.5\n", '0.5\nmodel = "run-1"\ngroup_column = "zip"\n')
    job.write_text(grouped)
    result = consortia_cli(*check, str(answers), cwd=tmp_path)
    assert result.returncode == 1 and "unknown-group-column" in result.stdout


def test_the_noise_has_the_stated_std(tmp_path: Path) -> None:
    """Through the real handler: 40 queries (each job name a fresh seed), noise std = σ × Δ₂."""
    generous = "answer_statistics = true\nmax_statistics_epsilon = 50\n"
    node_toml, truth = _write_site(tmp_path / "clinic", generous, budget=100.0)
    label_noise, bin_noise = [], []
    for k in range(40):
        job = _job(noise_multiplier=3.0, target_epsilon=None).model_copy(update={"name": f"q{k}"})
        release = _release(_ask(node_toml, job, run_id=100 + k))
        label_noise += [n - t for n, t in zip(release.label_counts, truth["labels"], strict=True)]
        north = np.asarray(release.features[1].histogram)  # site=north: 0/1, bins 0 and 9 only
        bin_noise += list(north[1:9])  # bins no record can fall in: pure noise
    assert release.std("labels") == 3.0 and release.std("histograms") == 3.0 * np.sqrt(3)
    assert np.std(label_noise) == pytest.approx(3.0, rel=0.3)  # 80 draws: ±8% is one std
    assert np.std(bin_noise) == pytest.approx(3.0 * np.sqrt(3), rel=0.15)


def test_one_more_record_moves_each_block_by_at_most_its_sensitivity(tmp_path: Path) -> None:
    """Neighbouring datasets, exact (noise-free) blocks: the L2 change is within Δ₂.

    The extra record has a blank age and an age on a bin edge would move a
    median: neither imputation nor standardisation may reach the statistics.
    """
    from consortia.client.statistics import (
        deployed_facts,
        query_blocks,
        release_statistics,
        select_features,
    )

    def exact(site: Path) -> tuple[dict[str, Any], dict[str, float]]:
        registry = DatasetRegistry(site / "state")
        facts = deployed_facts(*registry.load_inspected("registry"))
        config = _job().statistics
        assert config is not None
        selection = select_features(facts, config)
        blocks = query_blocks(facts, selection, config)  # type: ignore[arg-type]
        zero = lambda block, size: np.zeros(size)  # noqa: E731
        return release_statistics(2, facts, selection, None, config, zero), blocks  # type: ignore[arg-type]

    for extra in (",south,1", "50,north,0", "100,north,1"):
        base, blocks = exact(_write_site(tmp_path / "a", ANSWERS)[0].parent)
        more, _ = exact(_write_site(tmp_path / "b", ANSWERS, extra=extra)[0].parent)

        def change(get: Any, base: Any = base, more: Any = more) -> float:
            moved = np.asarray(get(more), float) - np.asarray(get(base), float)
            return float(np.linalg.norm(moved))

        # The 40 blanks are missing values, not imputed ones: no histogram counts them.
        assert sum(base["features"][0].histogram) == RECORDS - 40
        assert base["missing"].per_column["age"] == 40
        assert change(lambda r: r["label_counts"]) <= blocks["labels"]
        histograms = change(lambda r: [f.histogram for f in r["features"]])
        assert histograms <= blocks["histograms"] + 1e-9
        assert change(lambda r: [f.sum for f in r["features"]]) <= blocks["sums"] + 1e-9
        assert change(lambda r: [f.sum_squares for f in r["features"]]) <= blocks["squares"] + 1e-9
        missing = change(lambda r: [r["missing"].records_read, *r["missing"].per_column.values()])
        assert 0 < missing <= blocks["missing"] + 1e-9
        for folder in ("a", "b"):
            shutil.rmtree(tmp_path / folder)
