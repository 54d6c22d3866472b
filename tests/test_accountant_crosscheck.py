"""consortia's ε against an independent implementation: Google's `dp-accounting`.

consortia states every ε through Opacus' accountants (common/privacy.py,
with its own cached RDP composition). Here the same histories go through
`dp_accounting`, written independently of Opacus:

* RDP: consortia's `epsilon(..., "rdp")` vs `dp_accounting.rdp.RdpAccountant`
  at the same orders. Both compute the RDP of the subsampled Gaussian and
  convert it to (ε, δ); they agree within 1% (relative) over the grid. The
  remaining difference is at small fractional orders, where dp-accounting's
  series sometimes fails to converge and drops the order (its ε is then the
  larger one).
* Numerical accountants: consortia's `epsilon(..., "prv")` (Opacus' PRV
  accountant) vs `dp_accounting.pld.PLDAccountant` (privacy loss
  distributions, 1e-3 discretisation). Both approximate the optimal ε of
  the composition; they agree within 2% (relative) or 0.02 (absolute).
* Ordering: RDP is an upper bound of the optimal ε, so consortia's RDP ε is
  never below the PLD value (beyond its discretisation error). An RDP
  figure under the PLD one would mean an under-count.
"""

from __future__ import annotations

import logging

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from consortia.common.privacy import RDP_ORDERS, Release, epsilon, histogram_release

# (sample rate, noise multiplier, steps, δ): small and large sample rates,
# noise from weak (0.7) to strong (5), one step to ten thousand.
GRID = [
    (0.001, 0.8, 10_000, 1e-6),
    (0.01, 1.1, 1_000, 1e-5),
    (0.05, 1.0, 500, 1e-5),
    (0.1, 2.0, 100, 1e-5),
    (0.2, 0.7, 50, 1e-5),
    (1 / 3, 4.87, 150, 1e-5),  # a mnist-1000-nodes device: 48 records, batch 16, 50 rounds
    (0.5, 1.5, 20, 1e-5),
    (1.0, 5.0, 1, 1e-5),  # the Gaussian mechanism itself (a label histogram)
    (1.0, 1.0, 10, 1e-6),
]


@pytest.fixture(autouse=True)
def _quiet_dp_accounting() -> None:
    """dp-accounting logs a warning for each fractional order it drops; expected here."""
    logging.getLogger().setLevel(logging.ERROR)


def _event(release: Release) -> dp_accounting.DpEvent:
    gaussian = dp_accounting.GaussianDpEvent(release.noise_multiplier)
    step = (
        gaussian
        if release.sample_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(release.sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(step, release.steps)


def _history_event(history: list[Release]) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent([_event(r) for r in history])


def _google_rdp(history: list[Release], delta: float) -> float:
    accountant = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(_history_event(history))
    return float(accountant.get_epsilon(delta))


def _google_pld(history: list[Release], delta: float) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(_history_event(history))
    return float(accountant.get_epsilon(delta))


def _histories() -> list[tuple[str, list[Release], float]]:
    cases = [
        (
            f"q={q:.3g},sigma={s},steps={n},delta={d:g}",
            [Release(noise_multiplier=s, sample_rate=q, steps=n)],
            d,
        )
        for q, s, n, d in GRID
    ]
    # A node's real history: its label histogram, then rounds at one σ and a resumed job at another.
    mixed = [
        histogram_release(3.0),
        Release(noise_multiplier=1.2, sample_rate=0.02, steps=300),
        Release(noise_multiplier=0.9, sample_rate=0.05, steps=120),
    ]
    cases.append(("histogram+two-jobs", mixed, 1e-5))
    return cases


CASES = _histories()
IDS = [name for name, _, _ in CASES]


@pytest.mark.parametrize(("name", "history", "delta"), CASES, ids=IDS)
def test_rdp_epsilon_agrees_with_dp_accounting(
    name: str, history: list[Release], delta: float
) -> None:
    ours, theirs = epsilon(history, delta, "rdp"), _google_rdp(history, delta)
    assert ours == pytest.approx(theirs, rel=0.01), name


@pytest.mark.parametrize(("name", "history", "delta"), CASES, ids=IDS)
def test_prv_epsilon_agrees_with_dp_accountings_pld(
    name: str, history: list[Release], delta: float
) -> None:
    ours, theirs = epsilon(history, delta, "prv"), _google_pld(history, delta)
    assert abs(ours - theirs) <= max(0.02, 0.02 * theirs), (name, ours, theirs)


@pytest.mark.parametrize(("name", "history", "delta"), CASES, ids=IDS)
def test_rdp_epsilon_never_undercuts_the_pld_epsilon(
    name: str, history: list[Release], delta: float
) -> None:
    pld_epsilon = _google_pld(history, delta)
    assert epsilon(history, delta, "rdp") >= pld_epsilon - max(0.01, 0.01 * pld_epsilon), name
