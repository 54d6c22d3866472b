"""Which nodes may join: public keys only, registered with the SuperLink.

A node creates its key pair itself (`consortia node keys init`) and its
operator sends the public key; nobody else ever holds the private key. The
coordinator keeps the enrolled names and keys in `<state_dir>/nodes.json`
(its own record, with the key fingerprints operators compare over the
phone) and registers each key with Flower's SuperLink, whose SuperNode
authentication then admits only requests signed by an enrolled key. Removing
a node unregisters its key at once: its next request is refused with 401, no
restart needed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from pydantic import BaseModel, Field, JsonValue

from consortia.common.atomic import write_json_atomic
from consortia.common.audit import json_list
from consortia.common.errors import ConfigError, FederationError
from consortia.common.node_keys import load_node_public_key
from consortia.server.coordinator.config import CoordinatorConfig, audit_log
from consortia.server.coordinator.control import Control, CoordinatorTarget


class EnrolledNode(BaseModel):
    """One enrolled node: its name, its public key, and Flower's id for it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    public_key: str  # OpenSSH line, as the node operator sent it
    fingerprint: str
    node_id: int
    enrolled_utc: str

    def fleet_key(self) -> bytes:
        """The key as the SuperLink stores and compares it (PEM SubjectPublicKeyInfo)."""
        return fleet_key_bytes(self.public_key)


class EnrolledNodes(BaseModel):
    """nodes.json."""

    nodes: list[EnrolledNode] = Field(default_factory=list)

    def by_name(self, name: str) -> EnrolledNode | None:
        return next((n for n in self.nodes if n.name == name), None)


def fleet_key_bytes(public_key: str) -> bytes:
    """OpenSSH public key text -> the PEM bytes Flower's node authentication compares."""
    return load_node_public_key(public_key).pem


def read_enrolled(path: Path) -> EnrolledNodes:
    if not path.exists():
        return EnrolledNodes()
    try:
        return EnrolledNodes.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{path}: not a valid enrolled-nodes file ({exc})") from None


def admin_target(config: CoordinatorConfig) -> CoordinatorTarget:
    """How tools on the coordinator's own machine reach its Control API."""
    return CoordinatorTarget(
        address=config.local_address,
        root_certificates=None if config.tls is None else config.tls.ca_certfile,
        insecure=config.tls is None,
    )


class Enrollment:
    """Adds, removes and lists the enrolled nodes of one coordinator."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config

    def load(self) -> EnrolledNodes:
        return read_enrolled(self.config.nodes_file)

    def add(self, control: Control, name: str, public_key: str | Path) -> EnrolledNode:
        """Enroll `name` with `public_key` (the line or node.pub); the SuperLink admits it now."""
        parsed = load_node_public_key(public_key)
        key = parsed.pem
        enrolled = self.load()
        if enrolled.by_name(name) is not None:
            raise FederationError(
                f"a node named {name!r} is already enrolled; `consortia coordinator nodes remove "
                f"{name}` first to replace its key"
            )
        for node in enrolled.nodes:
            if node.fleet_key() == key:
                raise FederationError(f"this key is already enrolled as node {node.name!r}")
        node_id = _registered(control).get(key) or control.register_node(key, name)
        node = EnrolledNode(
            name=name,
            public_key=parsed.line,
            fingerprint=parsed.fingerprint,
            node_id=node_id,
            enrolled_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        self._write(EnrolledNodes(nodes=[*enrolled.nodes, node]))
        self._audit("node.enrolled", node=name, key_fingerprint=node.fingerprint, node_id=node_id)
        return node

    def remove(self, control: Control, name: str) -> EnrolledNode:
        """Unregister `name`'s key at the SuperLink (effective immediately) and forget it."""
        enrolled = self.load()
        node = enrolled.by_name(name)
        if node is None:
            known = ", ".join(n.name for n in enrolled.nodes) or "none"
            raise FederationError(f"no enrolled node named {name!r} (enrolled: {known})")
        registered_id = _registered(control).get(node.fleet_key())
        if registered_id is not None:
            control.unregister_node(registered_id)
        self._write(EnrolledNodes(nodes=[n for n in enrolled.nodes if n.name != name]))
        self._audit("node.removed", node=name, key_fingerprint=node.fingerprint)
        return node

    def reconcile(self, control: Control) -> list[str]:
        """Register enrolled keys the SuperLink lacks; return the names re-registered."""
        enrolled = self.load()
        registered = _registered(control)
        restored, nodes = [], []
        for node in enrolled.nodes:
            node_id = registered.get(node.fleet_key())
            if node_id is None:
                node_id = control.register_node(node.fleet_key(), node.name)
                restored.append(node.name)
            nodes.append(node.model_copy(update={"node_id": node_id}))
        if restored:
            self._write(EnrolledNodes(nodes=nodes))
            self._audit("node.reregistered", nodes=json_list(restored))
        return restored

    def _write(self, nodes: EnrolledNodes) -> None:
        write_json_atomic(self.config.nodes_file, nodes.model_dump(mode="json"))

    def _audit(self, event: str, **details: JsonValue) -> None:
        audit_log(self.config).append(event, **details)


def _registered(control: Control) -> dict[bytes, int]:
    """Flower's node id per key the SuperLink has registered (and not unregistered), one call."""
    return {
        view.public_key: view.node_id
        for view in control.list_nodes()
        if view.status != "unregistered"
    }
