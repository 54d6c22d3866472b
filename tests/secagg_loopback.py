"""An in-process stand-in for Flower's Grid that runs SecAgg+ nodes synchronously.

The coordinator's `run_secure_round` and the node's stage functions
(`client/secure_aggregation.py`) are the real ones; only message transport
is replaced, so that tests can drop chosen nodes at chosen stages, record
everything the coordinator receives, and tamper with requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from consortia.client import secure_aggregation as secagg
from consortia.common import protocol as p
from consortia.common.config import SecureAggregationConfig
from consortia.common.secagg.fixed_point import EncodingRangeError
from consortia.common.secagg.wire import SECAGG_KEY, Setup, read_stage
from consortia.server.rounds.secure_aggregation import SecureRound, run_secure_round

BOUND = 1.0


@dataclass
class Node:
    """A node whose 'training' produced `update`; it goes silent from stage `drop_at` on."""

    node_id: int
    update: np.ndarray
    drop_at: str | None = None
    store: RecordDict = field(default_factory=RecordDict)
    silent: bool = False
    min_summands: int = 1

    def handle(self, message: Message) -> RecordDict | None:
        request = read_stage(message.content.config_records[SECAGG_KEY])
        if self.silent or request.stage == self.drop_at:
            self.silent = True
            return None
        try:
            if isinstance(request, Setup):
                keys = secagg.begin_round(request, self.store, self.min_summands)
                return RecordDict({SECAGG_KEY: keys, p.METRICS_KEY: MetricRecord({p.WEIGHT: 1.0})})
            return secagg.answer(request, self.store, lambda: self.update)
        except secagg.REFUSED as exc:  # exactly what the ClientApp turns into refusals
            return p.refusal_record(p.RefusalCode.SECAGG_REFUSED, str(exc))
        except EncodingRangeError as exc:
            return p.refusal_record(p.RefusalCode.UPDATE_OUT_OF_RANGE, str(exc))


class LoopbackGrid:
    """push: every node answers at once (or not); pull: hand out the replies."""

    def __init__(self, nodes: list[Node], tamper: Callable[[Message], Message] | None = None):
        self.nodes = {node.node_id: node for node in nodes}
        self.run = SimpleNamespace(run_id=1)
        self.tamper = tamper
        self.received: list[Message] = []  # everything the coordinator got, in order
        self._pending: dict[str, Message] = {}
        self._ids = itertools.count()

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            mid = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = mid
            if self.tamper is not None:
                message = self.tamper(message)
            content = self.nodes[message.metadata.dst_node_id].handle(message)
            if content is not None:
                self._pending[mid] = Message(content, reply_to=message)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = [self._pending.pop(mid) for mid in message_ids if mid in self._pending]
        self.received.extend(replies)
        return replies


def global_model(size: int) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(size, dtype=np.float32))})


def train_messages(node_ids: list[int], size: int) -> list[Message]:
    content = RecordDict({p.ARRAYS_KEY: global_model(size), p.CONFIG_KEY: ConfigRecord({})})
    return [Message(content, dst_node_id=node, message_type="train") for node in node_ids]


def run_round(
    nodes: list[Node],
    settings: SecureAggregationConfig,
    *,
    size: int,
    seed: int = 0,
    tamper: Callable[[Message], Message] | None = None,
) -> tuple[SecureRound, LoopbackGrid]:
    import random

    grid = LoopbackGrid(nodes, tamper)
    outcome = run_secure_round(
        grid,  # type: ignore[arg-type]
        train_messages([n.node_id for n in nodes], size),
        global_model(size),
        settings,
        context="run 1 round 1",
        timeout_s=0.05,  # replies are immediate; a silent node costs this per stage
        bound_of=lambda reply: BOUND,
        rng=random.Random(seed),
    )
    return outcome, grid


def updates(count: int, size: int, seed: int) -> list[np.ndarray]:
    """Random updates within the range: every entry, and so the L2 norm, at most BOUND."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-BOUND, BOUND, size) / np.sqrt(size) for _ in range(count)]
