"""`consortia coordinator`: what the consortium's coordinator operator runs.

consortia coordinator start --config coordinator.toml [--insecure]
consortia coordinator status --config coordinator.toml
consortia coordinator nodes add NAME PUBLIC_KEY --config coordinator.toml
consortia coordinator nodes remove NAME --config coordinator.toml
consortia coordinator nodes list --config coordinator.toml
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

coordinator_app = typer.Typer(
    help="Run and administer the coordinator service.", no_args_is_help=True
)
nodes_app = typer.Typer(help="The nodes enrolled with this coordinator.", no_args_is_help=True)
coordinator_app.add_typer(nodes_app, name="nodes")
console = Console(highlight=False)

if TYPE_CHECKING:  # imported where used: `consortia --help` must not load them
    from consortia.server.coordinator.config import CoordinatorConfig

ConfigOption = Annotated[Path, typer.Option("--config", help="The coordinator's coordinator.toml.")]


@coordinator_app.command("start")
def start(
    config: ConfigOption,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="No TLS and no node authentication: local development only.",
        ),
    ] = False,
) -> None:
    """Start the coordinator (flower-superlink with TLS and node authentication) and serve."""
    from consortia.server.coordinator.service import serve

    def announce(line: str) -> None:
        console.print(escape(line))
        sys.stdout.flush()

    raise typer.Exit(serve(config, insecure, announce))


@coordinator_app.command("status")
def status(config: ConfigOption) -> None:
    """Health, enrolled and connected nodes, and runs; exit 1 if the coordinator is down."""
    from consortia.common.ports import port_taken_by
    from consortia.server.coordinator.config import load_coordinator_config
    from consortia.server.coordinator.control import Control
    from consortia.server.coordinator.enrollment import Enrollment, admin_target
    from consortia.server.coordinator.service import running_pid

    settings = load_coordinator_config(config)
    pid = running_pid(settings)
    enrolled = Enrollment(settings).load()
    for warning in _certificate_warnings(settings):
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if pid is None:
        console.print(f"coordinator {settings.name}: [red]not running[/]")
        # Its port may still be served: by leftovers of a killed coordinator, or another program.
        holder = port_taken_by(settings.host, settings.port, f"coordinator {settings.name}")
        if holder is not None:
            console.print(
                escape(
                    f"but port {settings.port} is held by {holder}: stop it before "
                    "`consortia coordinator start`"
                ),
                soft_wrap=True,
            )
        _print_enrolled({n.name: (n.fingerprint, "—") for n in enrolled.nodes})
        raise typer.Exit(1)
    with Control(admin_target(settings)) as control:
        live = {view.node_id: view.status for view in control.list_nodes()}
        runs = control.list_runs()
    console.print(
        f"coordinator {settings.name}: [green]running[/] (pid {pid}) on "
        f"{settings.host}:{settings.port}, {'TLS' if settings.tls else 'INSECURE'}"
    )
    _print_enrolled(
        {n.name: (n.fingerprint, live.get(n.node_id, "not registered")) for n in enrolled.nodes}
    )
    table = Table("run", "status", "detail", "started", "finished", title="Runs", show_edge=False)
    for run in runs:
        table.add_row(
            str(run.run_id),
            run.status,
            run.sub_status or run.details,
            run.running_at,
            run.finished_at,
        )
    console.print(table)


def _certificate_warnings(settings: CoordinatorConfig) -> list[str]:
    """The coordinator's certificate and its CA, if either expires within 30 days (or did).

    Nodes authenticate with keys, which do not expire: a node is shut out by
    `nodes remove`, not by a date.
    """
    from consortia.common.pki import CertificateError, expiry_notice, load_certificates

    if settings.tls is None:
        return []
    warnings = []
    for path, what, fix in (
        (settings.tls.certfile, "the coordinator's certificate", _RENEW_CERTIFICATE),
        (settings.tls.ca_certfile, "the consortium CA certificate", _RENEW_CA),
    ):
        try:
            certificates = load_certificates(path, what)
        except CertificateError as exc:
            warnings.append(exc.message)
            continue
        # The first: the server's own (before any intermediates), or the CA.
        notice = expiry_notice(certificates[0], f"{what} ({path})")
        if notice is not None:
            warnings.append(f"{notice}; {fix}")
    return warnings


_RENEW_CERTIFICATE = (
    "issue a new one (`consortia provision coordinator`) and restart the coordinator; nodes "
    "keep trusting it as long as the CA is the same"
)
_RENEW_CA = (
    "create a new CA (`consortia provision ca`), issue the coordinator's certificate with it "
    "and give every node the new ca.crt before the old one expires"
)


def _print_enrolled(nodes: dict[str, tuple[str, str]]) -> None:
    table = Table("node", "key fingerprint", "connection", title="Enrolled nodes", show_edge=False)
    for name, (fingerprint, state) in sorted(nodes.items()):
        table.add_row(name, fingerprint, state)
    console.print(table)


@nodes_app.command("add")
def nodes_add(
    name: Annotated[str, typer.Argument(help="The node's name (as in its node.toml).")],
    public_key: Annotated[
        str, typer.Argument(help="The node's public key line, or a file holding it (node.pub).")
    ],
    config: ConfigOption,
) -> None:
    """Enroll a node by its public key; it can connect from now on."""
    from consortia.server.coordinator.config import load_coordinator_config
    from consortia.server.coordinator.control import Control
    from consortia.server.coordinator.enrollment import Enrollment, admin_target

    settings = load_coordinator_config(config)
    with Control(admin_target(settings)) as control:
        node = Enrollment(settings).add(control, name, public_key)
    console.print(f"enrolled {node.name}: key {node.fingerprint} (Flower node id {node.node_id})")
    console.print("compare this fingerprint with the one the node's operator reads out")


@nodes_app.command("remove")
def nodes_remove(
    name: Annotated[str, typer.Argument(help="The enrolled node's name.")],
    config: ConfigOption,
) -> None:
    """Remove a node: its key is refused from its next request on (no restart)."""
    from consortia.server.coordinator.config import load_coordinator_config
    from consortia.server.coordinator.control import Control
    from consortia.server.coordinator.enrollment import Enrollment, admin_target

    settings = load_coordinator_config(config)
    with Control(admin_target(settings)) as control:
        node = Enrollment(settings).remove(control, name)
    console.print(f"removed {node.name} (key {node.fingerprint}); it can no longer connect")


@nodes_app.command("list")
def nodes_list(config: ConfigOption) -> None:
    """The enrolled nodes and their key fingerprints."""
    from consortia.server.coordinator.config import load_coordinator_config
    from consortia.server.coordinator.enrollment import Enrollment

    settings = load_coordinator_config(config)
    nodes = Enrollment(settings).load().nodes
    table = Table("node", "key fingerprint", "Flower node id", "enrolled", show_edge=False)
    for node in sorted(nodes, key=lambda n: n.name):
        table.add_row(node.name, node.fingerprint, str(node.node_id), node.enrolled_utc)
    console.print(table)
