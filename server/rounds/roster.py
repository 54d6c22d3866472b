"""Who is in the federation: node names and data fingerprints, by Flower node id.

Flower's node ids are random per run; the roster maps them to the names the
nodes give themselves, so that sampling, aggregation order and every report
are stated in stable names and the run is reproducible.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from pydantic import BaseModel, ConfigDict

from consortia.common import protocol as p
from consortia.common.errors import FederationError
from consortia.server.rounds.exchange import exchange

_POLL_S = 0.2


class NodeEntry(BaseModel):
    """One enrolled node as it described itself."""

    model_config = ConfigDict(frozen=True)

    node_id: int
    name: str
    data_fingerprint: str
    feature_shape: tuple[int, ...]
    num_classes: int
    label_histogram: tuple[float, ...] | None = None  # DP-noised counts, when asked and shared
    histogram_withheld: str | None = None


class Roster(BaseModel):
    """The nodes of a run, in name order."""

    model_config = ConfigDict(frozen=True)

    nodes: tuple[NodeEntry, ...]

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def data_shape(self) -> tuple[tuple[int, ...], int]:
        """(feature shape, class count) every node reported; they must all agree."""
        shapes = {(n.feature_shape, n.num_classes) for n in self.nodes}
        if len(shapes) != 1:
            detail = ", ".join(
                f"{n.name}: {list(n.feature_shape)}/{n.num_classes} classes" for n in self.nodes
            )
            raise FederationError(
                f"the nodes' datasets do not share one layout ({detail}); their dataset "
                "schemas must declare the same columns, categories and classes"
            )
        return shapes.pop()

    def name_of(self, node_id: int) -> str:
        for node in self.nodes:
            if node.node_id == node_id:
                return node.name
        raise FederationError(f"node id {node_id} is not in this run's roster")


def discover(grid: Grid, task: ConfigRecord, expected: int, timeout_s: float) -> Roster:
    """Wait for `expected` nodes, ask each who it is, and return the roster."""
    node_ids = _wait_for_nodes(grid, expected, timeout_s)
    messages = [
        Message(RecordDict({p.CONFIG_KEY: task}), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in node_ids
    ]
    replies = exchange(grid, messages, timeout_s)
    return _roster_from(replies, expected)


def _wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        node_ids = sorted(grid.get_node_ids())
        if len(node_ids) >= expected:
            return node_ids
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(node_ids)} of {expected} nodes connected within {timeout_s:.0f} s"
            )
        time.sleep(_POLL_S)


def _roster_from(replies: Iterable[Message], expected: int) -> Roster:
    entries, problems = [], []
    for reply in replies:
        source = reply.metadata.src_node_id
        if reply.has_error():
            problems.append(f"node {source}: {reply.error.reason}")
            continue
        refusal = p.read_refusal(reply.content)
        if refusal is not None:
            problems.append(f"node {source} refused [{refusal[0]}]: {refusal[1]}")
            continue
        record = reply.content.get(p.NODE_KEY)
        if not isinstance(record, ConfigRecord) or p.NODE_NAME not in record:
            problems.append(f"node {source}: reply does not identify the node")
            continue
        shape = record.get(p.NODE_FEATURE_SHAPE)
        classes = record.get(p.NODE_NUM_CLASSES)
        if not isinstance(shape, list) or not isinstance(classes, int):
            problems.append(f"node {source}: reply does not describe its data's layout")
            continue
        entries.append(
            NodeEntry(
                node_id=source,
                name=str(record[p.NODE_NAME]),
                data_fingerprint=str(record.get(p.NODE_FINGERPRINT, "")),
                feature_shape=tuple(int(d) for d in shape),
                num_classes=classes,
                label_histogram=_histogram(record.get(p.NODE_LABEL_HISTOGRAM), classes),
                histogram_withheld=_optional_str(record.get(p.NODE_HISTOGRAM_WITHHELD)),
            )
        )
    if len(entries) < expected:
        detail = "; ".join(problems) or "no reply before the timeout"
        raise FederationError(f"{len(entries)} of {expected} nodes identified themselves: {detail}")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise FederationError(f"two nodes share a name: {sorted(names)}")
    return Roster(nodes=tuple(sorted(entries, key=lambda e: e.name)))


def _histogram(value: object, num_classes: int) -> tuple[float, ...] | None:
    """The node's noisy class counts, if it sent a well-formed list of them."""
    if not isinstance(value, list) or len(value) != num_classes:
        return None
    return tuple(float(v) for v in value)


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)
