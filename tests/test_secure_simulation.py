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

pytestmark = pytest.mark.slow

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
