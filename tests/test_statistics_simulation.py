"""`consortia simulate --stats` on the Ray simulation engine: a trained run, then its statistics.

Real command lines in subprocesses: one training run (1 round), then a
statistics query that also evaluates that run's model on every virtual
node. stats.html is opened in headless Chromium.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chromium import rendered_charts
from conftest import CliRunner, one_cli_error

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SCENARIO = """
name = "insight"
seed = 24
rounds = 1

[model]
name = "logreg"

[training]
learning_rate = 0.5

[privacy]
target_epsilon = 4.0

[statistics]
target_epsilon = 1.0
min_count = 5
model = "trained"

[simulation]
nodes = 5

[simulation.data]
source = "digits"

[simulation.partition]
method = "dirichlet"
alpha = 0.5
min_records = 20
"""


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory: pytest.TempPathFactory, consortia_cli: CliRunner) -> Path:
    work = tmp_path_factory.mktemp("insight")
    (work / "insight.toml").write_text(SCENARIO)
    trained = consortia_cli("simulate", "insight.toml", "--out", "trained", "--quiet", cwd=work)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = consortia_cli("simulate", "insight.toml", "--stats", "--out", "stats", cwd=work)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "most skewed label mix" in result.stdout
    return work / "stats"


def test_every_virtual_node_answers_within_its_budget(stats_run: Path) -> None:
    stats = json.loads((stats_run / "stats.json").read_text())
    assert stats["answered"] == [f"node-{i}" for i in range(1, 6)] and stats["refusals"] == []
    summary = stats["summary"]
    for spend in summary["spend"].values():
        assert 0.5 < spend["epsilon"] <= 1.0
    assert summary["most_skewed"] in stats["answered"]
    assert stats["manifest"]["data_fingerprints"].keys() == set(stats["answered"])


def test_the_trained_model_is_evaluated_on_every_node_with_noise(stats_run: Path) -> None:
    stats = json.loads((stats_run / "stats.json").read_text())
    assert stats["model"]["round"] == 1 and stats["model"]["run_dir"].endswith("trained")
    for node, view in stats["summary"]["accuracy"].items():
        assert view["accuracy"]["error"] > 0, node  # noisy, with its error bar
    release = stats["releases"]["node-1"]
    assert release["sensitivity"]["accuracy"] == pytest.approx(2**0.5)


def test_stats_html_renders_its_charts(stats_run: Path, tmp_path: Path) -> None:
    page = (stats_run / "stats.html").read_text()
    assert "Most skewed node" in page and "Model accuracy" in page
    seen = rendered_charts(stats_run / "stats.html", tmp_path)
    # label mix, feature shift, accuracy per node
    assert seen == {"images": 3, "svgs": 0, "broken": [], "empty_svgs": 0}


def test_a_scenario_without_a_query_is_refused(tmp_path: Path, consortia_cli: CliRunner) -> None:
    (tmp_path / "plain.toml").write_text(SCENARIO.split("[statistics]")[0] + "[simulation]\n")
    result = consortia_cli("simulate", "plain.toml", "--stats", cwd=tmp_path)
    assert result.returncode == 2
    assert "[statistics] block" in one_cli_error(result)
