"""The indexed LinkState answers Flower's simulation engine exactly as Flower's own does.

Differential: the same pushes and polls against Flower's `InMemoryLinkState`
and consortia's `IndexedInMemoryLinkState` return the same messages, in the
same order, with the same delivery marks, including limits, other runs'
messages and expired messages.
"""

from __future__ import annotations

import random
import secrets
import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    SUPERLINK_NODE_ID,
)
from flwr.server.superlink.linkstate import InMemoryLinkState
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

from consortia.simulations import link_state as simulation_state
from consortia.simulations.link_state import IndexedInMemoryLinkState, indexed_link_state


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages take their run and source from the process' task identity, as in a ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_run_id", None)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)  # as run_simulation sets it


class _Federation:
    """A LinkState with `nodes` registered nodes and two runs, as the simulation engine sets up."""

    def __init__(self, state_class: type[InMemoryLinkState], nodes: int) -> None:
        self.state = state_class(NoOpFederationManager(), ObjectStoreFactory().store())
        self.nodes = []
        for _ in range(nodes):
            node_id = self.state.create_node(
                NOOP_FLWR_AID,
                NOOP_ACCOUNT_NAME,
                secrets.token_bytes(32),
                heartbeat_interval=HEARTBEAT_INTERVAL_INF,
            )
            self.state.acknowledge_node_heartbeat(node_id, HEARTBEAT_INTERVAL_INF)
            self.nodes.append(node_id)
        self.runs = [self._run() for _ in range(2)]

    def _run(self) -> int:
        return self.state.create_run(
            None, None, None, {}, NOOP_FEDERATION_ID, None, None, primary_task_type="serverapp"
        )

    def push(self, run: int, node: int, tag: str, ttl: float | None = None) -> str:
        TaskIdentity.run_id = run
        message = Message(RecordDict({"c": ConfigRecord({"tag": tag})}), node, "train", ttl=ttl)
        message.metadata.__dict__["_message_id"] = tag  # as InMemoryGrid assigns one
        stored = self.state.store_message_ins(message)
        assert stored == tag
        return tag


def _tags(messages: list[Message]) -> list[str]:
    return [str(m.content["c"]["tag"]) for m in messages]


def _script(seed: int) -> list[tuple[str, int, int, int | None, int | None]]:
    """A random sequence of pushes and polls: (op, node index, run index, limit, use run filter)."""
    rng = random.Random(seed)
    ops: list[tuple[str, int, int, int | None, int | None]] = []
    for _ in range(300):
        node, run = rng.randrange(6), rng.randrange(2)
        if rng.random() < 0.5:
            ops.append(("push", node, run, None, None))
        else:
            limit = rng.choice([None, 1, 2])
            ops.append(("poll", node, run, limit, rng.choice([None, 1])))
    return ops


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polls_return_what_flowers_state_returns(seed: int) -> None:
    flower, indexed = _Federation(InMemoryLinkState, 6), _Federation(IndexedInMemoryLinkState, 6)
    for step, (op, node, run, limit, by_run) in enumerate(_script(seed)):
        answers = []
        for federation in (flower, indexed):
            node_id, run_id = federation.nodes[node], federation.runs[run]
            if op == "push":
                federation.push(run_id, node_id, f"m{step}")
                continue
            got = federation.state.get_message_ins(
                node_id, limit, run_id=run_id if by_run else None
            )
            assert all(m.metadata.delivered_at for m in got)
            answers.append(_tags(got))
        if op == "poll":
            assert answers[0] == answers[1], f"step {step}"
    # Nothing is delivered twice, and what is still undelivered is the same.
    for federation in (flower, indexed):
        federation.rest = [
            _tags(federation.state.get_message_ins(node_id, None)) for node_id in federation.nodes
        ]
    assert flower.rest == indexed.rest


def test_an_expired_message_is_not_delivered_and_is_deleted() -> None:
    federation = _Federation(IndexedInMemoryLinkState, 2)
    node, run = federation.nodes[0], federation.runs[0]
    federation.push(run, node, "short", ttl=0.05)
    federation.push(run, node, "long")
    time.sleep(0.1)
    assert _tags(federation.state.get_message_ins(node, None)) == ["long"]
    assert "short" not in federation.state.message_ins_store


def test_the_engine_builds_the_indexed_state_only_inside_the_block() -> None:
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    module = simulation_state.importlib.import_module("flwr.simulation.run_simulation")
    with indexed_link_state():
        factory = module.LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        assert isinstance(factory.state(), IndexedInMemoryLinkState)
    assert module.LinkStateFactory is LinkStateFactory


def test_the_dispatcher_hands_out_every_message_once_and_stops_when_told() -> None:
    """consortia's dispatcher (Flower's loop, woken by arrivals): messages pushed
    before and while it runs, two to one node, all reach the queue exactly once."""
    import queue
    import threading

    federation = _Federation(IndexedInMemoryLinkState, nodes=3)
    run = federation.runs[0]
    out: queue.Queue[Message] = queue.Queue()
    stop = threading.Event()
    mapping = {node: i for i, node in enumerate(federation.nodes)}
    federation.push(run, federation.nodes[0], "early")
    worker = threading.Thread(
        target=simulation_state._dispatch_messages, args=(federation.state, out, mapping, stop)
    )
    worker.start()
    try:
        federation.push(run, federation.nodes[1], "b1")
        federation.push(run, federation.nodes[1], "b2")  # a second one for the same node
        federation.push(run, federation.nodes[2], "c")
        received = sorted(_tags([out.get(timeout=5) for _ in range(4)]))
    finally:
        stop.set()
        worker.join(timeout=5)
    assert received == ["b1", "b2", "c", "early"]
    assert out.empty() and not worker.is_alive()


def test_the_dispatcher_is_installed_only_inside_the_block() -> None:
    import importlib

    vce_api = importlib.import_module("flwr.server.superlink.fleet.vce.vce_api")
    flower = vce_api.add_messages_to_queue
    with indexed_link_state():
        assert vce_api.add_messages_to_queue is simulation_state._dispatch_messages
    assert vce_api.add_messages_to_queue is flower
