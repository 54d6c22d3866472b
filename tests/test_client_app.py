"""The node's ClientApp, called in-process with real Flower messages and Opacus."""

from __future__ import annotations

import pytest
from conftest import flower_context
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from consortia.client.app import app as deployed_app
from consortia.client.privacy_state import load_state
from consortia.common import protocol as p
from consortia.common.config import ScenarioConfig
from consortia.common.config_io import load_scenario
from consortia.common.errors import FederationError
from consortia.common.models import build_model
from consortia.common.privacy import opacus_epsilon
from consortia.common.weights import model_to_arrays
from consortia.simulations.node_data import source_of
from consortia.simulations.virtual_node import virtual_node_app as app

ROUNDS = 3


pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def scenario() -> ScenarioConfig:
    return load_scenario(None, {"rounds": ROUNDS}).config


def _message(scenario: ScenarioConfig, message_type: str, server_round: int = 1) -> Message:
    source = source_of(scenario.simulation)
    model = build_model(scenario.model, source.feature_shape, source.num_classes, scenario.seed)
    task = p.TaskSpec(job=scenario.job(), simulation=scenario.simulation).encode()
    config = ConfigRecord({p.TASK_KEY: task, p.ROUND_KEY: server_round})
    content = RecordDict({p.ARRAYS_KEY: model_to_arrays(model), p.CONFIG_KEY: config})
    return Message(content, dst_node_id=7, message_type=message_type)


def test_privacy_history_composes_across_rounds(scenario: ScenarioConfig) -> None:
    context = flower_context(partition_id=0)
    epsilons = []
    for server_round in range(1, ROUNDS + 1):
        reply = app(_message(scenario, MessageType.TRAIN, server_round), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        metrics = reply.content[p.METRICS_KEY]
        epsilons.append(float(metrics[p.EPSILON]))
        state = load_state(context)
        assert len(state.history) == server_round  # recorded before the reply left
        # The reported ε is Opacus' accountant over the node's whole history.
        assert epsilons[-1] == pytest.approx(
            opacus_epsilon(state.history, scenario.privacy.delta, "rdp"), rel=1e-12
        )
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]
    assert epsilons[-1] <= scenario.privacy.target_epsilon
    assert reply.content[p.NODE_KEY][p.NODE_NAME] == "st-mary"


def test_update_has_the_model_signature(scenario: ScenarioConfig) -> None:
    request = _message(scenario, MessageType.TRAIN)
    reply = app(request, flower_context(partition_id=1))
    sent, received = request.content[p.ARRAYS_KEY], reply.content[p.ARRAYS_KEY]
    assert list(received) == list(sent)
    assert all(received[k].shape == sent[k].shape for k in sent)
    assert any(received[k].data != sent[k].data for k in sent)  # it trained
    assert reply.content[p.METRICS_KEY][p.WEIGHT] == 1.0  # uniform: no record count leaves


def test_evaluate_and_query(scenario: ScenarioConfig) -> None:
    evaluation = app(_message(scenario, MessageType.EVALUATE), flower_context(partition_id=2))
    metrics = evaluation.content[p.METRICS_KEY]
    assert 0.0 <= metrics[p.EVAL_ACCURACY] <= 1.0 and metrics[p.EVAL_LOSS] > 0
    identity = app(_message(scenario, MessageType.QUERY), flower_context(partition_id=2))
    assert identity.content[p.NODE_KEY][p.NODE_NAME] == "northgate"
    assert len(str(identity.content[p.NODE_KEY][p.NODE_FINGERPRINT])) == 64


def test_node_without_registered_data_refuses(scenario: ScenarioConfig) -> None:
    # Flower's runtime turns the exception into an error reply the coordinator logs.
    with pytest.raises(FederationError, match="no dataset to train on"):
        deployed_app(_message(scenario, MessageType.TRAIN), flower_context())
