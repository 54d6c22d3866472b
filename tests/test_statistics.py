"""Federated statistics: the noise is what it says, the error bars hold, the skewed node shows.

The releases here are made by the node's own code (client/statistics.py)
on the simulation's own Dirichlet split, with fresh noise per repetition,
and summarised by the coordinator's code; the truth is counted from the
same split. No Ray: the query costs milliseconds, so it can be repeated.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from consortia.client.statistics import (
    DataFacts,
    Predictions,
    Selection,
    release_statistics,
    select_features,
)
from consortia.common.arrays import concat
from consortia.common.config import ScenarioConfig, StatisticsConfig
from consortia.common.privacy import Release, epsilon
from consortia.common.statistics import (
    FeatureRelease,
    StatisticsRelease,
    query_noise,
    sensitivities,
)
from consortia.server.statistics.summary import summarize
from consortia.simulations.node_data import simulated_node_data, source_of
from consortia.simulations.virtual_node import simulated_facts

NODES = 10
REPEATS = 30
DELTA = 1e-5


def _scenario(statistics: dict[str, float] | None = None) -> ScenarioConfig:
    """Digits over 10 nodes, Dirichlet(0.5); seed 24 gives one clearly most-skewed node."""
    return ScenarioConfig.model_validate(
        {
            "name": "insight",
            "seed": 24,
            "statistics": statistics or {"target_epsilon": 1.0, "min_count": 0},
            "simulation": {
                "nodes": NODES,
                "data": {"source": "digits"},
                "partition": {"method": "dirichlet", "alpha": 0.5, "min_records": 20},
            },
        }
    )


def _release(
    scenario: ScenarioConfig, node: int, rng: np.random.Generator, predictions: bool = False
) -> tuple[StatisticsRelease, np.ndarray, DataFacts]:
    """Node `node`'s release as its ClientApp makes it (noise from `rng`), its labels, its facts."""
    config = scenario.statistics
    assert config is not None
    data = simulated_node_data(scenario.simulation, scenario.seed, node)
    facts = simulated_facts(source_of(scenario.simulation), concat([data.train, data.test]))
    selection = select_features(facts, config)
    assert isinstance(selection, Selection)
    guess = None
    if predictions:  # a "model" that is right on every even class only
        guess = Predictions(
            predicted=np.where(data.test.y % 2 == 0, data.test.y, (data.test.y + 1) % 10),
            labels=data.test.y,
        )
    blocks = sensitivities(len(selection.columns), None, guess is not None, False)
    sigma, release = query_noise(config, len(blocks), DELTA, "rdp")

    def noise(block: str, size: int) -> np.ndarray:
        return rng.normal(0.0, sigma * blocks[block], size=size)  # type: ignore[index]

    fields = release_statistics(10, facts, selection, guess, config, noise)
    cost = epsilon([release], DELTA, "rdp")
    answer = StatisticsRelease.model_validate(
        {
            **fields,
            "noise_multiplier": sigma,
            "sensitivity": blocks,
            "epsilon": cost,
            "epsilon_spent": cost,
            "delta": DELTA,
        }
    )
    return answer, facts.labels, facts


def _true_shares(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels, minlength=10).astype(float)
    return counts / counts.sum()


@pytest.fixture(scope="module")
def repeated() -> list[tuple[dict[str, StatisticsRelease], dict[str, np.ndarray]]]:
    """REPEATS statistics queries of the same consortium, each with fresh noise."""
    scenario = _scenario()
    runs = []
    for repeat in range(REPEATS):
        rng = np.random.default_rng(1000 + repeat)
        releases, labels = {}, {}
        for node in range(NODES):
            answer, node_labels, _ = _release(scenario, node, rng)
            name = scenario.simulation.node_name(node)
            releases[name], labels[name] = answer, node_labels
        runs.append((releases, labels))
    return runs


def test_per_node_label_shares_lie_within_their_error_bars(repeated) -> None:  # type: ignore[no-untyped-def]
    covered = cells = 0
    for releases, labels in repeated:
        summary = summarize(releases, confidence=0.99, min_count=0.0)
        for name, mix in summary.labels.items():
            truth = _true_shares(labels[name])
            for estimate, share in zip(mix.proportions, truth, strict=True):
                cells += 1
                covered += estimate.covers(float(share))
    assert cells == REPEATS * NODES * 10
    assert covered / cells >= 0.95, f"{covered} of {cells} cells within their error bars"


def test_the_error_bars_are_not_trivially_wide(repeated) -> None:  # type: ignore[no-untyped-def]
    """The coverage test must be able to fail: bars narrower than the spread of shares."""
    releases, _ = repeated[0]
    summary = summarize(releases, confidence=0.99, min_count=0.0)
    errors = [e.error for mix in summary.labels.values() for e in mix.proportions if e.error]
    assert np.median(errors) < 0.15
    # and at a low confidence the same estimates miss the truth often
    missed = total = 0
    for releases, labels in repeated[:5]:
        narrow = summarize(releases, confidence=0.6, min_count=0.0)
        for name, mix in narrow.labels.items():
            for estimate, share in zip(mix.proportions, _true_shares(labels[name]), strict=True):
                total += 1
                missed += not estimate.covers(float(share))
    assert missed / total > 0.2


def test_the_most_skewed_node_is_the_one_with_the_most_skewed_labels(repeated) -> None:  # type: ignore[no-untyped-def]
    _, labels = repeated[0]
    pooled = _true_shares(np.concatenate(list(labels.values())))
    distance = {n: float(np.linalg.norm(_true_shares(y) - pooled)) for n, y in labels.items()}
    truth = max(distance, key=lambda n: distance[n])
    runner_up = sorted(distance.values())[-2]
    assert distance[truth] - runner_up > 0.05  # the split has one clearly most-skewed node
    found = [summarize(r, 0.99, 0.0).most_skewed for r, _ in repeated]
    assert found.count(truth) >= 0.9 * len(found), (truth, found)


def test_feature_means_and_record_counts_within_error_bars(repeated) -> None:  # type: ignore[no-untyped-def]
    scenario = _scenario()
    covered = total = 0
    for releases, labels in repeated:
        summary = summarize(releases, confidence=0.99, min_count=0.0)
        (gray,) = summary.features
        for node in range(NODES):
            name = scenario.simulation.node_name(node)
            data = simulated_node_data(scenario.simulation, scenario.seed, node)
            x = concat([data.train, data.test]).x
            truth_mean = float(x.mean(axis=(2, 3)).mean())
            records = summary.labels[name].records
            total += 2
            covered += gray.nodes[name].mean.covers(truth_mean)
            covered += records.covers(float(len(labels[name])))
    assert covered / total >= 0.95


def test_summary_suppresses_counts_below_the_minimum() -> None:
    release = StatisticsRelease(
        label_counts=(120.0, 3.0, -2.0),
        noise_multiplier=2.0,
        sensitivity={"labels": 1.0},
        epsilon=0.5,
        epsilon_spent=0.5,
        delta=DELTA,
    )
    summary = summarize({"a": release}, confidence=0.99, min_count=5.0)
    counts = summary.labels["a"].counts
    assert counts[0].value == 120.0 and counts[1].value is None and counts[2].value is None
    assert summary.labels["a"].proportions[1].value is None


def test_a_shifted_site_is_an_outlier() -> None:
    """Nine sites alike and one whose feature sits at the top of the range."""

    def site(mean_u: float, n: float = 400.0) -> StatisticsRelease:
        histogram = [0.0] * 10
        histogram[min(9, int((mean_u + 1) / 2 * 10))] = n
        feature = FeatureRelease(
            name="age",
            low=0.0,
            high=100.0,
            histogram=tuple(histogram),
            sum=mean_u * n,
            sum_squares=(mean_u**2 + 0.04) * n,
        )
        return StatisticsRelease(
            label_counts=(n / 2, n / 2),
            features=(feature,),
            noise_multiplier=1.0,
            sensitivity={"labels": 1.0, "histograms": 1.0, "sums": 1.0, "squares": 1.0},
            epsilon=1.0,
            epsilon_spent=1.0,
            delta=DELTA,
        )

    releases = {f"site-{i}": site(-0.2 + 0.01 * i) for i in range(9)}
    releases["odd-one"] = site(0.9)
    summary = summarize(releases, confidence=0.99, min_count=5.0)
    assert [o.node for o in summary.outliers] == ["odd-one"]
    (age,) = summary.features
    assert age.nodes["odd-one"].mean.covers(95.0)
    assert age.nodes["odd-one"].shift is not None and age.nodes["odd-one"].shift > 1.5


def test_per_node_accuracy_carries_noise_and_covers_the_truth() -> None:
    """Test splits of 15-100 digits: at ε ≈ 1 their accuracy is all noise, so σ = 0.5 here."""
    scenario = _scenario({"noise_multiplier": 0.5, "min_count": 0})
    rng = np.random.default_rng(5)
    releases, truth = {}, {}
    for node in range(NODES):
        answer, _, _ = _release(scenario, node, rng, predictions=True)
        name = scenario.simulation.node_name(node)
        test = simulated_node_data(scenario.simulation, scenario.seed, node).test.y
        releases[name], truth[name] = answer, float((test % 2 == 0).mean())
        assert answer.accuracy is not None and answer.sensitivity["accuracy"] == math.sqrt(2)
    summary = summarize(releases, confidence=0.99, min_count=0.0)
    estimates = [summary.accuracy[n].accuracy for n in truth]
    assert sum(e.covers(truth[n]) for e, n in zip(estimates, truth, strict=True)) >= NODES - 1
    assert all(e.value != truth[n] for e, n in zip(estimates, truth, strict=True))  # noised
    per_class = summary.accuracy_pooled.per_class  # type: ignore[union-attr]
    assert all(e.value is not None and e.value > 0.6 for e in per_class[::2])  # even: right
    assert all(e.value is not None and e.value < 0.4 for e in per_class[1::2])  # odd: wrong
    assert all(s.epsilon > 0 for s in summary.spend.values())


def test_blocks_compose_exactly_to_the_recorded_release() -> None:
    """B blocks of σ are one Gaussian of σ/√B: the ledger's ε is the blocks' composed ε."""
    config = StatisticsConfig(noise_multiplier=4.0)
    sigma, release = query_noise(config, 4, DELTA, "rdp")
    assert sigma == 4.0 and release.noise_multiplier == 2.0
    blocks = [Release(noise_multiplier=sigma, sample_rate=1.0, steps=1)] * 4
    assert epsilon([release], DELTA) == pytest.approx(epsilon(blocks, DELTA), rel=1e-12)
    assert epsilon([release], DELTA, "prv") == pytest.approx(
        epsilon(blocks, DELTA, "prv"), rel=1e-3
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_target_epsilon_is_met_not_exceeded(accountant: str) -> None:
    config = StatisticsConfig(target_epsilon=0.5)
    sigma, release = query_noise(config, 5, DELTA, accountant)  # type: ignore[arg-type]
    spent = epsilon([release], DELTA, accountant)  # type: ignore[arg-type]
    assert 0.45 < spent <= 0.5
    assert sigma == pytest.approx(release.noise_multiplier * math.sqrt(5))


def test_a_feature_without_a_public_range_is_not_released() -> None:
    facts = DataFacts(
        features=np.zeros((4, 2)),
        names=("age", "income"),
        ranges={"age": (0.0, 120.0)},
        labels=np.zeros(4, dtype=np.int64),
    )
    selection = select_features(facts, StatisticsConfig(noise_multiplier=1.0))
    assert selection.unranged == ("income",) and selection.columns == (0,)  # type: ignore[union-attr]
    ranged = select_features(
        facts, StatisticsConfig(noise_multiplier=1.0, ranges={"income": (0.0, 1e6)})
    )
    assert ranged.columns == (0, 1)  # type: ignore[union-attr]
    refused = select_features(facts, StatisticsConfig(noise_multiplier=1.0, features=("bmi",)))
    assert getattr(refused, "code", None) == "unknown-feature"


def test_the_config_rejects_what_cannot_be_released() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StatisticsConfig()
    with pytest.raises(ValueError, match="not a range"):
        StatisticsConfig(noise_multiplier=1.0, ranges={"age": (5.0, 5.0)})
    with pytest.raises(ValueError, match="needs 'model'"):
        StatisticsConfig(noise_multiplier=1.0, group_column="sex")


def _identical_mix_releases(rng: np.random.Generator, sigma: float) -> dict[str, StatisticsRelease]:
    """Ten nodes with exactly the same label mix, one of them ten times smaller."""
    mix = np.asarray([0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05])
    releases = {}
    for i in range(10):
        size = 60 if i == 0 else 600
        counts = mix * size + rng.normal(0.0, sigma, size=len(mix))
        releases[f"node-{i:02d}"] = StatisticsRelease(
            label_counts=tuple(counts),
            noise_multiplier=sigma,
            sensitivity={"labels": 1.0},
            epsilon=0.5,
            epsilon_spent=0.5,
            delta=DELTA,
        )
    return releases


def test_noise_alone_makes_no_skewed_node_and_no_outlier() -> None:
    """Identical mixes: neither the small node's noise nor suppressed cells may single it out."""
    rng = np.random.default_rng(8)
    small_named = outliers = 0
    for _ in range(100):
        summary = summarize(_identical_mix_releases(rng, 8.0), 0.99, min_count=10.0)
        small_named += summary.most_skewed == "node-00"
        outliers += bool(summary.outliers)
    assert small_named < 30, small_named  # it was named in most runs when noise counted as skew
    assert outliers < 10, outliers


def test_a_release_that_does_not_fit_the_query_is_named() -> None:
    good = StatisticsRelease(
        label_counts=(1.0, 2.0),
        noise_multiplier=1.0,
        sensitivity={"labels": 1.0},
        epsilon=0.1,
        epsilon_spent=0.1,
        delta=DELTA,
    )
    assert good.problem(num_classes=2, bins=10) is None
    assert "3 classes" in (good.problem(num_classes=3, bins=10) or "")
    feature = FeatureRelease(
        name="age", low=0, high=1, histogram=(1.0,) * 4, sum=0.0, sum_squares=0.0
    )
    no_block = good.model_copy(update={"features": (feature,)})
    assert "histograms" in (no_block.problem(2, 4) or "")
    assert "10 bins" in (no_block.problem(2, 10) or "")
    with pytest.raises(Exception, match="malformed statistics release"):
        StatisticsRelease.decode(good.encode().replace("1.0,2.0", "NaN,2.0"))
