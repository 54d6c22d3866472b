"""The node's session with the coordinator, as the node last left it.

Flower's SuperLink counts a node as online until it misses its heartbeats
(`HEARTBEAT_PATIENCE` × the interval the node declared, after the last one:
60 s at Flower's default 30 s, node.toml `[superlink] heartbeat_interval_s`),
and until then refuses to activate the same key again (HTTP 412, "Failed to
activate SuperNode"). A SuperNode that ends by itself signs off first (it
deactivates the node); one that is killed (SIGKILL, the OOM killer, a power
cut) cannot. So `consortia node start` marks the session
open in `<state_dir>/session.json` when its SuperNode joins, and clears the
mark when the SuperNode ends in a way that signed off. A mark found when an
activation is refused says the last session ended without signing off: the
refusal is worth waiting out, not a key the coordinator does not know.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from flwr.common.constant import HEARTBEAT_PATIENCE
from pydantic import ValidationError

from consortia.common.atomic import write_bytes_atomic
from consortia.common.config import StrictModel
from consortia.common.flower_waits import DEFAULT_HEARTBEAT_INTERVAL_S

SESSION_FILENAME = "session.json"


class OpenSession(StrictModel):
    """The node's last session that has not been signed off."""

    coordinator: str
    node_id: str
    joined_utc: str
    # The interval that session declared (marks written before it existed: Flower's).
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S

    @property
    def window_s(self) -> float:
        """How long the SuperLink keeps this session online after its last heartbeat."""
        return float(HEARTBEAT_PATIENCE * self.heartbeat_interval_s)


class SessionMark:
    """`<state_dir>/session.json`: present while a session may still be open on the SuperLink."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / SESSION_FILENAME

    def opened(self, coordinator: str, node_id: str, heartbeat_interval_s: float) -> None:
        joined = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        session = OpenSession(
            coordinator=coordinator,
            node_id=node_id,
            joined_utc=joined,
            heartbeat_interval_s=heartbeat_interval_s,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path, session.model_dump_json().encode())

    def closed(self) -> None:
        self.path.unlink(missing_ok=True)

    def unfinished(self) -> OpenSession | None:
        """The session left open by the last SuperNode, if it did not sign off."""
        try:
            return OpenSession.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError):
            return None
