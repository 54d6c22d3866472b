"""Accounting: consortia's fast composition is Opacus' number, and calibration holds."""

from __future__ import annotations

import itertools

import pytest

from consortia.common.errors import PrivacyError
from consortia.common.privacy import Release, calibrate_noise, epsilon, opacus_epsilon

HISTORIES = [
    [Release(noise_multiplier=1.1, sample_rate=0.01, steps=1000)],
    [Release(noise_multiplier=4.0, sample_rate=1 / 3, steps=3)] * 10,
    [
        Release(noise_multiplier=0.8, sample_rate=0.05, steps=40),
        Release(noise_multiplier=2.0, sample_rate=0.2, steps=15),
        Release(noise_multiplier=0.8, sample_rate=0.05, steps=40),
    ],
]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_rdp_composition_equals_opacus_accountant(history: list[Release], delta: float) -> None:
    assert epsilon(history, delta, "rdp") == pytest.approx(
        opacus_epsilon(history, delta, "rdp"), rel=1e-12
    )


def test_prv_accountant_is_selectable() -> None:
    history = [Release(noise_multiplier=1.0, sample_rate=0.02, steps=200)]
    assert epsilon(history, 1e-5, "prv") == pytest.approx(opacus_epsilon(history, 1e-5, "prv"))
    # PRV is tighter than RDP for the subsampled Gaussian.
    assert epsilon(history, 1e-5, "prv") < epsilon(history, 1e-5, "rdp")


def test_composition_never_decreases_and_is_not_reset_per_round() -> None:
    round_release = Release(noise_multiplier=1.5, sample_rate=0.1, steps=10)
    history: list[Release] = []
    values = []
    for _ in range(6):
        history.append(round_release)
        values.append(epsilon(history, 1e-5))
    assert all(b > a for a, b in itertools.pairwise(values))
    # Six rounds of 10 steps are exactly one release of 60 steps, not six resets.
    assert values[-1] == pytest.approx(
        epsilon([Release(noise_multiplier=1.5, sample_rate=0.1, steps=60)], 1e-5), rel=1e-12
    )
    assert values[-1] > 1.5 * values[0]  # a per-round reset would leave it at values[0]


def test_empty_history_spends_nothing() -> None:
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([Release(noise_multiplier=1.0, sample_rate=0.1, steps=0)], 1e-5) == 0.0


@pytest.mark.parametrize(
    ("target", "sample_rate", "steps"), [(1.0, 1 / 3, 30), (3.0, 0.01, 2000), (0.5, 0.25, 8)]
)
def test_calibrated_noise_meets_target_tightly(
    target: float, sample_rate: float, steps: int
) -> None:
    sigma = calibrate_noise(target, 1e-5, sample_rate, steps)
    spent = epsilon([Release(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)], 1e-5)
    assert spent <= target
    assert spent > target - 0.05  # not wastefully noisy


def test_unreachable_target_is_a_clear_error() -> None:
    with pytest.raises(PrivacyError, match="cannot reach"):
        calibrate_noise(1e-9, 1e-5, 1.0, 10_000)


def test_the_rdp_orders_are_opacus_defaults() -> None:
    """Written out so that the ledger does not import Opacus; they must stay Opacus'."""
    from opacus.accountants import RDPAccountant

    from consortia.common.privacy import RDP_ORDERS

    assert list(RDP_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


def test_a_node_supervisor_and_its_ledger_do_not_import_torch() -> None:
    """`consortia node start` stays beside its SuperNode all the time: torch would be ~250 MiB."""
    import subprocess
    import sys

    script = (
        "import sys, consortia.cli.main, consortia.cli.node, consortia.client.supernode_service, "
        "consortia.client.ledger, consortia.client.node_metrics; "  # its [metrics] endpoint
        "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
    )
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
