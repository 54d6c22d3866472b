"""`python -m consortia.client.supernode_launcher ARGS`: flower-supernode without its long naps.

Flower 1.41's SuperNode sleeps a fixed 3 s after every pull from the
SuperLink that brings no message, 0.5 s at a time while the ClientApp
works, and backs off 1 s when it pulls a message whose weights the
SuperLink is still receiving; Flower has no setting for any of them. This
launcher shortens the first to `--poll-interval-s` (node.toml
`poll_interval_s`) while the node takes part in a job (it handled a message
within the last minute; between jobs it stays Flower's 3 s), the second to
20 ms (it only looks at the SuperNode's own memory), and starts the third
at 50 ms, backing off to 1 s. Each patch and its structure check live in
`consortia.common.flower_waits`. It then runs Flower's own
`flower-supernode` entry point with the remaining arguments, as
`consortia.server.coordinator.superlink` does for the SuperLink.

`--heartbeat-interval-s` (node.toml `[superlink] heartbeat_interval_s`)
sets how often the SuperNode tells the SuperLink it is alive, and so how soon
the SuperLink counts a dead node gone (two intervals).

The cost of a short poll interval is one authenticated pull request from
the node to the SuperLink per interval during a job (5 a second at the
default 0.2 s). A Flower whose SuperNode no longer has the structure
patched here is refused with a message (exit code 2) rather than run with
Flower's 3 s back.
"""

from __future__ import annotations

import argparse
import sys

from consortia.common.errors import ConsortiaError
from consortia.common.flower_waits import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_POLL_INTERVAL_S,
    REMOTE_FIRST_RETRY_S,
    REMOTE_RETRY_CAP_S,
    SUPERNODE_LOOP_MODULE,
    install_heartbeat_interval,
    install_supernode_poll_interval,
    shorten_object_pull_backoff,
)


def install(poll_interval_s: float, heartbeat_interval_s: float) -> None:
    """Shorten the SuperNode's waits in this process (each patch checked first)."""
    install_supernode_poll_interval(poll_interval_s)
    install_heartbeat_interval(heartbeat_interval_s)
    shorten_object_pull_backoff(
        SUPERNODE_LOOP_MODULE,
        "pull_objects",
        "_pull_and_store_message",
        REMOTE_FIRST_RETRY_S,
        REMOTE_RETRY_CAP_S,
    )


def _parse(argv: list[str]) -> tuple[float, float, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m consortia.client.supernode_launcher",
        description="flower-supernode with its fixed waits shortened; other arguments go to it",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_INTERVAL_S)
    parser.add_argument("--heartbeat-interval-s", type=float, default=DEFAULT_HEARTBEAT_INTERVAL_S)
    known, rest = parser.parse_known_args(argv)
    return float(known.poll_interval_s), float(known.heartbeat_interval_s), rest


def main(argv: list[str] | None = None) -> None:
    poll_interval_s, heartbeat_s, flower_args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        install(poll_interval_s, heartbeat_s)
    except ConsortiaError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
