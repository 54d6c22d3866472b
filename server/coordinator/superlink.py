"""`python -m consortia.server.coordinator.superlink ARGS`: flower-superlink with the gatekeeper.

Runs Flower's own `flower-superlink` entry point (same arguments) after
adding consortia's `Gatekeeper` as the outermost middleware through Flower's
SuperLink extension hook, `flwr.superlink.extensions.get_middleware`, which
`flwr.superlink.main.create_app` consults when it builds the FastAPI app.
Started by `consortia coordinator start`, which passes the coordinator's
config path in the environment. `link_database.install` first lengthens the
SQLite lock wait and makes a locked database a retryable 503.
"""

from __future__ import annotations

import sys

from starlette.middleware import Middleware


def install_gatekeeper() -> None:
    """Make the SuperLink's app put the gatekeeper in front of every route."""
    from flwr.superlink import extensions

    from consortia.server.coordinator.config import audit_log
    from consortia.server.coordinator.gatekeeper import Gatekeeper, enrolled_names
    from consortia.server.coordinator.service import coordinator_from_environment

    config = coordinator_from_environment()
    if config is None:
        raise SystemExit("this module runs under `consortia coordinator start`")
    flower_middleware = extensions.get_middleware

    def get_middleware() -> tuple[Middleware, ...]:
        gatekeeper = Middleware(
            Gatekeeper,
            admin_networks=config.admin_networks,
            audit=audit_log(config),
            names=enrolled_names(config.nodes_file),
        )
        return (gatekeeper, *flower_middleware())

    extensions.get_middleware = get_middleware


def main() -> None:
    from flwr.superlink.cli.flower_superlink import flower_superlink

    from consortia.server.coordinator import link_database

    link_database.install()
    install_gatekeeper()
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
