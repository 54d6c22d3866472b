"""One log in every Flower process: Flower's records, printed once, in Flower's format.

Opacus calls `logging.basicConfig` when it is imported, which puts a handler
on the root logger. Flower's logger has a handler of its own and also
propagates to the root, so after consortia imported Opacus every Flower line
came out twice (once in Opacus' format), and consortia's own lines, sent to a
logger without a handler, came out only through Opacus' handler, as
`…:WARNING:consortia: round 8 accuracy=…`. consortia therefore logs through
Flower's logger (`flwr.common.logger.log`, at the level a line deserves) and
stops Flower's records at Flower's handler.

A `ConsortiaError` that ends the ServerApp is logged as its one message, not
as a traceback under Flower's "unhandled exception" (`user_errors_in_one_line`).
"""

from __future__ import annotations

import logging

from consortia.common.errors import ConsortiaError

_FLOWER = "flwr"  # the name of Flower's logger (flwr.common.logger.FLOWER_LOGGER)


def flower_handler_only() -> None:
    """Print Flower's records (and consortia's, logged through Flower) by Flower's handler only."""
    logging.getLogger(_FLOWER).propagate = False


class _OneLineErrors(logging.Filter):
    """A `ConsortiaError` that ends a Flower app, logged as its one message.

    Flower logs an app's exception with its traceback ("ServerApp raised an
    exception"), then its exit message ("Exit Code: 201 … An unhandled
    exception occurred in the ServerApp … For more information, visit …").
    A `ConsortiaError` (every node refused, a budget spent, a bad job) is no
    crash: its message already says what happened and what to do, so the
    first record becomes that one line (`error: …`) and the second, which
    would call it unhandled, is dropped. Flower still marks the run failed,
    with the message as its details. Any other exception keeps both.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ended_by_user_error = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ConsortiaError):
            record.msg, record.args = "error: %s", (error.message,)
            record.exc_info, record.exc_text = None, None
            self.ended_by_user_error = True
            return True
        if error is not None:
            self.ended_by_user_error = False  # a bug: its exit message stays
        if isinstance(record.msg, str) and record.msg.startswith(_EXIT_MESSAGE):
            drop, self.ended_by_user_error = self.ended_by_user_error, False
            return not drop
        return True


_EXIT_MESSAGE = "Exit Code: "  # how flwr.supercore.exit.flwr_exit starts an error's message


def user_errors_in_one_line() -> None:
    """Log a `ConsortiaError` that ends this Flower app as one line, without a traceback."""
    logger = logging.getLogger(_FLOWER)
    if not any(isinstance(f, _OneLineErrors) for f in logger.filters):
        logger.addFilter(_OneLineErrors())
