"""Sending messages to nodes and collecting their replies, with little idle time.

Flower's `Grid.send_and_receive` pulls at a fixed interval: 3 s on the
deployment engine's `HttpGrid`, 0.1 s on the simulation's `InMemoryGrid`.
A round waits for two exchanges (train, evaluate), so on a deployment the
fixed interval alone adds up to 6 s per round, whatever the nodes' speed.
`exchange` pushes once, then pulls with an adaptive interval: short right
after a push or a reply (replies of one round arrive close together), twice
as long after every empty pull up to a ceiling, so a slow round costs a pull
every `max_poll_s` and never a busy loop.

Not every reply comes from the node a message went to. When a node's reply
cannot come, Flower answers in its place: the SuperLink's "node unavailable"
(the node missed its heartbeats: it crashed, was killed, lost its network),
"message unavailable" (the message expired) or "reply unavailable" (the reply
expired), and the grid's own when a reply's objects cannot be pulled. Those
replies carry the SuperLink's node id (1), which is no node of the run's.
`exchange` hands each one on as the reply of the node its message went to, so
that a dead node is that node's failure in that round (`never_answered`
says which replies these are), never an unknown sender that ends the run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, Metadata
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

FIRST_POLL_S = 0.02
MAX_POLL_S = 0.2
# The error codes of the replies Flower makes when a node's own reply cannot come.
_UNAVAILABLE = frozenset(
    {
        ErrorCode.MESSAGE_UNAVAILABLE,
        ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
        ErrorCode.NODE_UNAVAILABLE,
    }
)


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout_s: float,
    *,
    first_poll_s: float = FIRST_POLL_S,
    max_poll_s: float = MAX_POLL_S,
) -> list[Message]:
    """Push `messages`, return the replies that arrive within `timeout_s`, in arrival order.

    Like Flower's `send_and_receive`, a node that does not answer in time is
    simply absent from the result; the caller decides what that means. A
    reply Flower made in a node's place comes back as that node's (see the
    module's docstring).
    """
    outgoing = list(messages)
    if not outgoing:
        return []
    # HttpGrid answers, in order, None for a message it could not push (it logs why),
    # and nothing at all when the whole push was too large.
    pushed = list(grid.push_messages(outgoing))
    sent = {
        mid: (message.metadata.dst_node_id, message.metadata.message_type)
        for mid, message in zip(pushed, outgoing, strict=False)
        if mid
    }
    pending = set(sent)
    del outgoing
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    interval = first_poll_s
    while pending:
        arrived = [_from_addressee(m, sent) for m in grid.pull_messages(list(pending))]
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        interval = first_poll_s if arrived else min(interval * 2, max_poll_s)
        time.sleep(min(interval, remaining))
    return replies


def never_answered(reply: Message) -> bool:
    """Whether `reply` is Flower's word that the node's own reply cannot come.

    The node missed its heartbeats, or the message or its reply expired, or
    the reply's objects could not be pulled: no reply, rather than a reply
    the node's app failed to make.
    """
    return reply.has_error() and reply.error.code in _UNAVAILABLE


def _from_addressee(reply: Message, sent: dict[str, tuple[int, str]]) -> Message:
    """`reply` as the reply of the node its message went to, if Flower made it in its place."""
    addressee = sent.get(reply.metadata.reply_to_message_id)
    if addressee is None or reply.metadata.src_node_id == addressee[0]:
        return reply
    node_id, message_type = addressee
    meta = reply.metadata
    metadata = Metadata(
        run_id=meta.run_id,
        message_id=meta.message_id,
        src_node_id=node_id,
        dst_node_id=meta.dst_node_id,
        reply_to_message_id=meta.reply_to_message_id,
        group_id=meta.group_id,
        created_at=meta.created_at,
        ttl=meta.ttl,
        message_type=message_type,
    )
    if reply.has_error():
        return make_message(metadata=metadata, error=reply.error)
    return make_message(metadata=metadata, content=reply.content)
