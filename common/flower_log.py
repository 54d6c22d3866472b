"""One log in every Flower process: Flower's records, printed once, in Flower's format.

Opacus calls `logging.basicConfig` when it is imported, which puts a handler
on the root logger. Flower's logger has a handler of its own and also
propagates to the root, so after consortia imported Opacus every Flower line
came out twice (once in Opacus' format), and consortia's own lines, sent to a
logger without a handler, came out only through Opacus' handler, as
`…:WARNING:consortia: round 8 accuracy=…`. consortia therefore logs through
Flower's logger (`flwr.common.logger.log`, at the level a line deserves) and
stops Flower's records at Flower's handler.
"""

from __future__ import annotations

import logging

_FLOWER = "flwr"  # the name of Flower's logger (flwr.common.logger.FLOWER_LOGGER)


def flower_handler_only() -> None:
    """Print Flower's records (and consortia's, logged through Flower) by Flower's handler only."""
    logging.getLogger(_FLOWER).propagate = False
