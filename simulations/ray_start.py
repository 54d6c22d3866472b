"""Ray for a simulation: its start arguments and a fast check of a cluster address.

Free of torch and Flower imports, so that the CLI checks `--ray-address`
in a blink, before it imports them.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from consortia.common.config import BackendConfig
from consortia.common.errors import ConfigError, FederationError


def cluster_address(ray_address: str | None, backend: BackendConfig) -> str | None:
    """The Ray cluster a simulation joins, or None to start a Ray of its own.

    `--ray-address` first, then the scenario's `[simulation.backend]
    ray_address`, then Ray's own `RAY_ADDRESS` environment variable (as the
    `ray` tools read it). Honouring the variable is not only a convenience:
    `ray.init` reads it by itself, and a start with `num_cpus` while it is set
    would be refused by Ray.
    """
    return ray_address or backend.ray_address or os.environ.get("RAY_ADDRESS") or None


def ray_init_args(backend: BackendConfig, ray_address: str | None = None) -> dict[str, Any]:
    """`ray.init` arguments: join the cluster at the address, or start one on this machine.

    The local GPU count is added by `backend_config` (this module does not import torch).
    """
    init_args: dict[str, Any] = {
        "logging_level": "ERROR",
        "log_to_driver": False,
        "include_dashboard": False,
    }
    address = cluster_address(ray_address, backend)
    if address:
        init_args["address"] = address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return init_args


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast where a Ray head's HOST:PORT does not answer.

    `ray.init` retries an unreachable address for minutes before it gives
    up; a typo in `--ray-address` should cost seconds. 'auto' (a cluster
    this machine belongs to) and Ray Client addresses (ray://) are left to
    Ray.
    """
    if address == "auto" or address.startswith("ray://"):
        return
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ConfigError(
            f"Ray address {address!r}: expected HOST:PORT of the cluster's head node "
            "(as `ray start --head` prints it, e.g. 10.0.0.5:6379), 'auto' or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise FederationError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check the "
            "address, or start the head with `ray start --head` and pass the address it prints"
        ) from None
