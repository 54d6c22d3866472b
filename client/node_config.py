"""`node.toml`: one on-prem node, as its operator configures it.

The node's state folder holds its registered datasets and its privacy
ledger; its policy bounds every job. The coordinator can ask for anything:
the node serves only what is configured here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from consortia.client.policy import NodePolicy
from consortia.common.config import StrictModel
from consortia.common.config_io import read_toml, validate_model
from consortia.common.errors import ConfigError

NODE_CONFIG_KEY = "consortia-node-config"  # Flower node_config key: path of node.toml


class SuperLinkConfig(StrictModel):
    """How the node reaches the coordinator's SuperLink."""

    address: str = Field(default="127.0.0.1:9091", description="host:port of the SuperLink")
    insecure: bool = Field(default=False, description="plain HTTP: local development only")
    root_certificates: Path | None = None


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
    updates: dict[str, object] = {"state_dir": state_dir}
    certificates = config.superlink.root_certificates
    if certificates is not None:
        updates["superlink"] = config.superlink.model_copy(
            update={"root_certificates": (base / certificates.expanduser()).resolve()}
        )
    return config.model_copy(update=updates)
