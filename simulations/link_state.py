"""Flower's in-memory LinkState with an index of undelivered messages per node.

Flower's simulation engine polls the LinkState once per virtual node every
0.1 s (`vce_api.add_messages_to_queue`), and `InMemoryLinkState.get_message_ins`
answers each poll by scanning *every* stored message, under the state's
lock. A round of N nodes therefore costs O(N²) message checks in the
engine's thread: at 1,000 nodes the poller alone kept one of two cores busy
and blocked the ServerApp and the reply injector on the lock
(docs/benchmarks.md, "1,000 virtual nodes").

`IndexedInMemoryLinkState` keeps, per destination node, the ids of its
messages not yet delivered, and answers a poll from that list: the same
checks (expiry, federation) on the same messages in the same order, for the
asking node's messages only. Everything else is Flower's class unchanged.

The engine's dispatcher also sleeps a fixed 0.1 s between polls, so every
exchange waits up to 0.1 s before a node even sees its message: a plain
round pays it twice (train, evaluate), a secure-aggregation round five
times. `_dispatch_messages` is Flower's loop with the sleep replaced by a
wait on the state's arrival event (set by `store_message_ins`), in slices
of 20 ms so that a stop request is seen within 20 ms (Flower's own wait
ends at once on stop, ours can't wait on both events).

`indexed_link_state()` installs both for the simulation engine's run only.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from queue import Queue

from flwr.app import Message
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState, LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.date import now
from flwr.supercore.object_store.object_store import ObjectStore
from flwr.superlink.federation import FederationManager


class IndexedInMemoryLinkState(InMemoryLinkState):
    """`InMemoryLinkState` whose `get_message_ins` looks only at the asking node's messages."""

    def __init__(self, federation_manager: FederationManager, object_store: ObjectStore) -> None:
        super().__init__(federation_manager, object_store)
        # node id -> ids of its undelivered messages, in arrival order (a dict as ordered set).
        self._undelivered: dict[int, dict[str, None]] = {}
        self.arrived = threading.Event()  # set whenever a message for a node is stored

    def store_message_ins(self, message: Message) -> str | None:
        with self.lock:
            message_id = super().store_message_ins(message)
            if message_id is not None and message_id in self.message_ins_store:
                node = message.metadata.dst_node_id
                self._undelivered.setdefault(node, {})[message_id] = None
                self.arrived.set()
            return message_id

    def get_message_ins(
        self, node_id: int, limit: int | None, *, run_id: int | None = None
    ) -> list[Message]:
        """Flower's `get_message_ins`, over the node's own undelivered messages."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Message] = []
        with self.lock:
            pending = self._undelivered.get(node_id)
            if not pending:
                return found
            for message_id in list(pending):
                self._check_stored_messages({message_id})  # expired: deleted here, as Flower does
                message = self.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    del pending[message_id]  # deleted or delivered: never pending again
                    continue
                if run_id is not None and message.metadata.run_id != run_id:
                    continue
                found.append(message)
                del pending[message_id]
                if limit and len(found) == limit:
                    break
            delivered_at = now().isoformat()
            for message in found:
                message.metadata.delivered_at = delivered_at
        return found


DISPATCH_WAIT_S = 0.1  # Flower's fixed poll interval, now the longest wait
_STOP_CHECK_S = 0.02


def _dispatch_messages(
    state: LinkState,
    queue: Queue[Message],
    nodes_mapping: Mapping[int, int],
    f_stop: threading.Event,
) -> None:
    """Flower's `vce_api.add_messages_to_queue`, woken by new messages instead of a timer.

    Same polls (one message per node per pass, as Flower takes them); the
    arrival event is cleared *before* a pass, so a message stored during the
    pass wakes the next one. A pass that dispatched something is followed
    at once by another (a node may hold a second message).
    """
    if not isinstance(state, IndexedInMemoryLinkState):
        _FLOWER_DISPATCH(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        state.arrived.clear()
        dispatched = False
        for node_id in nodes_mapping:
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
                dispatched = True
        waited = 0.0
        while not dispatched and waited < DISPATCH_WAIT_S and not f_stop.is_set():
            if state.arrived.wait(_STOP_CHECK_S):
                break
            waited += _STOP_CHECK_S


_VCE_API = importlib.import_module("flwr.server.superlink.fleet.vce.vce_api")
_FLOWER_DISPATCH = _VCE_API.add_messages_to_queue


class _IndexedLinkStateFactory(LinkStateFactory):
    """Flower's factory, building the indexed state for the in-memory database."""

    def state(self) -> LinkState:
        if self.database != FLWR_IN_MEMORY_DB_NAME:
            return super().state()
        with self._state_lock:
            if self.state_instance is None:
                self.state_instance = IndexedInMemoryLinkState(
                    self.federation_manager, self.objectstore_factory.store()
                )
            return self.state_instance


@contextmanager
def indexed_link_state() -> Iterator[None]:
    """Within the block, Flower's `run_simulation` builds `IndexedInMemoryLinkState`
    and its engine dispatches messages as they arrive (`_dispatch_messages`).

    `run_simulation` names `LinkStateFactory` in its own module, and the
    engine's `run_api` names `add_messages_to_queue` in `vce_api`; each name
    is swapped there (nowhere else) and restored on exit.
    """
    # `flwr.simulation.run_simulation` is also the name of the function the
    # package exports, so the module is taken from the import system.
    flower_simulation = importlib.import_module("flwr.simulation.run_simulation")
    # Module globals, set through the modules' namespaces (ModuleType declares none).
    simulation_globals, vce_globals = vars(flower_simulation), vars(_VCE_API)
    original = simulation_globals["LinkStateFactory"]
    simulation_globals["LinkStateFactory"] = _IndexedLinkStateFactory
    vce_globals["add_messages_to_queue"] = _dispatch_messages
    try:
        yield
    finally:
        simulation_globals["LinkStateFactory"] = original
        vce_globals["add_messages_to_queue"] = _FLOWER_DISPATCH
