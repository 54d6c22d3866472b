"""The simulation lab as a Flower app, for the stock tooling: `flwr run simulations/flower-app`.

The ServerApp is the deployed coordinator's (`consortia.server.app.serve`)
with the lab handed in; the ClientApp is the lab's virtual node. Unlike
`consortia simulate`, the scenario's faults and adversaries are not applied
(their mods need the scenario before Flower starts the nodes) and a run is
not resumable; progress goes to the log.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from consortia.server.app import serve
from consortia.simulations.lab import LAB
from consortia.simulations.virtual_node import virtual_node_app

__all__ = ["client_app", "server_app"]

server_app = ServerApp()
client_app = virtual_node_app


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the scenario the run config names over Flower's simulated SuperNodes."""
    serve(grid, context, lab=LAB)
