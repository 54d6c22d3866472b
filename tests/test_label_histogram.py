"""DP label histograms: the mechanism, its accounting, and the coordinator's skew report."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import flower_context
from flwr.app import MessageType
from test_client_app import _message

from consortia.client.label_histogram import noisy_counts
from consortia.client.privacy_state import load_state
from consortia.common import protocol as p
from consortia.common.config_io import load_scenario
from consortia.common.errors import PrivacyError
from consortia.common.privacy import (
    Release,
    calibrate_noise,
    epsilon,
    histogram_release,
    opacus_epsilon,
)
from consortia.server.rounds.label_skew import label_skew
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.simulations.virtual_node import virtual_node_app as app

SIGMA = 20.0


pytestmark = pytest.mark.usefixtures("task_identity")


def test_noise_is_centred_on_the_counts_with_std_sigma() -> None:
    labels = np.array([0] * 30 + [1] * 50 + [2] * 20)
    draws = np.array(
        [noisy_counts(labels, 3, 4.0, np.random.default_rng(seed)) for seed in range(4000)]
    )
    assert draws.mean(axis=0) == pytest.approx([30, 50, 20], abs=0.3)
    assert draws.std(axis=0) == pytest.approx([4.0] * 3, rel=0.05)
    assert noisy_counts(labels, 3, 4.0, np.random.default_rng(1)) == noisy_counts(
        labels, 3, 4.0, np.random.default_rng(1)
    )


def test_histogram_is_one_gaussian_release_in_the_accountant() -> None:
    release = histogram_release(SIGMA)
    assert (release.sample_rate, release.steps) == (1.0, 1)
    assert epsilon([release], 1e-5) == pytest.approx(opacus_epsilon([release], 1e-5, "rdp"))


def test_calibration_leaves_room_for_the_histogram() -> None:
    prior = [histogram_release(SIGMA)]
    alone = calibrate_noise(1.0, 1e-5, 0.5, 20)
    sigma = calibrate_noise(1.0, 1e-5, 0.5, 20, prior=prior)
    assert sigma > alone  # more noise on DP-SGD: the histogram takes part of ε
    composed = epsilon([*prior, Release(noise_multiplier=sigma, sample_rate=0.5, steps=20)], 1e-5)
    assert 1.0 - 0.01 <= composed <= 1.0
    with pytest.raises(PrivacyError, match="other releases alone spend"):
        calibrate_noise(0.1, 1e-5, 0.5, 20, prior=[histogram_release(1.0)])


def test_simulated_node_shares_and_accounts_its_histogram() -> None:
    scenario = load_scenario(None, {"rounds": 2, "label_histogram": {"noise_multiplier": SIGMA}})
    config = scenario.config
    context = flower_context(partition_id=0)
    identity = app(_message(config, MessageType.QUERY), context).content[p.NODE_KEY]
    counts = identity[p.NODE_LABEL_HISTOGRAM]
    assert isinstance(counts, list) and len(counts) == 2
    assert load_state(context).history == [histogram_release(SIGMA)]  # spent before the reply
    epsilons = []
    for server_round in (1, 2):
        reply = app(_message(config, MessageType.TRAIN, server_round), context)
        epsilons.append(float(reply.content[p.METRICS_KEY][p.EPSILON]))
    history = load_state(context).history
    assert history[0] == histogram_release(SIGMA) and len(history) == 3
    assert epsilons[-1] == pytest.approx(opacus_epsilon(history, 1e-5, "rdp"), rel=1e-12)
    assert epsilons[-1] <= config.privacy.target_epsilon


def _entry(
    name: str, histogram: tuple[float, ...] | None, withheld: str | None = None
) -> NodeEntry:
    return NodeEntry(
        node_id=ord(name[0]),
        name=name,
        data_fingerprint="0" * 64,
        feature_shape=(4,),
        num_classes=2,
        label_histogram=histogram,
        histogram_withheld=withheld,
    )


def test_skew_is_post_processing_of_the_noisy_counts() -> None:
    roster = Roster(
        nodes=(
            _entry("a", (30.0, -5.0)),  # negative noisy count: clipped to zero
            _entry("b", (10.0, 40.0)),
            _entry("c", None, withheld="policy says no"),
        )
    )
    skew = label_skew(roster, SIGMA)
    assert skew.pooled == pytest.approx((0.5, 0.5))
    assert skew.nodes["a"].proportions == pytest.approx((1.0, 0.0))
    assert skew.nodes["a"].total_variation == pytest.approx(0.5)
    assert skew.nodes["b"].total_variation == pytest.approx(0.3)
    assert skew.nodes["c"].withheld == "policy says no" and skew.nodes["c"].proportions is None
    assert any("c: withheld (policy says no)" in line for line in skew.lines())


def test_a_histogram_whose_noisy_counts_all_clip_to_zero_is_reported_as_such() -> None:
    roster = Roster(nodes=(_entry("a", (30.0, 10.0)), _entry("b", (-3.0, -8.0))))
    skew = label_skew(roster, SIGMA)
    assert skew.nodes["b"].proportions is None and "≤ 0" in str(skew.nodes["b"].withheld)
    assert skew.nodes["a"].total_variation == pytest.approx(0.0)


def test_a_histogram_counts_in_the_coordinators_epsilon_before_the_node_trains() -> None:
    """The run log shows the histogram's ε from round 1 on, also for a node not yet sampled."""
    from consortia.server.rounds.run_log import RunLog

    nodes = tuple(
        NodeEntry(node_id=i, name=name, data_fingerprint="0", feature_shape=(2,), num_classes=2)
        for i, name in enumerate(("a", "b"), start=1)
    )
    run_log = RunLog(Roster(nodes=nodes))
    spent = epsilon([histogram_release(SIGMA)], 1e-5)
    run_log.record_spent({"a": spent, "b": spent})
    run_log.record_train(1, participants=["a"], epsilons={"a": 0.0}, train_loss=None, failures=[])
    record = run_log.close(1, seconds=1.0)
    assert record.epsilon == {"a": spent, "b": spent}  # never below what was released
    assert spent > 0
