"""`consortia provision`: the coordinator's TLS material, made once per consortium.

consortia provision ca --out ca/ [--name NAME] [--days N] [--force]
consortia provision coordinator --ca ca/ --out tls/ --host fl.example.org [--ip 10.0.0.5]
consortia provision check --cert tls/server.crt --key tls/server.key --ca tls/ca.crt

The CA's folder (with `ca.key`) belongs offline or at least off the
coordinator; only `ca.crt` goes to the nodes, and `server.crt`,
`server.key` and `ca.crt` to the SuperLink.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from consortia.common.pki import CertificateInfo

provision_app = typer.Typer(
    help="Create and check the coordinator's TLS certificates.", no_args_is_help=True
)
# Fingerprints stay whole and literal: no wrapping, and no `:cd:`-style emoji codes.
console = Console(highlight=False, soft_wrap=True, emoji=False)

DaysOption = Annotated[int, typer.Option("--days", min=1, help="Validity in days.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace existing files.")]


@provision_app.command("ca")
def ca(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt and ca.key.")],
    name: Annotated[str, typer.Option("--name", help="The CA's common name.")] = "consortia CA",
    days: DaysOption = 3650,
    force: ForceOption = False,
) -> None:
    """Create the consortium's private CA (EC P-384): ca.crt for everyone, ca.key kept safe."""
    from consortia.common.pki import create_ca

    authority = create_ca(out, name, days, force=force)
    _wrote(authority.certificate, "CA certificate, 0644: give it to every node and flwr user")
    _wrote(authority.private_key, "CA private key, 0600: keep it offline, never share it")
    _describe(authority.info)


@provision_app.command("coordinator")
def coordinator(
    ca_dir: Annotated[Path, typer.Option("--ca", help="The CA's folder (ca.crt, ca.key).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the SuperLink's files.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A DNS name nodes use to reach the SuperLink (repeatable)."),
    ] = None,
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="An IP address nodes use to reach the SuperLink (repeatable)."),
    ] = None,
    days: DaysOption = 365,
    force: ForceOption = False,
) -> None:
    """Issue the SuperLink's TLS key and certificate, signed by the CA."""
    from consortia.common.pki import issue_server_certificate

    issued = issue_server_certificate(ca_dir, out, host or [], ip or [], days, force=force)
    _wrote(issued.certificate, "server certificate, 0644: --ssl-certfile")
    _wrote(issued.private_key, "server private key, 0600: --ssl-keyfile")
    _wrote(issued.ca_certificate, "CA certificate, 0644: --ssl-ca-certfile")
    _describe(issued.info)
    console.print(f"issued by {escape(issued.ca_info.subject)} ({issued.ca_info.fingerprint})")


@provision_app.command("check")
def check(
    cert: Annotated[Path, typer.Option("--cert", help="The server certificate (PEM).")],
    key: Annotated[Path, typer.Option("--key", help="Its private key (PEM).")],
    ca_file: Annotated[Path, typer.Option("--ca", help="The CA certificate nodes trust (PEM).")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A name or address nodes dial; must be covered (repeatable)."),
    ] = None,
) -> None:
    """Check a SuperLink certificate (ours or your organisation's) before serving it."""
    from consortia.common.pki import check_server_certificate

    checked = check_server_certificate(cert, key, ca_file, hosts=host or [])
    for warning in checked.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    _describe(checked.info)
    console.print(f"issued by {escape(checked.ca_info.subject)} ({checked.ca_info.fingerprint})")
    console.print(f"[green]{escape(str(cert))}: usable by the SuperLink[/]")


def _wrote(path: Path, what: str) -> None:
    console.print(f"wrote {escape(str(path))} ({what})")


def _describe(info: CertificateInfo) -> None:
    names = [*info.dns_names, *info.ip_addresses]
    console.print(f"subject:     {escape(info.subject)}")
    if names:
        console.print(f"names:       {escape(', '.join(names))}")
    console.print(
        f"valid:       {info.not_before:%Y-%m-%d %H:%M} to {info.not_after:%Y-%m-%d %H:%M} UTC"
    )
    console.print(f"fingerprint: {info.fingerprint}")
