"""The same simulated job with and without secure aggregation: the same model, up to quantization.

Flower's simulation engine (Ray), real Opacus training, FedAdam on the
coordinator: the secure run's four SecAgg+ stages go through the engine's
message passing like any other message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CliRunner
from safetensors.numpy import load_file

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parent.parent


def _scenario(work: Path, secure: bool) -> Path:
    text = (ROOT / "simulations" / "clinics-digits.toml").read_text()
    text = text.replace("rounds = 15", "rounds = 2").replace("nodes = 10", "nodes = 5")
    path = work / ("secure.toml" if secure else "plain.toml")
    path.write_text(text + ("\n[secure_aggregation]\n" if secure else ""))
    return path


def test_secure_aggregation_reaches_the_same_model_within_quantization_error(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    runs = {}
    for secure in (False, True):
        out = "secure" if secure else "plain"
        done = consortia_cli(
            "simulate", str(_scenario(tmp_path, secure)), "--out", out, cwd=tmp_path
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[secure] = json.loads((tmp_path / out / "metrics.json").read_text())
    plain, secure = runs[False], runs[True]
    for a, b in zip(plain["rounds"], secure["rounds"], strict=True):
        assert a["participants"] == b["participants"] and len(b["participants"]) == 5
        assert b["quantization_error"] is not None and a["quantization_error"] is None
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.01)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["epsilon"] == a["epsilon"]  # the same DP releases, accounted the same
    step = secure["rounds"][0]["quantization_error"]
    models = [
        load_file(str(tmp_path / name / run["final"]["model"]))
        for name, run in (("plain", plain), ("secure", secure))
    ]
    gap = max(float(np.max(np.abs(models[0][k] - models[1][k]))) for k in models[0])
    # Two rounds of a half-step error each, carried through FedAdam's normalised step.
    assert 0 < gap < 1e-3, gap
    assert step < 1e-6


def test_faults_strike_a_secure_round_at_their_stages(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    """Dropouts miss the setup (no spend); crashes strike after training, before the
    masked update leaves (spend recorded and reported, masks removed from the sum)."""
    scenario = _scenario(tmp_path, secure=True)
    text = (
        scenario.read_text().replace("rounds = 2", "rounds = 4").replace("nodes = 5", "nodes = 8")
    )
    text = text.replace(
        "[secure_aggregation]\n", '[secure_aggregation]\non_failure = "skip-round"\n'
    )
    scenario.write_text(text + "\n[simulation.faults]\ndropout = 0.15\ncrash = 0.15\n")
    done = consortia_cli("simulate", str(scenario), "--out", "faulty", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = json.loads((tmp_path / "faulty" / "metrics.json").read_text())["rounds"]
    dropouts = [name for r in rounds for name in r["dropouts"]]
    crashes = [name for r in rounds for name in r["crashes"]]
    assert dropouts and crashes  # the scenario's seed draws both
    for record in rounds:
        assert not set(record["dropouts"]) & set(record["participants"])
        assert not set(record["crashes"]) & set(record["participants"])
        assert (record["aggregation_failure"] is None) == (record["quantization_error"] is not None)
    aggregated = [r for r in rounds if r["aggregation_failure"] is None]
    assert aggregated and all(len(r["participants"]) >= 3 for r in aggregated)
    # A crashed node spent its privacy: its ε moved in that round.
    for i, record in enumerate(rounds):
        before = rounds[i - 1]["epsilon"] if i else {}
        for name in record["crashes"]:
            assert record["epsilon"][name] > before.get(name, 0.0)


def test_a_scenario_cannot_mix_secure_aggregation_and_attacks(tmp_path: Path) -> None:
    from consortia.common.config_io import load_scenario
    from consortia.common.errors import ConfigError

    scenario = _scenario(tmp_path, secure=True)
    scenario.write_text(
        scenario.read_text() + '\n[simulation.adversaries]\nfraction = 0.2\nattack = "sign_flip"\n'
    )
    with pytest.raises(ConfigError, match="alter updates in the clear"):
        load_scenario(scenario)
