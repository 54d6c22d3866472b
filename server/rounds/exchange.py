"""Sending messages to nodes and collecting their replies, with little idle time.

Flower's `Grid.send_and_receive` pulls at a fixed interval: 3 s on the
deployment engine's `HttpGrid`, 0.1 s on the simulation's `InMemoryGrid`.
A round waits for two exchanges (train, evaluate), so on a deployment the
fixed interval alone adds up to 6 s per round, whatever the nodes' speed.
`exchange` pushes once, then pulls with an adaptive interval: short right
after a push or a reply (replies of one round arrive close together), twice
as long after every empty pull up to a ceiling, so a slow round costs a pull
every `max_poll_s` and never a busy loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL_S = 0.02
MAX_POLL_S = 0.2


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
    simply absent from the result; the caller decides what that means.
    """
    outgoing = list(messages)
    if not outgoing:
        return []
    # HttpGrid answers None for a message it could not push (it logs why).
    pending = {mid for mid in grid.push_messages(outgoing) if mid}
    del outgoing
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    interval = first_poll_s
    while pending:
        arrived = list(grid.pull_messages(list(pending)))
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            break
        interval = first_poll_s if arrived else min(interval * 2, max_poll_s)
        time.sleep(min(interval, remaining))
    return replies
