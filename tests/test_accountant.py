"""The one accountant (common/privacy.py): incremental composition and bounded calibration.

* Composition: the incremental accountants give, bit for bit, the ε of the
  formula consortia used before they existed (RDP: a zero vector plus
  `steps × compute_rdp(q, σ, 1)` per release, converted by Opacus; PRV:
  Opacus' `PRVAccountant` over the history merged per (σ, q)).
* Calibration: a reachable target is met and not exceeded, with the very σ
  Opacus' `get_noise_multiplier` returns; an unreachable one is refused in
  seconds, with a bounded number of ε evaluations, naming the smallest ε
  reachable (issue 18: ε = 0.01 on the default scenario took minutes).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import CliRunner, one_cli_error
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from consortia.common import privacy
from consortia.common.privacy import (
    RDP_ORDERS,
    SIGMA_MAX,
    AccountantName,
    Mechanism,
    PrvAccountant,
    RdpAccountant,
    Release,
    UnreachableTargetError,
    calibrate_noise,
    check_reachable,
    epsilon,
    histogram_release,
    new_accountant,
    rdp_epsilon_floor,
)

DELTA = 1e-5


def _release(sigma: float, q: float, steps: int) -> Release:
    return Release(noise_multiplier=sigma, sample_rate=q, steps=steps)


HISTORIES = [
    [_release(1.1, 0.01, 1000)],
    [histogram_release(3.0), *[_release(4.0, 1 / 3, 3)] * 10],
    [_release(0.8, 0.05, 40), _release(2.0, 0.2, 0), _release(2.0, 0.2, 15)] * 3,
]


def _previous_rdp_formula(history: list[Release], delta: float) -> float:
    """consortia's RDP ε before the accountant (common/privacy.py and client/ledger.py)."""
    if all(r.steps == 0 for r in history):
        return 0.0
    rdp = np.zeros(len(RDP_ORDERS))
    for r in history:
        rdp += r.steps * _opacus_curve(r.noise_multiplier, r.sample_rate)
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@functools.cache
def _opacus_curve(sigma: float, q: float) -> np.ndarray:
    curve: np.ndarray = rdp_analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS)
    )
    return curve


def _previous_prv_formula(history: list[Release], delta: float) -> float:
    merged: dict[tuple[float, float], int] = {}
    for r in history:
        if r.steps:
            key = (r.noise_multiplier, r.sample_rate)
            merged[key] = merged.get(key, 0) + r.steps
    reference = PRVAccountant()
    reference.history = [(s, q, n) for (s, q), n in merged.items()]
    return float(reference.get_epsilon(delta=delta))


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_accountant_is_the_previous_formula_bit_for_bit(history: list[Release]) -> None:
    accountant = RdpAccountant()
    for count, release in enumerate(history, start=1):
        accountant.compose(release)
        assert accountant.epsilon(DELTA) == _previous_rdp_formula(history[:count], DELTA)
    assert epsilon(history, DELTA, "rdp") == _previous_rdp_formula(history, DELTA)
    # A ledger stores the state and loads it back: same ε, same continuation.
    reloaded = RdpAccountant(accountant.composed.copy())
    assert reloaded.epsilon(1e-3) == accountant.epsilon(1e-3)


def test_prv_accountant_is_the_previous_formula() -> None:
    history = [_release(1.0, 0.02, 60), histogram_release(2.0), _release(1.0, 0.02, 40)]
    assert epsilon(history, DELTA, "prv") == _previous_prv_formula(history, DELTA)
    accountant = PrvAccountant(history)
    assert accountant.history == [_release(1.0, 0.02, 100), histogram_release(2.0)]


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_projection_leaves_the_accountant_as_it_was(name: AccountantName) -> None:
    accountant = new_accountant(name)
    accountant.compose(_release(1.2, 0.05, 30))
    before = accountant.epsilon(DELTA)
    more = _release(0.9, 0.1, 20)
    projected = accountant.projected(more, DELTA)
    assert accountant.epsilon(DELTA) == before < projected
    accountant.compose(more)
    assert accountant.epsilon(DELTA) == projected


def test_every_mechanism_is_accounted_and_a_gaussian_release_is_one_full_batch_step() -> None:
    release = histogram_release(2.5)
    for mechanism in Mechanism:  # a member without its case in `accounted_as` fails here
        assert isinstance(mechanism.accounted_as(release), Release)
    dpsgd, gaussian = RdpAccountant(), RdpAccountant()
    dpsgd.compose(release, Mechanism.DPSGD)
    gaussian.compose(release, Mechanism.GAUSSIAN)
    assert gaussian.epsilon(DELTA) == dpsgd.epsilon(DELTA)


# ------------------------------------------------------------------ calibration


def _count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Every ε evaluation calibration makes, as (σ, sample rate)."""
    calls: list[tuple[float, float]] = []
    evaluate: Callable[..., float] = privacy._Problem.epsilon_at

    def counted(problem: privacy._Problem, sigma: float, sample_rate: float | None = None) -> float:
        calls.append((sigma, problem.sample_rate if sample_rate is None else sample_rate))
        return evaluate(problem, sigma, sample_rate)

    monkeypatch.setattr(privacy._Problem, "epsilon_at", counted)
    return calls


@pytest.mark.parametrize(
    ("target", "sample_rate", "steps", "accountant"),
    [(1.0, 1 / 3, 30, "rdp"), (0.5, 0.25, 8, "rdp"), (0.15, 1.0, 40, "rdp"), (1.0, 1.0, 10, "prv")],
)
def test_a_reachable_target_is_met_not_exceeded_with_opacus_sigma(
    target: float, sample_rate: float, steps: int, accountant: AccountantName
) -> None:
    sigma = calibrate_noise(target, DELTA, sample_rate, steps, accountant)
    spent = epsilon([_release(sigma, sample_rate, steps)], DELTA, accountant)
    assert target - privacy.EPSILON_TOLERANCE < spent <= target
    assert sigma == get_noise_multiplier(
        target_epsilon=target,
        target_delta=DELTA,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        epsilon_tolerance=privacy.EPSILON_TOLERANCE,
    )


def test_the_issue_18_target_is_refused_at_once_by_the_closed_form_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ε = 0.01 on the default scenario's largest hospital (q = 0.5, 20 steps): 44-94 s before."""
    calls = _count_evaluations(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(UnreachableTargetError) as refused:
        calibrate_noise(0.01, DELTA, 0.5, 20)
    assert time.perf_counter() - start < 20
    assert calls == []  # no ε evaluated: the RDP floor is closed form
    floor = rdp_epsilon_floor(DELTA)
    assert floor == pytest.approx(0.1029, abs=1e-4)
    assert refused.value.smallest_epsilon == floor
    assert f"no noise brings its ε below {floor:.4g}" in refused.value.message
    assert "cannot reach ε=0.01" in refused.value.message
    # Indeed: even at σ = 10^6 the RDP accountant says more than the floor.
    assert epsilon([_release(1e6, 1.0, 20)], DELTA) > floor


def test_a_target_beyond_the_cap_costs_three_evaluations_and_names_what_is_reachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = rdp_epsilon_floor(DELTA) + 1e-5  # above the floor, below ε at the cap
    calls = _count_evaluations(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(UnreachableTargetError) as refused:
        calibrate_noise(target, DELTA, 0.5, 20)
    assert time.perf_counter() - start < 20
    # σ = 20, then the closed-form bound at the cap (q = 1), then the cap itself.
    assert calls == [(20.0, 0.5), (SIGMA_MAX, 1.0), (SIGMA_MAX, 0.5)]
    at_cap = epsilon([_release(SIGMA_MAX, 0.5, 20)], DELTA)
    assert refused.value.smallest_epsilon == at_cap > target
    assert f"the smallest ε reachable is {at_cap:.4g}, at σ=2000" in refused.value.message


def test_prv_target_beyond_the_cap_is_refused_with_the_reachable_epsilon() -> None:
    with pytest.raises(UnreachableTargetError, match=r"smallest ε reachable is 0\.01") as refused:
        calibrate_noise(0.01, DELTA, 1.0, 10, "prv")
    assert refused.value.smallest_epsilon == epsilon([_release(SIGMA_MAX, 1.0, 10)], DELTA, "prv")


def test_checking_a_reachable_target_costs_one_closed_form_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_evaluations(monkeypatch)
    check_reachable(1.0, DELTA, 0.01, 2000)
    assert calls == [(SIGMA_MAX, 1.0)]


def test_an_unreachable_target_is_one_cli_message_before_ray_starts(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text("[privacy]\ntarget_epsilon = 0.01\n")  # the default scenario otherwise
    start = time.perf_counter()
    result = consortia_cli("simulate", str(scenario), cwd=tmp_path, timeout=300)
    elapsed = time.perf_counter() - start
    message = one_cli_error(result)
    assert "cannot reach ε=0.01" in message and "no noise brings its ε below 0.1029" in message
    assert "error: node " in message  # the node whose calibration fails, named once
    assert "Ray" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()
    assert elapsed < 120  # interpreter and torch start-up; no Ray, no calibration search
