"""`coordinator.toml`: the coordinator service, as its operator configures it.

Everything the service keeps lives in `state_dir`: Flower's SuperLink
database, the enrolled nodes, the audit log, the logs and the runs. TLS is
not optional here: a coordinator without a `[tls]` block starts only when
`--insecure` is given on the command line (local development), never from a
file that could be copied to production by mistake.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from consortia.common.audit import AuditLog
from consortia.common.config import StrictModel
from consortia.common.config_io import read_toml, validate_model
from consortia.common.errors import ConfigError
from consortia.common.metrics_http import LOOPBACK_NETWORKS, MetricsConfig, check_networks


class TlsConfig(StrictModel):
    """The coordinator's certificate (`consortia provision coordinator`, or a site CA's)."""

    certfile: Path
    keyfile: Path
    ca_certfile: Path


class CoordinatorConfig(StrictModel):
    """The whole of coordinator.toml."""

    name: str = Field(default="coordinator", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    state_dir: Path
    host: str = Field(default="0.0.0.0", description="address the SuperLink listens on")
    port: int = Field(default=9093, ge=1, le=65535)
    admin_networks: tuple[str, ...] = Field(
        default=LOOPBACK_NETWORKS,
        description=(
            "networks allowed to use the Control and Runtime APIs (job submission, enrollment); "
            "nodes, from anywhere, reach only the Fleet API"
        ),
    )
    tls: TlsConfig | None = None
    metrics: MetricsConfig | None = Field(
        default=None,
        description="the Prometheus endpoint (rounds, replies, refusals, nodes, ε); off if unset",
    )

    @field_validator("admin_networks")
    @classmethod
    def _networks_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_networks(value)

    @model_validator(mode="after")
    def _metrics_port_of_its_own(self) -> CoordinatorConfig:
        if self.metrics is not None and self.metrics.port == self.port:
            raise ValueError(
                f"[metrics] port = {self.port} is the SuperLink's port; give the metrics "
                "endpoint a port of its own"
            )
        return self

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def nodes_file(self) -> Path:
        return self.state_dir / "nodes.json"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "coordinator.pid"

    @property
    def local_address(self) -> str:
        """host:port at which tools on this machine reach the SuperLink."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.port}"


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    """Read and validate coordinator.toml; relative paths are taken from its folder."""
    config = validate_model(CoordinatorConfig, read_toml(path), str(path))
    base = path.resolve().parent
    state_dir = (base / config.state_dir.expanduser()).resolve()
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"{path}: state_dir {state_dir} is a file; point it at a folder")
    updates: dict[str, object] = {"state_dir": state_dir}
    if config.tls is not None:
        updates["tls"] = TlsConfig(
            certfile=_existing(base, config.tls.certfile, path, "tls.certfile"),
            keyfile=_existing(base, config.tls.keyfile, path, "tls.keyfile"),
            ca_certfile=_existing(base, config.tls.ca_certfile, path, "tls.ca_certfile"),
        )
    return config.model_copy(update=updates)


def _existing(base: Path, value: Path, source: Path, key: str) -> Path:
    resolved = (base / value.expanduser()).resolve()
    if not resolved.is_file():
        raise ConfigError(
            f"{source}: {key} = {str(value)!r}: no such file ({resolved}); create the "
            "certificates with `consortia provision ca` and `consortia provision coordinator`"
        )
    return resolved


AUDIT_ACTOR = "coordinator"


def audit_log(config: CoordinatorConfig) -> AuditLog:
    """The coordinator's audit log (the service, enrollment and runs all append to it)."""
    return AuditLog(config.audit_log, AUDIT_ACTOR)
