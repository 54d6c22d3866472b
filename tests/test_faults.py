"""Simulated faults: reproducible draws, what each fault does to a node, and how rounds report it.

The mods run around the real ClientApp, in process, on real Flower messages;
the coordinator side is the real strategy and run log. The Ray simulations
with faults are in tests/test_adversaries.py (every lab run there has 20 %
dropout, and checks ε against Opacus).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import flower_context
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from consortia.client.privacy_state import load_state
from consortia.common import protocol as p
from consortia.common.config import FaultsConfig, JobConfig, PrivacyConfig, ScenarioConfig
from consortia.common.config_io import load_scenario
from consortia.common.errors import ConfigError
from consortia.common.models import build_model
from consortia.common.privacy import opacus_epsilon
from consortia.common.weights import model_to_arrays
from consortia.server.rounds.cohort import Cohort
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.server.rounds.run_log import NodeFailure, RunLog, kept_shares
from consortia.server.rounds.strategies import build_strategy
from consortia.simulations.faults import (
    CRASH,
    DROPOUT,
    LATE,
    STREAM_STRAGGLERS,
    chosen_nodes,
    fate_of,
    node_count,
)
from consortia.simulations.lab import lab_client_app
from consortia.simulations.node_data import source_of
from consortia.simulations.virtual_node import virtual_node_app as client_app

SEED = 42
ROUNDS = range(1, 401)


def scenario(**simulation: Any) -> ScenarioConfig:
    """The default scenario (five hospitals, breast cancer) with `[simulation]` keys replaced."""
    data = load_scenario(None, {"rounds": 3}).config.model_dump(mode="json")
    data["privacy"] = {"noise_multiplier": 1.0}  # no calibration: fast fresh nodes
    data["simulation"].update(simulation)
    return ScenarioConfig.model_validate(data)


def faults(config: ScenarioConfig) -> FaultsConfig:
    assert config.simulation.faults is not None
    return config.simulation.faults


def _fates(config: ScenarioConfig, node: str, deadline_s: float = 3600.0) -> list[Any]:
    return [
        fate_of(faults(config), config.simulation, config.seed, node, r, deadline_s) for r in ROUNDS
    ]


# ------------------------------------------------------------------- draws


def test_fault_draws_are_reproducible_per_seed_node_and_round() -> None:
    config = scenario(faults={"dropout": 0.2, "crash": 0.1})
    first, again = _fates(config, "st-mary"), _fates(config, "st-mary")
    assert first == again
    assert first != _fates(config, "riverside")  # another node, other draws
    other_seed = config.model_copy(update={"seed": SEED + 1})
    assert first != _fates(other_seed, "st-mary")
    # The configured probabilities, per node and round (400 rounds: ±0.05 is > 2.5 σ).
    assert abs(np.mean([f.dropout for f in first]) - 0.2) < 0.05
    assert abs(np.mean([f.crash for f in first]) - 0.1) < 0.05


def test_each_fault_has_its_own_stream() -> None:
    """Raising one probability adds faults of that kind and moves no other draw."""
    low = _fates(scenario(faults={"dropout": 0.1, "crash": 0.1}), "lakeview")
    high = _fates(scenario(faults={"dropout": 0.3, "crash": 0.1}), "lakeview")
    assert [f.crash for f in low] == [f.crash for f in high]
    dropped_low = {r for r, f in zip(ROUNDS, low, strict=True) if f.dropout}
    dropped_high = {r for r, f in zip(ROUNDS, high, strict=True) if f.dropout}
    assert dropped_low < dropped_high


def test_stragglers_are_a_fixed_share_with_drawn_delays() -> None:
    stragglers = {"fraction": 0.4, "delay": "uniform", "low_s": 10.0, "high_s": 30.0}
    config = scenario(faults={"stragglers": stragglers})
    slow = chosen_nodes(config.simulation, SEED, 0.4, STREAM_STRAGGLERS)
    assert len(slow) == node_count(0.4, 5) == 2
    for name in config.simulation.node_names or ():
        delays = [f.delay_s for f in _fates(config, name, deadline_s=20.0)]
        if name in slow:
            assert all(10.0 <= d <= 30.0 for d in delays)
            assert abs(np.mean([d > 20.0 for d in delays]) - 0.5) < 0.1  # late half the time
        else:
            assert delays == [0.0] * len(ROUNDS)
    exponential = {"fraction": 1.0, "delay": "exponential", "mean_s": 5.0}
    delays = [f.delay_s for f in _fates(scenario(faults={"stragglers": exponential}), "st-mary")]
    assert abs(np.mean(delays) - 5.0) < 1.0


def test_node_counts_round_and_never_vanish() -> None:
    assert [node_count(f, 10) for f in (0.01, 0.2, 0.25, 0.3, 0.5)] == [1, 2, 3, 3, 5]
    assert node_count(0.2, 5) == 1 and node_count(0.1, 5) == 1


# ---------------------------------------------------------------- the mods


needs_task = pytest.mark.usefixtures("task_identity")  # Messages are built in a Flower task


def _message(config: ScenarioConfig, message_type: str, server_round: int) -> Message:
    source = source_of(config.simulation)
    model = build_model(config.model, source.feature_shape, source.num_classes, config.seed)
    task = p.TaskSpec(job=config.job(), simulation=config.simulation).encode()
    record = ConfigRecord({p.TASK_KEY: task, p.ROUND_KEY: server_round})
    content = RecordDict({p.ARRAYS_KEY: model_to_arrays(model), p.CONFIG_KEY: record})
    return Message(content, dst_node_id=7, message_type=message_type)


def _first_round(config: ScenarioConfig, node: str, **wanted: bool) -> int:
    """The first round in which `node`'s fate has the `wanted` flags."""
    for server_round, fate in zip(ROUNDS, _fates(config, node), strict=True):
        if all(getattr(fate, key) == value for key, value in wanted.items()):
            return server_round
    raise AssertionError(f"no round with {wanted}")


@needs_task
def test_without_faults_or_adversaries_the_app_is_unchanged() -> None:
    assert lab_client_app(client_app, scenario().simulation) is client_app


@needs_task
def test_dropout_answers_at_once_without_training_or_spending() -> None:
    config = scenario(faults={"dropout": 0.5})
    lab = lab_client_app(client_app, config.simulation)
    dropped = _first_round(config, "st-mary", dropout=True)
    context = flower_context(partition_id=0)
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        reply = lab(_message(config, message_type, dropped), context)
        assert p.read_refusal(reply.content) == (
            DROPOUT,
            f"simulated dropout: offline in round {dropped}, no {message_type} reply",
        )
        assert p.ARRAYS_KEY not in reply.content and p.METRICS_KEY not in reply.content
    assert load_state(context).history == []  # nothing trained, nothing spent
    answered = _first_round(config, "st-mary", dropout=False)
    reply = lab(_message(config, MessageType.TRAIN, answered), context)
    assert p.read_refusal(reply.content) is None and p.ARRAYS_KEY in reply.content


@needs_task
def test_a_crash_after_the_spend_keeps_it_on_the_node_and_in_the_report() -> None:
    config = scenario(faults={"crash": 0.5})
    lab = lab_client_app(client_app, config.simulation)
    crashed = _first_round(config, "riverside", crash=True)
    context = flower_context(partition_id=1)
    reply = lab(_message(config, MessageType.TRAIN, crashed), context)
    code, reason = p.read_refusal(reply.content) or ("", "")
    assert code == CRASH and "after the node recorded its privacy spend" in reason
    assert p.ARRAYS_KEY not in reply.content  # the update never left
    history = load_state(context).history
    assert len(history) == 1  # the ledger (here the Context) kept the spend
    metrics = reply.content[p.METRICS_KEY]
    assert metrics[p.EPSILON] == pytest.approx(opacus_epsilon(history, 1e-5, "rdp"), rel=1e-12)
    assert p.WEIGHT not in metrics and p.TRAIN_LOSS not in metrics
    # The next round composes on top of the crashed one.
    following = _first_round(config, "riverside", crash=False)
    reply = lab(_message(config, MessageType.TRAIN, following), context)
    assert p.ARRAYS_KEY in reply.content and len(load_state(context).history) == 2


@needs_task
def test_a_straggler_past_the_deadline_trains_spends_and_is_late() -> None:
    stragglers = {"fraction": 1.0, "delay": "uniform", "low_s": 10.0, "high_s": 20.0}
    config = scenario(faults={"stragglers": stragglers}).model_copy(update={"round_timeout_s": 5.0})
    lab = lab_client_app(client_app, config.simulation)
    context = flower_context(partition_id=2)
    reply = lab(_message(config, MessageType.TRAIN, 1), context)
    code, reason = p.read_refusal(reply.content) or ("", "")
    assert code == LATE and "past the round deadline (round_timeout_s = 5 s)" in reason
    assert len(load_state(context).history) == 1
    assert reply.content[p.METRICS_KEY][p.EPSILON] > 0
    # Evaluation is not delayed; a deadline longer than every delay lets the update through.
    assert p.read_refusal(lab(_message(config, MessageType.EVALUATE, 1), context).content) is None
    patient = config.model_copy(update={"round_timeout_s": 25.0})
    reply = lab_client_app(client_app, patient.simulation)(
        _message(patient, MessageType.TRAIN, 2), context
    )
    assert p.read_refusal(reply.content) is None and p.ARRAYS_KEY in reply.content


# ------------------------------------------------------- what a round reports


NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]
IDS = [11, 22, 33, 44, 55]


def _strategy(job: JobConfig, adversaries: set[str]) -> tuple[Any, RunLog, list[Message]]:
    roster = Roster(
        nodes=tuple(
            NodeEntry(
                node_id=i, name=n, data_fingerprint="f" * 64, feature_shape=(3,), num_classes=2
            )
            for n, i in zip(NAMES, IDS, strict=True)
        )
    )
    strategy = build_strategy(job)
    run_log = RunLog(roster, adversaries=adversaries)
    strategy.attach(Cohort(roster, None, seed=0), run_log, federated_evaluation=True)
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    requests = list(strategy.configure_train(1, arrays, ConfigRecord({p.TASK_KEY: "{}"}), None))
    return strategy, run_log, requests


def _update(request: Message, value: float) -> Message:
    metrics = MetricRecord({p.WEIGHT: 1.0, p.TRAIN_LOSS: 0.5, p.EPSILON: 0.3, p.STEPS: 1})
    arrays = ArrayRecord({"w": Array(np.full(4, value, np.float32))})
    return Message(RecordDict({p.ARRAYS_KEY: arrays, p.METRICS_KEY: metrics}), reply_to=request)


def _fault(request: Message, code: p.RefusalCode, epsilon: float | None) -> Message:
    content = p.refusal_record(code, f"{code} (as the mod words it)")
    if epsilon is not None:
        content[p.METRICS_KEY] = MetricRecord({p.EPSILON: epsilon})
    return Message(content, reply_to=request)


@needs_task
def test_a_round_lists_faults_adversaries_and_each_defence() -> None:
    job = JobConfig(privacy=PrivacyConfig(enabled=False), strategy={"name": "krum"})
    strategy, run_log, (alpha, bravo, charlie, delta, echo) = _strategy(job, {"alpha", "echo"})
    replies = [
        _update(alpha, -5.0),  # an adversary's outlier: Krum leaves it out
        _update(bravo, 1.0),
        _fault(charlie, DROPOUT, None),
        _fault(delta, CRASH, 0.7),
        _update(echo, 1.1),  # an adversary whose update looks honest
    ]
    strategy.aggregate_train(1, replies)
    run_log.record_failures(1, [NodeFailure(node="charlie", reason="x", refusal=DROPOUT)])
    record = run_log.close(1, 0.0)
    assert record.dropouts == ["charlie"] and record.crashes == ["delta"]
    assert record.stragglers == []
    assert record.participants == ["bravo"]  # Krum picks the single best-scored update
    assert record.rejected == {"krum": ["alpha", "echo"]}
    assert record.adversaries == ["alpha", "echo"]  # both sent an update
    assert run_log.epsilon["delta"] == 0.7  # the crashed node's spend is counted
    crash = next(f for f in record.failures if f.node == "delta")
    assert str(crash) == "delta: simulated-crash (as the mod words it)"  # not a "refusal"
    # Records written before these fields existed still load.
    assert type(record).model_validate({"round": 1}).dropouts == []


@needs_task
def test_multikrum_left_outs_and_late_stragglers_are_reported() -> None:
    strategy_config = {"name": "multikrum", "num_malicious_nodes": 1, "num_nodes_to_select": 2}
    job = JobConfig(privacy=PrivacyConfig(enabled=False), strategy=strategy_config)
    strategy, run_log, (alpha, bravo, charlie, delta, echo) = _strategy(job, {"alpha"})
    replies = [
        _update(alpha, -5.0),
        _update(bravo, 1.0),
        _update(charlie, 1.05),
        _update(delta, 3.0),
        _fault(echo, LATE, 0.4),
    ]
    strategy.aggregate_train(1, replies)
    record = run_log.close(1, 0.0)
    assert record.participants == ["bravo", "charlie"]
    assert record.rejected == {"multikrum": ["alpha", "delta"]}
    assert record.stragglers == ["echo"] and record.adversaries == ["alpha"]
    assert run_log.epsilon["echo"] == 0.4  # the late reply still tells the spend


@needs_task
def test_update_check_rejections_are_filed_under_update_checks() -> None:
    job = JobConfig(privacy=PrivacyConfig(enabled=False), update_checks={"max_update_norm": 3.0})
    strategy, run_log, requests = _strategy(job, set())
    replies = [_update(r, 1.0) for r in requests[:4]] + [_update(requests[4], 9.0)]
    strategy.aggregate_train(1, replies)
    record = run_log.close(1, 0.0)
    assert record.rejected == {"update_checks": ["echo"]}
    assert record.adversaries == []


def test_kept_shares_show_which_values_a_trimmed_mean_cut() -> None:
    values = {"alpha": 1.0, "bravo": 2.0, "charlie": 3.0, "delta": 4.0, "echo": 100.0}
    updates = {
        name: ArrayRecord({"w": Array(np.array([v, v, v, 2.5 if v == 100 else v], np.float32))})
        for name, v in values.items()
    }
    # echo is the outlier in three of four coordinates; the fourth cuts alpha and delta.
    trimmed = kept_shares(updates, lowercut=1)
    assert trimmed == {"alpha": 0.0, "bravo": 1.0, "charlie": 1.0, "delta": 0.75, "echo": 0.25}
    median = kept_shares(updates, lowercut=2)
    assert median == {"alpha": 0.0, "bravo": 0.0, "charlie": 0.75, "delta": 0.0, "echo": 0.25}


# ----------------------------------------------------------- configuration


def _load(tmp_path: Path, simulation_block: str) -> ScenarioConfig:
    path = tmp_path / "scenario.toml"
    path.write_text(f"[simulation]\nnodes = 5\n{simulation_block}")
    return load_scenario(path).config


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("[simulation.faults]\ndropout = 1.0\n", "simulation.faults.dropout: Input should be less"),
        ("[simulation.faults]\ncrash = -0.1\n", "simulation.faults.crash: Input should be greater"),
        ("[simulation.faults]\ndropuot = 0.2\n", "dropuot: unknown key (allowed here: crash,"),
        (
            '[simulation.faults.stragglers]\nfraction = 0.5\ndelay = "exponential"\n',
            "'exponential' needs 'mean_s'",
        ),
        (
            '[simulation.faults.stragglers]\nfraction = 0.5\ndelay = "uniform"\n'
            "low_s = 5\nhigh_s = 2\n",
            "low_s (5) exceeds high_s (2)",
        ),
        (
            '[simulation.faults.stragglers]\nfraction = 0.5\ndelay = "uniform"\n'
            "low_s = 1\nhigh_s = 2\nmean_s = 3\n",
            "'uniform' takes no 'mean_s'",
        ),
        (
            '[simulation.faults.stragglers]\nfraction = 0\ndelay = "uniform"\n',
            "stragglers.fraction: Input should be greater than 0",
        ),
        (
            '[simulation.faults.stragglers]\nfraction = 0.5\ndelay = "gamma"\nmean_s = 1\n',
            "delay: Input should be 'exponential' or 'uniform'",
        ),
    ],
)
def test_fault_settings_are_validated(tmp_path: Path, block: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, block)
    assert message in str(info.value)


def test_a_full_faults_block_loads(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        "[simulation.faults]\ndropout = 0.2\ncrash = 0.05\n"
        '[simulation.faults.stragglers]\nfraction = 0.4\ndelay = "exponential"\nmean_s = 30\n',
    )
    assert faults(config).stragglers is not None and faults(config).dropout == 0.2
