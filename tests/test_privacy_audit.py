"""Privacy audits: the statistics are sound, and a DP run's audit stays under its claim.

* The ε lower bound is checked on a mechanism whose ε is known exactly
  (randomized response): it must come close from below and never exceed it.
* The privacy regression test (issue: "if it ever does, the accounting or
  the implementation is wrong"): the same small, over-fitting scenario is
  run with DP at ε = 1 and without DP; the audit's ε lower bound for the DP
  model must not exceed the ε the nodes claim, and the non-DP model must
  show clearly higher attack success.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import CliRunner, one_cli_error
from sklearn.metrics import roc_auc_score

from consortia.common.membership import (
    audited_epsilon,
    clopper_pearson,
    epsilon_bound,
    roc_auc,
    tpr_at_fpr,
)

# Two nodes of 100 digits each, an MLP, 100 local epochs in all: a model that
# memorises without DP. test_fraction 0.5 gives as many non-members as members;
# node 1 also trains on about half of 200 canaries (random points, random labels).
_SCENARIO = """
name = "audit-digits"
seed = 3
rounds = 5
evaluation = "centralized"

[model]
name = "mlp"
hidden = [128]

[training]
local_epochs = 20
batch_size = 16
learning_rate = 0.1

[privacy]
{privacy}
delta = 1e-5
max_grad_norm = 1.0

[strategy]
name = "fedavg"

[simulation]
nodes = 2

[simulation.data]
source = "digits"
test_fraction = 0.5
max_records = 400

[simulation.partition]
method = "iid"

[simulation.canaries]
count = 200
node = 1
"""


def test_auc_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    members, non_members = rng.normal(0.3, 1, 300), rng.normal(0, 1, 250)
    members[:20] = non_members[:20]  # ties
    labels = np.r_[np.ones(300), np.zeros(250)]
    expected = roc_auc_score(labels, np.r_[members, non_members])
    assert roc_auc(members, non_members) == pytest.approx(expected, abs=1e-12)


def test_tpr_at_an_unresolvable_fpr_is_unknown_not_zero() -> None:
    members, non_members = np.arange(100.0), np.arange(100.0) - 50
    assert tpr_at_fpr(members, non_members, 0.001) is None
    # 1% of 100 non-members: one may score above the threshold, so it is the second highest (48).
    assert tpr_at_fpr(members, non_members, 0.01) == pytest.approx(0.51)


def test_clopper_pearson_covers_the_rate() -> None:
    low, high = clopper_pearson(30, 100, 0.95)
    assert low < 0.3 < high
    assert clopper_pearson(0, 50, 0.95)[0] == 0.0 and clopper_pearson(50, 50, 0.95)[1] == 1.0


@pytest.mark.parametrize("true_epsilon", [0.5, 1.0, 2.0])
def test_bound_on_randomized_response_is_close_and_never_above(true_epsilon: float) -> None:
    """Randomized response is exactly ε-DP: a member says "in" w.p. e^ε/(1+e^ε)."""
    rng = np.random.default_rng(int(true_epsilon * 10))
    p_in = math.exp(true_epsilon) / (1 + math.exp(true_epsilon))
    trials = 40_000
    for _ in range(5):
        members = (rng.random(trials) < p_in).astype(float)
        non_members = (rng.random(trials) < 1 - p_in).astype(float)
        bound = audited_epsilon(members, non_members, 1e-5, rng)
        assert bound <= true_epsilon
        assert bound >= 0.8 * true_epsilon  # 20,000 trials per side on the counting half


def test_a_perfect_attack_proves_what_its_sample_size_allows() -> None:
    # 100 of 100 members caught, no false positive: at 95% the FPR may still be ~3.6%.
    bound = epsilon_bound(100, 100, 0, 100, 1e-5, 0.95)
    _, fpr_high = clopper_pearson(0, 100, 0.95)
    low, _ = clopper_pearson(100, 100, 0.95)
    assert bound == pytest.approx(math.log((low - 1e-5) / fpr_high))
    assert 2.5 < bound < 4


def _run(tmp_path: Path, cli: CliRunner, name: str, privacy: str) -> Path:
    scenario = tmp_path / f"{name}.toml"
    scenario.write_text(_SCENARIO.format(privacy=privacy))
    out = tmp_path / name
    result = cli("simulate", str(scenario), "--out", str(out), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _audit(tmp_path: Path, cli: CliRunner, run: Path) -> dict[str, object]:
    result = cli("audit", "privacy", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ε lower bound" in result.stdout and "LiRA" in result.stdout
    report = (run / "report.html").read_text()  # re-rendered with the audit's section
    assert "Privacy audit (membership inference)" in report
    assert "<td>LiRA (8 shadow models)</td>" in report
    return json.loads((run / "privacy-audit.json").read_text())


@pytest.mark.ray
def test_privacy_regression_dp_run_stays_under_its_claim(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    dp = _audit(
        tmp_path, consortia_cli, _run(tmp_path, consortia_cli, "dp", "target_epsilon = 1.0")
    )
    plain = _audit(
        tmp_path, consortia_cli, _run(tmp_path, consortia_cli, "plain", "enabled = false")
    )
    claimed = dp["claimed_epsilon"]
    assert isinstance(claimed, float) and 0.9 < claimed <= 1.0
    assert plain["claimed_epsilon"] is None
    for attack in dp["attacks"]:
        assert attack["epsilon_lower_bound"] <= claimed, attack  # else: accounting is wrong
    dp_auc = max(a["auc"] for a in dp["attacks"])
    plain_auc = max(a["auc"] for a in plain["attacks"])
    assert plain_auc >= 0.58 and plain_auc >= dp_auc + 0.06, (plain_auc, dp_auc)
    # The canaries: without DP the model memorises them (measured AUC 0.94, ε ≥ 0.86 proven).
    canaries = {r["attack"].split(" ")[0]: r for r in plain["attacks"]}["canaries"]
    assert canaries["auc"] >= 0.8 and canaries["epsilon_lower_bound"] >= 0.3, canaries
    assert len(dp["attacks"]) == 3


def test_auditing_what_is_not_a_simulation_run_is_one_clear_error(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    message = one_cli_error(consortia_cli("audit", "privacy", str(tmp_path / "nope"), cwd=tmp_path))
    assert "no such run folder" in message


def test_canaries_are_seeded_and_half_of_them_planted_in_their_node() -> None:
    from consortia.common.config import SimulationConfig
    from consortia.common.errors import ConfigError
    from consortia.simulations.node_data import canaries_of, simulated_node_data

    plain = SimulationConfig.model_validate({"nodes": 3, "data": {"source": "digits"}})
    sim = plain.model_copy(update={"canaries": {"count": 400, "node": 2}})
    sim = SimulationConfig.model_validate(sim.model_dump())
    first, again = canaries_of(sim, 7), canaries_of(sim, 7)
    assert first is not None and again is not None
    assert np.array_equal(first.records.x, again.records.x)
    assert np.array_equal(first.inside, again.inside)
    assert 150 < int(first.inside.sum()) < 250
    grown = len(simulated_node_data(sim, 7, 1).train) - len(simulated_node_data(plain, 7, 1).train)
    assert grown == int(first.inside.sum())
    assert len(simulated_node_data(sim, 7, 0).train) == len(simulated_node_data(plain, 7, 0).train)
    with pytest.raises((ValueError, ConfigError)):
        SimulationConfig.model_validate({"nodes": 2, "canaries": {"count": 10, "node": 3}})
