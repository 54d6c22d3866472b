"""What the coordinator's SuperLink lets through, and the audit trail of node connections.

Flower 1.41 serves its Fleet API (nodes), Control API (enrollment, job
submission) and Runtime API (the ServerApp) on one HTTPS port, and the open
source SuperLink authenticates only the Fleet API (SuperNode keys); anyone
who can reach the port could otherwise register a key or start a run. The
gatekeeper is an ASGI middleware installed through Flower's own SuperLink
extension hook (`flwr.superlink.extensions.get_middleware`): the Fleet API
and the health probe stay open to the internet (node authentication guards
the Fleet API), every other path is answered 403 unless the peer address is
in `admin_networks` (loopback by default, so administration happens on the
coordinator's machine or through an SSH tunnel).

It answers one request itself, open like the Fleet API: a node's signed
check (`consortia.common.node_check`, sent by `consortia node doctor`): is
the key enrolled, the coordinator's clock, and (enrolled keys only) its
software versions; recorded as `node.checked`.

It also watches the Fleet API's answers: a node that activates is recorded
as connected, a request the SuperLink refuses (401, or a refused activation:
an unenrolled or removed key) as a refused connection, both in the audit
log. An enrolled key whose activation is refused (412) is no refusal of the
key: Flower still counts the node's previous session as active, because the
node was killed without signing off and restarted within its heartbeat
window; that is recorded as a deferred connection, and the node retries.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from pydantic import JsonValue

from consortia.common.audit import AuditLog
from consortia.common.node_check import NODE_CHECK_PATH, NodeCheckAnswer, signing_key
from consortia.common.node_keys import pem_fingerprint
from consortia.common.versions import SoftwareVersions, installed_versions

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PREFIX = "/v1/fleet/"
OPEN_PATHS = ("/health",)
# Control API calls that change what the federation does, recorded with their outcome.
AUDITED_CONTROL_CALLS = {
    "/v1/control/start-run": "job.submitted",
    "/v1/control/stop-run": "job.stop_requested",
    "/v1/control/register-node": "control.register_node",
    "/v1/control/unregister-node": "control.unregister_node",
}
_PUBLIC_KEY_HEADER = b"flwr-public-key"
_REFUSAL_QUIET_S = 60.0  # one audit entry per refused key per minute: nodes retry
_PRECONDITION_FAILED = 412  # Flower's answer to an activation it refuses


class Gatekeeper:
    """ASGI middleware: admin paths only from admin networks; audit node connections."""

    def __init__(
        self,
        app: ASGIApp,
        admin_networks: tuple[str, ...],
        audit: AuditLog | None,
        names: Callable[[], dict[bytes, str]],
    ) -> None:
        self.app = app
        self.networks = [ipaddress.ip_network(n, strict=False) for n in admin_networks]
        self.audit = audit
        self.names = names
        self._last_refusal: dict[tuple[str, str], float] = {}
        self._versions: SoftwareVersions | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        peer = _peer(scope)
        if path.startswith(FLEET_PREFIX):
            await self.app(scope, receive, self._watching(scope, send, path, peer))
            return
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if path == NODE_CHECK_PATH:
            status, answer = self.node_check(_headers(scope), peer)
            await _respond(send, status, answer.model_dump_json().encode())
            return
        if self._is_admin(peer):
            event = AUDITED_CONTROL_CALLS.get(path)
            if event is not None:
                send = self._watching_admin(send, event, peer)
            await self.app(scope, receive, send)
            return
        self._record("admin.refused", path=path, peer=peer)
        await _forbidden(send)

    def node_check(self, headers: dict[str, str], peer: str) -> tuple[int, NodeCheckAnswer]:
        """The answer to a node's check: 200 enrolled, 403 not enrolled, 401 not signed."""
        now = dt.datetime.now(dt.UTC)
        key = signing_key(headers, now)
        if isinstance(key, str):
            return 401, NodeCheckAnswer(enrolled=False, time_utc=now, detail=key)
        node = self.names().get(key)
        fingerprint = pem_fingerprint(key)
        self._refusal(  # once a minute per key: a check is cheap to repeat
            "node.checked",
            fingerprint or peer,
            node=node,
            key_fingerprint=fingerprint,
            peer=peer,
            enrolled=node is not None,
        )
        if node is None:
            detail = "this key is not enrolled with the coordinator (or was removed)"
            return 403, NodeCheckAnswer(enrolled=False, time_utc=now, detail=detail)
        if self._versions is None:
            self._versions = installed_versions()
        return 200, NodeCheckAnswer(enrolled=True, time_utc=now, node=node, versions=self._versions)

    def _is_admin(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def _watching(self, scope: Scope, send: Send, path: str, peer: str) -> Send:
        """Wrap `send` to see the status of a Fleet API answer."""
        key = _header(scope, _PUBLIC_KEY_HEADER)

        async def watched(message: ASGIMessage) -> None:
            if message["type"] == "http.response.start":
                self._fleet_answer(path, int(message["status"]), key, peer)
            await send(message)

        return watched

    def _watching_admin(self, send: Send, event: str, peer: str) -> Send:
        """Wrap `send` to record a state-changing Control API call and its outcome."""

        async def watched(message: ASGIMessage) -> None:
            if message["type"] == "http.response.start":
                self._record(event, peer=peer, status=int(message["status"]))
            await send(message)

        return watched

    def _fleet_answer(self, path: str, status: int, key: bytes | None, peer: str) -> None:
        fingerprint = (pem_fingerprint(key) or "unreadable key") if key else None
        node = self.names().get(key, None) if key else None
        joining = path.endswith(("/activate-node", "/register-node"))
        if joining and status == _PRECONDITION_FAILED and node is not None:
            # Flower refuses to activate a key whose node is still online: one that was
            # killed without signing off and restarted before its heartbeats lapsed.
            self._refusal(
                "node.connection_deferred",
                fingerprint or peer,
                node=node,
                key_fingerprint=fingerprint,
                peer=peer,
                path=path,
                status=status,
                reason="its previous session still counts as active (it ended without "
                "signing off) until its heartbeats lapse, about a minute; the node retries",
            )
        elif status in (401, 403) or (joining and status >= 400):
            if node is None:
                reason = "key not enrolled (or removed)"
            elif status in (401, 403):
                reason = "authentication failed"
            else:
                reason = f"activation refused (HTTP {status})"
            self._refusal(
                "node.connection_refused",
                fingerprint or peer,
                node=node,
                key_fingerprint=fingerprint,
                peer=peer,
                path=path,
                status=status,
                reason=reason,
            )
        elif status < 300 and path.endswith("/activate-node"):
            self._record("node.connected", node=node, key_fingerprint=fingerprint, peer=peer)

    def _refusal(self, event: str, who: str, **details: JsonValue) -> None:
        """Record a refused request, once a minute per key and kind: nodes retry."""
        last = self._last_refusal.get((event, who), 0.0)
        if time.monotonic() - last < _REFUSAL_QUIET_S:
            return
        self._last_refusal[(event, who)] = time.monotonic()
        self._record(event, **details)

    def _record(self, event: str, **details: JsonValue) -> None:
        if self.audit is not None:
            self.audit.append(event, **details)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            try:
                return base64.b64decode(value, validate=True)
            except ValueError:
                return None
    return None


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers, names in lower case (the first of repeated ones)."""
    headers: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


async def _forbidden(send: Send) -> None:
    body = (
        b'{"detail":"this address may not use the coordinator\'s Control or Runtime API; '
        b'see admin_networks in coordinator.toml"}'
    )
    await _respond(send, 403, body)


async def _respond(send: Send, status: int, body: bytes) -> None:
    """A JSON answer of the gatekeeper's own."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def enrolled_names(nodes_file: Path) -> Callable[[], dict[bytes, str]]:
    """Map Fleet public-key bytes to enrolled node names, re-read when nodes.json changes."""
    from consortia.server.coordinator.enrollment import read_enrolled

    cache: dict[str, Any] = {"mtime": None, "names": {}}

    def names() -> dict[bytes, str]:
        try:
            mtime = nodes_file.stat().st_mtime_ns
        except OSError:
            return {}
        if mtime != cache["mtime"]:
            cache["names"] = {n.fleet_key(): n.name for n in read_enrolled(nodes_file).nodes}
            cache["mtime"] = mtime
        return dict(cache["names"])

    return names
