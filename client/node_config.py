"""`node.toml`: one on-prem node, as its operator configures it.

The node's state folder holds its registered datasets and its privacy
ledger; its policy bounds every job. The coordinator can ask for anything:
the node serves only what is configured here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from consortia.client.policy import NodePolicy
from consortia.common.config import StrictModel
from consortia.common.config_io import read_toml, validate_model
from consortia.common.errors import ConfigError
from consortia.common.flower_waits import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    DEFAULT_POLL_INTERVAL_S,
    MAX_HEARTBEAT_INTERVAL_S,
    MIN_HEARTBEAT_INTERVAL_S,
)
from consortia.common.metrics_http import MetricsConfig

NODE_CONFIG_KEY = "consortia-node-config"  # Flower node_config key: path of node.toml
DEFAULT_AUTH_PRIVATE_KEY = Path("keys") / "node.key"  # under state_dir
WORKER_METRICS_FILE = "worker-metrics.json"  # under state_dir (client/worker_metrics.py)


class SuperLinkConfig(StrictModel):
    """How the node reaches the coordinator's SuperLink."""

    address: str = Field(default="127.0.0.1:9091", description="host:port of the SuperLink")
    insecure: bool = Field(default=False, description="plain HTTP: local development only")
    root_certificates: Path | None = None
    auth_private_key: Path | None = Field(
        default=None,
        description="the node's private key (OpenSSH format) that authenticates it to the "
        "SuperLink; default <state_dir>/keys/node.key",
    )
    heartbeat_interval_s: float = Field(
        default=DEFAULT_HEARTBEAT_INTERVAL_S,
        ge=MIN_HEARTBEAT_INTERVAL_S,
        le=MAX_HEARTBEAT_INTERVAL_S,
        description="how often the SuperNode tells the SuperLink it is alive; the SuperLink "
        "counts the node gone two intervals after its last heartbeat",
    )

    @model_validator(mode="after")
    def _plain_or_tls(self) -> SuperLinkConfig:
        # Flower's SuperNode takes --insecure over --root-certificates and opens a plaintext
        # channel: a node.toml naming a CA would believe it speaks TLS when it does not.
        if self.insecure and self.root_certificates is not None:
            raise ValueError(
                "insecure = true cannot be combined with root_certificates (an insecure link "
                "is plain HTTP and would ignore the CA): remove insecure for TLS, or "
                "root_certificates for a local plain-HTTP test"
            )
        return self


class NodeConfig(StrictModel):
    """The whole of node.toml."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    state_dir: Path
    serve: tuple[str, ...] = Field(
        default=(), description="registered datasets this node trains on when a job names them"
    )
    policy: NodePolicy = NodePolicy()
    superlink: SuperLinkConfig = SuperLinkConfig()
    runtime_port: int = Field(
        default=9094, ge=1, le=65535, description="local port of the SuperNode's runtime API"
    )
    poll_interval_s: float = Field(
        default=DEFAULT_POLL_INTERVAL_S,
        ge=0.01,
        le=3.0,
        description="while the node takes part in a job (a message in the last minute): the "
        "wait between its pulls from the SuperLink that bring nothing, and the longest the "
        "ClientApp worker takes to notice a message. Flower's own wait is 3 s (and stays so "
        "between jobs); each pull is one authenticated request to the coordinator",
    )
    metrics: MetricsConfig | None = Field(
        default=None,
        description="the node's Prometheus endpoint (messages, refusals, budget left, "
        "training time, device), 127.0.0.1 by default; off if unset",
    )

    @model_validator(mode="after")
    def _metrics_port_of_its_own(self) -> NodeConfig:
        if self.metrics is not None and self.metrics.port == self.runtime_port:
            raise ValueError(
                f"[metrics] port = {self.runtime_port} is the node's runtime_port; give the "
                "metrics endpoint a port of its own"
            )
        return self

    @property
    def worker_metrics_file(self) -> Path:
        """Where the ClientApp worker leaves its figures for the node's metrics endpoint."""
        return self.state_dir / WORKER_METRICS_FILE


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate node.toml; relative paths are taken from its folder."""
    config = validate_model(NodeConfig, read_toml(path), str(path))
    base = path.resolve().parent
    state_dir = (base / config.state_dir.expanduser()).resolve()
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(
            f"{path}: state_dir = {str(config.state_dir)!r} is a file ({state_dir}); "
            "point it at a folder (it is created if missing)"
        )
    link = config.superlink
    link_updates: dict[str, object] = {
        "auth_private_key": (base / link.auth_private_key.expanduser()).resolve()
        if link.auth_private_key is not None
        else state_dir / DEFAULT_AUTH_PRIVATE_KEY
    }
    if link.root_certificates is not None:
        link_updates["root_certificates"] = (base / link.root_certificates.expanduser()).resolve()
    return config.model_copy(
        update={"state_dir": state_dir, "superlink": link.model_copy(update=link_updates)}
    )
