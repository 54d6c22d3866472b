"""Byzantine nodes: the attacks, who the adversaries are, and three short lab runs on Ray.

Unit tests call the attack functions and the mod around the real ClientApp
in process. The slow tests run one scenario three times on Flower's
simulation engine, every run with 20 % dropout per node and round: clean
(FedAvg), and with 20 % sign-flipping nodes under FedAvg and under Krum.
They check the robustness claim and, on the same runs, that every node's ε
is Opacus' accountant over exactly the rounds it trained in.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MNIST_DIR, flower_context
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from consortia.client.spend import planned_release
from consortia.common import protocol as p
from consortia.common.config import AdversariesConfig, ScenarioConfig
from consortia.common.config_io import load_scenario
from consortia.common.errors import ConfigError
from consortia.common.models import build_model
from consortia.common.privacy import Release, opacus_epsilon
from consortia.common.weights import model_to_arrays
from consortia.server.rounds.run_log import RoundRecord
from consortia.simulations.adversaries import (
    add_noise,
    adversary_names,
    flip_labels,
    poison_update,
    poisoned,
    scale,
    sign_flip,
)
from consortia.simulations.engine import simulate
from consortia.simulations.faults import STREAM_ATTACK_NOISE, fate_of, node_rng
from consortia.simulations.lab import lab_client_app
from consortia.simulations.node_data import simulated_node_data, source_of
from consortia.simulations.virtual_node import virtual_node_app as client_app

needs_task = pytest.mark.usefixtures("task_identity")  # Messages are built in a Flower task


def _arrays(w: list[float], counter: int = 3) -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.array(w, np.float32)),
            "count": Array(np.array([counter], np.int64)),  # an integer buffer: never attacked
        }
    )


def _values(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}


# ----------------------------------------------------------------- attacks


def test_sign_flip_and_scale_act_on_local_minus_global() -> None:
    global_, local = _arrays([1.0, 2.0, -1.0]), _arrays([1.5, 1.0, -1.0], counter=4)
    flipped = _values(sign_flip(global_, local))
    np.testing.assert_allclose(flipped["w"], [0.5, 3.0, -1.0])  # global − (local − global)
    assert flipped["w"].dtype == np.float32 and flipped["count"].tolist() == [4]
    np.testing.assert_allclose(_values(scale(global_, local, 10.0))["w"], [6.0, -8.0, -1.0])
    np.testing.assert_allclose(_values(scale(global_, local, -1.0))["w"], flipped["w"])
    assert list(sign_flip(global_, local)) == ["w", "count"]  # key order kept


def test_noise_is_gaussian_and_reproducible_per_node_and_round() -> None:
    local = ArrayRecord({"w": Array(np.zeros(20_000, np.float32))})

    def noisy(server_round: int) -> np.ndarray:
        rng = node_rng(42, "st-mary", server_round, STREAM_ATTACK_NOISE)
        return _values(add_noise(local, 0.5, rng))["w"]

    first = noisy(1)
    assert abs(first.std() - 0.5) < 0.01 and abs(first.mean()) < 0.01
    np.testing.assert_array_equal(first, noisy(1))
    assert not np.array_equal(first, noisy(2))


def test_label_flip_reverses_classes_and_keeps_test_split_and_fingerprint() -> None:
    assert flip_labels(np.array([0, 1, 1, 0]), 2).tolist() == [1, 0, 0, 1]
    assert flip_labels(np.array([0, 3, 9], np.int64), 10).tolist() == [9, 6, 0]
    config = load_scenario().config
    honest = simulated_node_data(config.simulation, config.seed, 0)
    bad = poisoned(honest)
    np.testing.assert_array_equal(bad.train.y, 1 - honest.train.y)
    np.testing.assert_array_equal(bad.train.x, honest.train.x)
    assert bad.test is honest.test and bad.fingerprint() == honest.fingerprint()


def test_adversaries_are_drawn_from_the_seed() -> None:
    config = _scenario({"fraction": 0.4, "attack": "sign_flip"})
    chosen = adversary_names(config.simulation, config.seed)
    assert len(chosen) == 2 and chosen <= set(config.simulation.node_names or ())
    assert adversary_names(config.simulation, config.seed) == chosen
    others = {frozenset(adversary_names(config.simulation, seed)) for seed in range(20)}
    assert len(others) > 3  # another seed, other adversaries
    assert adversary_names(load_scenario().config.simulation, 42) == frozenset()


# -------------------------------------------------------- the mod, in process


def _scenario(adversaries: dict[str, Any]) -> ScenarioConfig:
    data = load_scenario(None, {"rounds": 3}).config.model_dump(mode="json")
    data["privacy"] = {"noise_multiplier": 1.0}  # no calibration: fast fresh nodes
    data["simulation"]["adversaries"] = adversaries
    return ScenarioConfig.model_validate(data)


def _train(app: Any, config: ScenarioConfig, partition_id: int) -> tuple[Message, Message]:
    source = source_of(config.simulation)
    model = build_model(config.model, source.feature_shape, source.num_classes, config.seed)
    task = p.TaskSpec(job=config.job(), simulation=config.simulation).encode()
    content = RecordDict(
        {
            p.ARRAYS_KEY: model_to_arrays(model),
            p.CONFIG_KEY: ConfigRecord({p.TASK_KEY: task, p.ROUND_KEY: 1}),
        }
    )
    request = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    return request, app(request, flower_context(partition_id=partition_id))


@needs_task
@pytest.mark.parametrize(
    "adversaries",
    [
        {"fraction": 0.2, "attack": "sign_flip"},
        {"fraction": 0.2, "attack": "scale", "factor": -3.0},
        {"fraction": 0.2, "attack": "noise", "std": 0.1},
    ],
)
def test_an_adversary_trains_honestly_then_poisons_its_update(adversaries: dict[str, Any]) -> None:
    config = _scenario(adversaries)
    assert config.simulation.adversaries is not None
    names = config.simulation.node_names or ()
    lab = lab_client_app(client_app, config.simulation)
    for partition_id, name in enumerate(names):
        request, attacked = _train(lab, config, partition_id)
        _, honest = _train(client_app, config, partition_id)  # the same seeds: the same update
        # The privacy accounting is the honest one, adversary or not.
        assert dict(attacked.content[p.METRICS_KEY]) == dict(honest.content[p.METRICS_KEY])
        sent = _values(attacked.content[p.ARRAYS_KEY])
        if name not in adversary_names(config.simulation, config.seed):
            assert _equal(sent, _values(honest.content[p.ARRAYS_KEY]))
            continue
        rng = node_rng(config.seed, name, 1, STREAM_ATTACK_NOISE)
        expected = poison_update(
            config.simulation.adversaries,
            request.content[p.ARRAYS_KEY],
            honest.content[p.ARRAYS_KEY],
            rng,
        )
        assert _equal(sent, _values(expected))
        assert not _equal(sent, _values(honest.content[p.ARRAYS_KEY]))


@needs_task
def test_a_label_flipper_trains_on_flipped_labels_only_while_it_trains() -> None:
    config = _scenario({"fraction": 0.2, "attack": "label_flip"})
    (adversary,) = adversary_names(config.simulation, config.seed)
    partition_id = list(config.simulation.node_names or ()).index(adversary)
    lab = lab_client_app(client_app, config.simulation)
    _, attacked = _train(lab, config, partition_id)
    _, honest = _train(client_app, config, partition_id)
    assert not _equal(
        _values(attacked.content[p.ARRAYS_KEY]), _values(honest.content[p.ARRAYS_KEY])
    )
    assert attacked.content[p.METRICS_KEY][p.EPSILON] == honest.content[p.METRICS_KEY][p.EPSILON]
    assert (
        attacked.content[p.NODE_KEY][p.NODE_FINGERPRINT]
        == (honest.content[p.NODE_KEY][p.NODE_FINGERPRINT])
    )


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ('fraction = 0.2\nattack = "scale"\n', "'scale' needs 'factor'"),
        ('fraction = 0.2\nattack = "scale"\nfactor = 1.0\n', "other than 1"),
        ('fraction = 0.2\nattack = "noise"\n', "'noise' needs 'std'"),
        ('fraction = 0.2\nattack = "noise"\nstd = 0\n', "std: Input should be greater than 0"),
        ('fraction = 0.2\nattack = "sign_flip"\nfactor = 2.0\n', "'sign_flip' takes no 'factor'"),
        ('fraction = 0.2\nattack = "label_flip"\nstd = 1.0\n', "'label_flip' takes no 'std'"),
        ('fraction = 1.0\nattack = "sign_flip"\n', "fraction: Input should be less than 1"),
        ('fraction = 0\nattack = "sign_flip"\n', "fraction: Input should be greater than 0"),
        ('attack = "sign_flip"\n', "simulation.adversaries.fraction: required key is missing"),
        ('fraction = 0.2\nattack = "gradient_ascent"\n', "Input should be 'sign_flip', 'scale'"),
    ],
)
def test_adversary_settings_are_validated(tmp_path: Path, block: str, message: str) -> None:
    path = tmp_path / "scenario.toml"
    path.write_text(f"[simulation.adversaries]\n{block}")
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert message in str(info.value)


def test_adversaries_config_round_trips() -> None:
    config = AdversariesConfig(fraction=0.2, attack="scale", factor=-4.0)
    assert AdversariesConfig.model_validate(config.model_dump()) == config


# ------------------------------------------------------ three lab runs on Ray

# MNIST, five IID nodes, logistic regression: each node holds ~9,600 training
# records, so honest DP updates agree closely and Krum can tell the flipped one
# apart. Sign flipping cancels an honest update: FedAvg's step shrinks to
# (1 − 2f) = 0.6 of the honest one while the adversary takes part, a slowdown
# rather than another optimum on IID data. The runs are therefore short (three
# rounds at a small learning rate), where the slowdown shows as accuracy.
LAB = """
name = "lab-sign-flip"
seed = 7
rounds = 3
evaluation = "centralized"
round_timeout_s = 600

[model]
name = "logreg"

[training]
batch_size = 512
learning_rate = 0.03

[privacy]
noise_multiplier = 0.7
delta = 1e-5

[simulation]
nodes = 5

[simulation.data]
source = "idx"
path = "{mnist}"

[simulation.data.normalize]  # MNIST's public constants, as the bundled MNIST scenarios
mean = 0.1307
std = 0.3081

[simulation.partition]
method = "iid"

[simulation.faults]
dropout = 0.2

[simulation.backend]
cpus_per_node = 2  # on a 2-core machine one Ray actor: one torch/Opacus import, not two at once
"""
ATTACK = '\n[simulation.adversaries]\nfraction = 0.2\nattack = "sign_flip"\n'
KRUM = '\n[strategy]\nname = "krum"\nnum_malicious_nodes = 1\n'


class _Quiet:
    def on_start(self, total_rounds: int, roster: object, skew: object) -> None: ...
    def on_round_started(self, server_round: int) -> None: ...
    def on_round(self, record: object) -> None: ...


@pytest.fixture(scope="module")
def lab_runs(
    tmp_path_factory: pytest.TempPathFactory, shared_ray: str
) -> dict[str, tuple[ScenarioConfig, Path]]:
    """clean (FedAvg), fedavg (attacked), krum (attacked): one simulation each, on the
    worker's shared Ray (tests/conftest.py)."""
    if not MNIST_DIR.is_dir():
        pytest.fail(f"the MNIST IDX files are expected in {MNIST_DIR} (shared/ beside the repo)")
    work = tmp_path_factory.mktemp("lab")
    base = LAB.format(mnist=MNIST_DIR)
    runs = {}
    for label, extra in {"clean": "", "fedavg": ATTACK, "krum": ATTACK + KRUM}.items():
        path = work / f"{label}.toml"
        path.write_text(base + extra)
        loaded = load_scenario(path)
        summary = simulate(loaded, work / label, _Quiet(), ray_address=shared_ray)
        runs[label] = (loaded.config, summary.out_dir)
    return runs


def _rounds(run: Path) -> list[RoundRecord]:
    metrics = json.loads((run / "metrics.json").read_text())
    return [RoundRecord.model_validate(record) for record in metrics["rounds"]]


@pytest.mark.slow
def test_krum_resists_sign_flipping_where_fedavg_does_not(
    lab_runs: dict[str, tuple[ScenarioConfig, Path]],
) -> None:
    accuracy = {label: _rounds(run)[-1].accuracy for label, (_, run) in lab_runs.items()}
    clean, fedavg, krum = (float(accuracy[k] or 0.0) for k in ("clean", "fedavg", "krum"))
    print(f"final accuracy: clean {clean:.4f}, FedAvg attacked {fedavg:.4f}, Krum {krum:.4f}")
    assert krum >= clean - 0.05
    assert fedavg <= clean - 0.10  # clearly worse
    config, run = lab_runs["fedavg"]
    (adversary,) = adversary_names(config.simulation, config.seed)
    rounds = _rounds(run)
    for record in rounds:  # FedAvg uses every update: the adversary took part when it answered
        assert record.adversaries == ([adversary] if adversary in record.participants else [])
    for record in _rounds(lab_runs["krum"][1]):
        assert adversary not in record.participants  # Krum never picked the flipped update
        if record.adversaries:
            assert adversary in record.rejected["krum"]


@functools.lru_cache
def _opacus_epsilon(release: Release, rounds: int, delta: float) -> float:
    """Opacus' own RDPAccountant over `rounds` equal releases (a tenth of a second a call)."""
    return opacus_epsilon([release] * rounds, delta, "rdp")


@pytest.mark.slow
def test_dropout_runs_account_exactly_the_rounds_each_node_trained(
    lab_runs: dict[str, tuple[ScenarioConfig, Path]],
) -> None:
    """ε per node and round = Opacus' RDP accountant over the rounds it did not drop out of."""
    clean = lab_runs["clean"][0]  # faults and adversaries do not change the split
    sizes = [len(simulated_node_data(clean.simulation, clean.seed, i).train) for i in range(5)]
    some_dropped = False
    for config, run in lab_runs.values():
        assert config.simulation.faults is not None
        rounds = _rounds(run)
        assert [r.round for r in rounds] == [1, 2, 3]
        for partition_id, name in enumerate(config.simulation.node_name(i) for i in range(5)):
            sigma = config.privacy.noise_multiplier or 0.0
            release = planned_release(config.job(), sizes[partition_id], sigma)
            trained = 0
            for record in rounds:
                faults, simulation = config.simulation.faults, config.simulation
                fate = fate_of(faults, simulation, config.seed, name, record.round, 600.0)
                assert (name in record.dropouts) == fate.dropout
                if fate.dropout:
                    some_dropped = True
                    assert name not in record.participants
                else:
                    trained += 1
                expected = _opacus_epsilon(release, trained, config.privacy.delta)
                assert record.epsilon[name] == pytest.approx(expected, rel=1e-9, abs=0.0)
    assert some_dropped
