"""consortia's round loop: Flower's strategy methods, driven from any round onwards.

Flower's `Strategy.start` always begins at round 1 and exchanges messages
through `grid.send_and_receive` (a fixed 3 s between pulls on a deployment).
This loop calls the same strategy methods in the same order —
configure_train, exchange, aggregate_train, configure_evaluate, exchange,
aggregate_evaluate, then the per-round hook (Flower's `evaluate_fn` slot) —
but for rounds `first_round..last_round`, so a resumed run continues at
round k+1, and through `exchange` (adaptive polling). Kept from
`Strategy.start`: an aggregate of None leaves the global model unchanged,
and the hook sees the model after the round's aggregation. Dropped: the
hook's call at round 0 (its result was discarded) and Flower's `Result`
(consortia's run log and metrics.json record the rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from consortia.server.rounds.exchange import exchange
from consortia.server.rounds.secure_aggregation import SecureRound
from consortia.server.rounds.strategies import ConsortiaStrategy

Purpose = Literal["train", "evaluate"]
# Runs a round's training under secure aggregation: (round, train messages, global model).
SecureTrainer = Callable[[int, list[Message], ArrayRecord], SecureRound]


class RoundObserver(Protocol):
    """What the loop reports; the federation records, checkpoints and notifies."""

    def before_round(self, server_round: int) -> None:
        """The round is about to be sent out."""

    def on_replies(
        self, server_round: int, purpose: Purpose, sent_to: list[int], replies: list[Message]
    ) -> None:
        """The replies of one exchange (before aggregation); `sent_to`: the node ids asked."""

    def after_round(self, server_round: int, arrays: ArrayRecord) -> None:
        """The round is over; `arrays` is the global model after it."""


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    timeout_s: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    observer: RoundObserver,
    secure: SecureTrainer | None = None,
) -> ArrayRecord:
    """Run rounds `first_round..last_round` from the global model `arrays`; return the last one.

    With `secure`, each round's training runs as a SecAgg+ round: the
    strategy then aggregates its replies (DP spend and loss, no update) with
    the unmasked mean it is handed (`ConsortiaStrategy.secure_round`).
    """
    for server_round in range(first_round, last_round + 1):
        observer.before_round(server_round)
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        sent_to = [m.metadata.dst_node_id for m in messages]
        if secure is None:
            replies = exchange(grid, messages, timeout_s)
        else:
            outcome = secure(server_round, messages, arrays)
            replies = outcome.replies
            # Nodes that left mid-protocol are failures with their stage (the strategy's);
            # survivors silent at unmasking have their stage-3 reply.
            sent_to = [node for node in sent_to if node not in outcome.dropped]
            _secure_strategy(strategy).secure_round = outcome
        del messages
        observer.on_replies(server_round, "train", sent_to, replies)
        try:
            aggregated, _ = strategy.aggregate_train(server_round, replies)
        finally:
            if secure is not None:
                _secure_strategy(strategy).secure_round = None
        if aggregated is not None:
            arrays = aggregated
        del replies

        messages = list(strategy.configure_evaluate(server_round, arrays, evaluate_config, grid))
        sent_to = [m.metadata.dst_node_id for m in messages]
        replies = exchange(grid, messages, timeout_s)
        del messages
        observer.on_replies(server_round, "evaluate", sent_to, replies)
        strategy.aggregate_evaluate(server_round, replies)
        del replies

        observer.after_round(server_round, arrays)
    return arrays


def _secure_strategy(strategy: Strategy) -> ConsortiaStrategy:
    if not isinstance(strategy, ConsortiaStrategy):
        raise TypeError("secure aggregation runs with consortia's strategies only")
    return strategy
