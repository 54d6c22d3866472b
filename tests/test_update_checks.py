"""Update checks before aggregation, the derived norm bound, and the robust aggregators.

Unit tests on real Flower messages (as tests/test_strategies.py builds them),
the bound against real DP-SGD rounds of `train_locally`, and one slow
simulation with the median strategy.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from consortia.client.training import DpSettings, poisson_sample_rate, train_locally
from consortia.common import protocol as p
from consortia.common.arrays import LabeledArrays
from consortia.common.config import (
    FedMedianConfig,
    FedProxConfig,
    FedTrimmedAvgConfig,
    JobConfig,
    KrumConfig,
    ModelConfig,
    MultiKrumConfig,
    PrivacyConfig,
    StrategyConfig,
    TrainingConfig,
    UpdateChecksConfig,
)
from consortia.common.errors import FederationError
from consortia.common.models import build_model
from consortia.common.weights import model_to_arrays
from consortia.server.rounds import update_checks as uc
from consortia.server.rounds.cohort import Cohort
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.server.rounds.run_log import RoundRecord, RunLog
from consortia.server.rounds.strategies import (
    ConsortiaKrum,
    ConsortiaMedian,
    ConsortiaMultiKrum,
    ConsortiaStrategy,
    ConsortiaTrimmedMean,
    build_strategy,
)

NAMES = ["alpha", "bravo", "charlie", "delta"]
IDS = [9001, 17, 4242, 5]  # Flower's ids are random: deliberately not in name order
SHAPES = {"w": (3, 2), "b": (2,)}
DIM = 8
# What every honest reply below reports: 10 DP-SGD steps at σ = 1 and q = 0.1.
STEPS, SIGMA, RATE = 10, 1.0, 0.1
DP_JOB = JobConfig(
    training=TrainingConfig(learning_rate=0.1, batch_size=32),
    privacy=PrivacyConfig(noise_multiplier=SIGMA, max_grad_norm=1.0),
)
NO_DP = JobConfig(privacy=PrivacyConfig(enabled=False))

pytestmark = pytest.mark.usefixtures("task_identity")


# ------------------------------------------------------------------ helpers


def _arrays(value: float | np.ndarray) -> ArrayRecord:
    return ArrayRecord(
        {
            key: Array(np.broadcast_to(np.float32(value), shape).astype(np.float32))
            for key, shape in SHAPES.items()
        }
    )


def _strategy(job: JobConfig) -> tuple[ConsortiaStrategy, RunLog, list[Message]]:
    roster = Roster(
        nodes=tuple(
            NodeEntry(
                node_id=i, name=n, data_fingerprint="f" * 64, feature_shape=(3,), num_classes=2
            )
            for n, i in sorted(zip(NAMES, IDS, strict=True))
        )
    )
    strategy = build_strategy(job)
    run_log = RunLog(roster)
    strategy.attach(Cohort(roster, None, seed=0), run_log, federated_evaluation=True)
    requests = list(
        strategy.configure_train(1, _arrays(0.0), ConfigRecord({p.TASK_KEY: "{}"}), None)  # type: ignore[arg-type]
    )
    return strategy, run_log, requests


def _reply(request: Message, arrays: ArrayRecord, eps: float = 0.5, **metrics: object) -> Message:
    record = MetricRecord(
        {
            p.WEIGHT: 1.0,
            p.EPSILON: eps,
            p.TRAIN_LOSS: 0.7,
            p.STEPS: STEPS,
            p.NOISE_MULTIPLIER: SIGMA,
            p.SAMPLE_RATE: RATE,
        }
    )
    for key, value in metrics.items():
        if value is None:
            del record[key.replace("_", "-")]
        else:
            record[key.replace("_", "-")] = value  # type: ignore[assignment]
    return Message(RecordDict({p.ARRAYS_KEY: arrays, p.METRICS_KEY: record}), reply_to=request)


def _honest(request: Message, value: float) -> Message:
    return _reply(request, _arrays(value))


def _round(
    job: JobConfig, updates: list[float | ArrayRecord | Message]
) -> tuple[ArrayRecord, RoundRecord, ConsortiaStrategy]:
    """Aggregate one round in which node i (alpha..delta) sends `updates[i]`."""
    strategy, run_log, requests = _strategy(job)
    replies = [
        u if isinstance(u, Message) else _reply(r, u if isinstance(u, ArrayRecord) else _arrays(u))
        for r, u in zip(requests, updates, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert arrays is not None
    return arrays, run_log.close(1, 0.0), strategy


def _reasons(record: RoundRecord) -> dict[str, str]:
    return {f.node: f.reason for f in record.failures}


def _bound(job: JobConfig = DP_JOB, **metrics: object) -> uc.NormBound:
    values = {p.STEPS: STEPS, p.NOISE_MULTIPLIER: SIGMA, p.SAMPLE_RATE: RATE}
    values.update({k.replace("_", "-"): v for k, v in metrics.items()})  # type: ignore[misc]
    bound = uc.UpdateChecks(job).bound(MetricRecord(values), uc.ReferenceModel.of(_arrays(0.0)))  # type: ignore[arg-type]
    assert isinstance(bound, uc.NormBound)
    return bound


# ------------------------------------------------- one bad node of four


def test_honest_updates_pass_the_derived_bound() -> None:
    bound = _bound()
    assert 1.0 < bound.value < 3.0  # lr 0.1 · C 1 · (~15 records-worth + noise) · 1.5
    arrays, record, _ = _round(DP_JOB, [0.05, 0.1, -0.05, 0.02])
    assert record.participants == NAMES and record.failures == []
    np.testing.assert_allclose(arrays["w"].numpy(), 0.03, rtol=1e-6)


def test_nan_update_is_dropped_and_the_others_aggregate() -> None:
    nan = _arrays(0.1)
    nan["w"] = Array(np.array([[0.1, np.nan], [0.1, 0.1], [0.1, 0.1]], np.float32))
    arrays, record, _ = _round(DP_JOB, [0.1, nan, 0.2, 0.3])
    assert record.participants == ["alpha", "charlie", "delta"]
    assert _reasons(record) == {"bravo": "update holds NaN or infinite values"}
    np.testing.assert_allclose(arrays["w"].numpy(), 0.2, rtol=1e-6)
    # The rejected node trained, so its ε is on record all the same.
    assert record.epsilon == dict.fromkeys(NAMES, 0.5)


def test_wrong_shape_update_is_dropped_and_the_others_aggregate() -> None:
    wrong = _arrays(0.1)
    wrong["b"] = Array(np.zeros(3, np.float32))
    arrays, record, _ = _round(DP_JOB, [0.1, 0.2, wrong, 0.3])
    assert record.participants == ["alpha", "bravo", "delta"]
    assert _reasons(record) == {"charlie": "array 'b' is float32[3], expected float32[2]"}
    np.testing.assert_allclose(arrays["b"].numpy(), 0.2, rtol=1e-6)


def test_scaled_update_is_dropped_with_its_norm_and_the_bound() -> None:
    honest = 0.1
    boosted = -100 * honest  # sign-flipped, ×100: the naive model-poisoning attack
    arrays, record, _ = _round(DP_JOB, [honest, boosted, honest, honest])
    assert record.participants == ["alpha", "charlie", "delta"]
    reason = _reasons(record)["bravo"]
    bound = _bound()
    norm = abs(boosted) * math.sqrt(DIM)
    assert reason.startswith(f"update norm {norm:.4g} exceeds the bound {bound.value:.4g} (")
    assert "derived from lr 0.1 × C 1, 10 steps, σ 1, q 0.1, expected batch ≥ 28, d 8" in reason
    assert reason.endswith("× slack 1.5)")
    np.testing.assert_allclose(arrays["w"].numpy(), honest, rtol=1e-6)


def test_norm_is_measured_from_the_global_model() -> None:
    strategy = build_strategy(DP_JOB)
    reference = uc.ReferenceModel.of(_arrays(5.0))
    assert reference.dim == DIM and reference.norm == pytest.approx(5 * math.sqrt(DIM))
    assert uc.update_norm(_arrays(5.5), reference) == pytest.approx(0.5 * math.sqrt(DIM))
    metrics = _honest(_strategy(DP_JOB)[2][0], 0.0).content[p.METRICS_KEY]
    checks = strategy.update_checks
    assert checks.problem(_arrays(5.1), metrics, reference, scan=False) is None
    assert "exceeds the bound" in str(checks.problem(_arrays(0.0), metrics, reference, scan=False))


def test_reply_without_what_the_bound_needs_is_dropped() -> None:
    strategy, run_log, (a, b, c, d) = _strategy(DP_JOB)
    replies = [
        _honest(a, 0.1),
        _reply(b, _arrays(0.1), steps=None),
        _reply(c, _arrays(0.1), sample_rate=0.0),
        _reply(d, _arrays(0.1), noise_multiplier=float("nan")),
    ]
    strategy.aggregate_train(1, replies)
    reasons = _reasons(run_log.close(1, 0.0))
    assert reasons["bravo"].startswith("reply lacks a valid 'steps' count")
    assert reasons["charlie"].startswith("reply lacks a valid 'sample-rate'")
    assert reasons["delta"].startswith("reply lacks a valid 'noise-multiplier'")


def test_too_few_updates_stop_the_run_naming_every_rejected_node() -> None:
    job = DP_JOB.model_copy(update={"update_checks": UpdateChecksConfig(min_updates=3)})
    strategy, run_log, (a, b, c, d) = _strategy(job)
    nan = _arrays(0.1)
    nan["b"] = Array(np.array([np.inf, 0.0], np.float32))
    replies = [_honest(a, 0.1), _honest(b, 50.0), _reply(c, nan), _honest(d, 0.2)]
    with pytest.raises(FederationError) as info:
        strategy.aggregate_train(1, replies)
    message = str(info.value)
    assert message.startswith(
        "round 1: only 2 usable update(s) (alpha, delta), fewer than update_checks.min_updates = 3"
    )
    assert "bravo: update norm 141.4 exceeds the bound" in message
    assert "charlie: update holds NaN or infinite values" in message
    # The round's record (metrics.json, and the audit hook) still holds every reason.
    record = run_log.close(1, 0.0)
    assert set(_reasons(record)) == {"bravo", "charlie"}
    assert record.epsilon == dict.fromkeys(NAMES, 0.5)


def test_explicit_bound_replaces_the_derived_one_and_applies_without_dp() -> None:
    job = NO_DP.model_copy(update={"update_checks": UpdateChecksConfig(max_update_norm=2.0)})
    _, record, _ = _round(job, [0.1, 0.8, 0.1, 0.1])  # 0.8·√8 = 2.26 > 2
    assert _reasons(record) == {
        "bravo": "update norm 2.263 exceeds the bound 2 (update_checks.max_update_norm 2)"
    }
    # Plain SGD without DP has no clipping: without max_update_norm nothing bounds the norm.
    _, record, _ = _round(NO_DP, [0.1, 80.0, 0.1, 0.1])
    assert record.failures == [] and uc.UpdateChecks(NO_DP).bounds_norm is False


# ------------------------------------------------------- the derived bound


def test_min_expected_batch_never_exceeds_opacus_batch() -> None:
    """For every record count, the bound's B is at most the B Opacus divides by."""
    for batch_size in (1, 7, 32, 128):
        for records in range(1, 700):
            rate = poisson_sample_rate(records, batch_size)
            opacus = int(records * rate)  # PrivacyEngine.make_private's expected batch size
            assert 1 <= uc.min_expected_batch(rate, batch_size, 1) <= max(opacus, 1)
            if rate < 1:  # known from q alone, within a factor 2 of the truth
                assert uc.min_expected_batch(rate, batch_size, 1) >= batch_size // 2 - 1
    assert uc.min_expected_batch(1.0, 128, 40) == 40
    assert uc.min_expected_batch(0.5, 128, 1) == 64


def test_adam_bound_uses_torchs_default_betas() -> None:
    default = inspect.signature(torch.optim.Adam).parameters["betas"].default
    assert tuple(default) == uc.ADAM_BETAS
    # r_1 = 1: the first Adam step moves every coordinate by at most lr.
    assert uc.adam_bound(learning_rate=0.1, steps=1, dim=100) == pytest.approx(1.0)


def _node_data(records: int, seed: int) -> LabeledArrays:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(records, 10)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=records) > 0).astype(np.int64)
    return LabeledArrays(x, y)


@pytest.mark.parametrize(
    ("model", "records", "optimizer", "momentum", "proximal_mu", "looseness"),
    [
        # measured bound / ‖Δ‖ on these seeds: 11-14, 19-26, 10-14, 4-6, 5-10, 1.6-1.9
        ("logreg", 300, "sgd", 0.0, 0.0, 20),
        ("logreg", 300, "sgd", 0.9, 0.0, 40),
        ("mlp", 300, "sgd", 0.9, 0.5, 20),
        ("mlp", 300, "adam", 0.0, 0.0, 10),
        ("logreg", 40, "sgd", 0.0, 0.0, 15),  # q = 1: all 40 records in every batch
        ("logreg", 40, "adam", 0.0, 0.0, 5),
    ],
)
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_derived_bound_holds_for_real_dp_sgd_rounds(
    model: str,
    records: int,
    optimizer: str,
    momentum: float,
    proximal_mu: float,
    looseness: float,
    sigma: float,
) -> None:
    """Real DP-SGD rounds (fused path and Opacus' hooks) never exceed the bound, nor by far under.

    `min_node_records` is the true record count here, as a consortium that
    knows its smallest dataset would set it; the default (1) is sound too but
    loose for nodes whose data fits in one batch.
    """
    training = TrainingConfig(
        batch_size=32 if records > 64 else 64,
        learning_rate=0.5 if optimizer == "sgd" else 0.02,
        momentum=momentum,
        optimizer=optimizer,  # type: ignore[arg-type]
        local_epochs=2,
        dp_engine="opacus" if model == "mlp" else "auto",
    )
    strategy: StrategyConfig = FedProxConfig(proximal_mu=proximal_mu)
    job = JobConfig(
        model=ModelConfig(name=model, hidden=(16,)),  # type: ignore[arg-type]
        training=training,
        privacy=PrivacyConfig(noise_multiplier=sigma, max_grad_norm=1.0),
        strategy=strategy,
        update_checks=UpdateChecksConfig(min_node_records=records),
    )
    default_checks = job.model_copy(update={"update_checks": UpdateChecksConfig()})
    for seed in range(3):
        net = build_model(job.model, (10,), 2, seed)
        reference = uc.ReferenceModel.of(model_to_arrays(net))
        result = train_locally(
            net,
            _node_data(records, seed),
            training,
            DpSettings(sigma, 1.0),
            seed=seed,
            device=torch.device("cpu"),
            proximal_mu=proximal_mu,
        )
        metrics = MetricRecord(
            {p.STEPS: result.steps, p.NOISE_MULTIPLIER: sigma, p.SAMPLE_RATE: result.sample_rate}
        )
        norm = uc.update_norm(model_to_arrays(net), reference)
        bound = uc.UpdateChecks(job).bound(metrics, reference)
        loose = uc.UpdateChecks(default_checks).bound(metrics, reference)
        assert isinstance(bound, uc.NormBound) and isinstance(loose, uc.NormBound)
        assert 0 < norm <= bound.value <= loose.value, (seed, norm, bound)
        assert bound.value <= looseness * norm, (seed, norm, bound)


# ------------------------------------------------------- robust aggregation


def test_median_resists_one_byzantine_node_and_keeps_the_replies_intact() -> None:
    strategy, _, requests = _strategy(NO_DP.model_copy(update={"strategy": FedMedianConfig()}))
    assert isinstance(strategy, ConsortiaMedian)
    replies = [_honest(r, v) for r, v in zip(requests, [1.0, 2.0, 3.0, 1000.0], strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and arrays["w"].dtype == "float32"
    np.testing.assert_allclose(arrays["w"].numpy(), 2.5)  # the mean would be 251.5
    # Flower's FedMedian pops arrays out of what it aggregates: it got views, not our replies.
    assert all(set(r.content[p.ARRAYS_KEY]) == {"w", "b"} for r in replies)


def test_trimmed_mean_resists_one_byzantine_node() -> None:
    job = NO_DP.model_copy(update={"strategy": FedTrimmedAvgConfig(beta=0.25)})
    arrays, record, strategy = _round(job, [1.0, 2.0, 3.0, -1000.0])
    assert isinstance(strategy, ConsortiaTrimmedMean)
    np.testing.assert_allclose(arrays["w"].numpy(), 1.5)  # mean of the middle two
    assert record.participants == NAMES


def test_krum_picks_an_honest_node_and_reports_the_others() -> None:
    job = NO_DP.model_copy(update={"strategy": KrumConfig(num_malicious_nodes=0)})
    arrays, record, strategy = _round(job, [0.9, 1.0, 1.2, 1000.0])
    assert isinstance(strategy, ConsortiaKrum)
    np.testing.assert_allclose(arrays["w"].numpy(), 1.0)
    assert record.participants == ["bravo"]
    reasons = _reasons(record)
    assert set(reasons) == {"alpha", "charlie", "delta"}
    assert reasons["delta"].startswith("not selected by Krum (f = 0)")
    assert "the selected bravo" in reasons["delta"]


def test_multikrum_averages_the_best_scored_updates() -> None:
    job = NO_DP.model_copy(
        update={"strategy": MultiKrumConfig(num_malicious_nodes=0, num_nodes_to_select=2)}
    )
    arrays, record, strategy = _round(job, [0.9, 1.0, 1.2, -1000.0])
    assert isinstance(strategy, ConsortiaMultiKrum)
    assert record.participants == ["alpha", "bravo"]
    np.testing.assert_allclose(arrays["w"].numpy(), 0.95, rtol=1e-6)
    assert _reasons(record)["delta"].startswith("not selected by Multi-Krum")


@pytest.mark.parametrize(
    "config",
    [FedMedianConfig(), FedTrimmedAvgConfig(beta=0.25), KrumConfig(num_malicious_nodes=0)],
)
def test_robust_strategies_scan_every_update_for_nan(config: StrategyConfig) -> None:
    """A median can hide a NaN in one update, so without a norm bound each reply is scanned."""
    job = NO_DP.model_copy(update={"strategy": config})
    nan = _arrays(1.0)
    nan["b"] = Array(np.array([np.nan, 1.0], np.float32))
    _, record, _ = _round(job, [1.0, 1.1, nan, 0.9])
    assert _reasons(record)["charlie"] == "update holds NaN or infinite values"
    assert "charlie" not in record.participants


@pytest.mark.parametrize(
    "config",
    [FedMedianConfig(), FedTrimmedAvgConfig(beta=0.25), MultiKrumConfig(num_malicious_nodes=0)],
)
def test_robust_aggregation_does_not_depend_on_arrival_order(config: StrategyConfig) -> None:
    job = DP_JOB.model_copy(update={"strategy": config})
    strategy, _, requests = _strategy(job)
    rng = np.random.default_rng(3)
    replies = [
        _reply(
            r,
            ArrayRecord(
                {k: Array(rng.normal(0, 0.1, s).astype(np.float32)) for k, s in SHAPES.items()}
            ),
        )
        for r in requests
    ]
    forward, _ = strategy.aggregate_train(1, replies)
    backward, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert forward is not None and backward is not None
    assert all(forward[k].data == backward[k].data for k in forward)


def test_the_norm_check_runs_before_the_robust_aggregator() -> None:
    """Under DP the ×100 update never reaches Krum's selection: it is rejected with its norm."""
    job = DP_JOB.model_copy(update={"strategy": KrumConfig(num_malicious_nodes=0)})
    _, record, _ = _round(job, [0.1, -10.0, 0.12, 0.11])
    reasons = _reasons(record)
    assert reasons["bravo"].startswith("update norm 28.28 exceeds the bound")
    assert len(record.participants) == 1 and record.participants[0] != "bravo"


# -------------------------------------------------------------- simulation


@pytest.mark.slow
@pytest.mark.ray
def test_median_strategy_runs_the_default_scenario(tmp_path: Path) -> None:
    from consortia.common.config_io import load_scenario
    from consortia.simulations.engine import simulate

    class _Quiet:
        def on_start(self, total_rounds: int, roster: object, skew: object) -> None: ...
        def on_round_started(self, server_round: int) -> None: ...

        def on_round(self, record: object) -> None: ...

    loaded = load_scenario(None, {"rounds": 2, "strategy": {"name": "median"}})
    summary = simulate(loaded, tmp_path / "median", _Quiet())
    assert [len(r.participants) for r in summary.rounds] == [5, 5]
    # Every honest DP-SGD update passed the derived norm bound.
    assert all(r.failures == [] for r in summary.rounds)
    assert summary.final.accuracy is not None and summary.final.accuracy > 0.6
    assert all(0 < eps <= 1.0 for eps in summary.final.epsilon.values())
