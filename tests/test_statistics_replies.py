"""How the coordinator reads the replies to a statistics query (server/statistics/job.py)."""

from __future__ import annotations

import pytest
from flwr.app import Error, Message, MessageType, RecordDict

from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.server.statistics.job import _read_replies


def _roster(*node_ids: int) -> Roster:
    return Roster(
        nodes=tuple(
            NodeEntry(
                node_id=node_id,
                name=f"node-{node_id}",
                data_fingerprint="0" * 64,
                feature_shape=(2,),
                num_classes=2,
            )
            for node_id in node_ids
        )
    )


def _error_reply(node_id: int, error: Error) -> Message:
    query = Message(RecordDict(), dst_node_id=node_id, message_type=MessageType.QUERY)
    return Message(error, reply_to=query)


@pytest.mark.usefixtures("task_identity")
def test_a_node_error_without_a_reason_is_a_refusal_naming_its_code() -> None:
    """Flower's `Error.reason` may be None; the refusal still says what happened."""
    replies = [_error_reply(7, Error(code=2)), _error_reply(8, Error(code=1, reason="boom"))]
    releases, refusals = _read_replies(replies, _roster(7, 8), 1.0, lambda release: None)
    assert releases == {}
    by_node = {refusal.node: refusal for refusal in refusals}
    assert by_node["node-7"].code == "node-error"
    assert by_node["node-7"].reason == "error code 2, no reason given"
    assert by_node["node-8"].reason == "boom"
