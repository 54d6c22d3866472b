"""Does the coordinator speak TLS where the node expects it, and plain HTTP where not?

Flower's SuperNode retries a failed connection forever, which is right for a
coordinator that is down or restarting and wrong for a node pointed at a TLS
coordinator with `insecure = true`: every attempt fails the same way, and
all it logs is "Connection attempt failed, retrying". `tls_mismatch` asks
the coordinator's port directly, with one TLS handshake that checks no
certificate (whether the certificate is *trusted* is Flower's check, made
with the node's CA): a completed handshake means TLS, a TLS protocol error
means plain HTTP. A port that does not answer says nothing, and the SuperNode
goes on retrying.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator

PROBE_TIMEOUT_S = 5.0


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of "host:port" or "[v6]:port"; None if it is not one."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def speaks_tls(address: str, timeout: float = PROBE_TIMEOUT_S) -> bool | None:
    """Whether the server at `address` completes a TLS handshake; None if it cannot be told."""
    parsed = split_address(address)
    if parsed is None:
        return None
    host, port = parsed
    try:
        with _connected(host, port, _unverified(), timeout):
            return True
    except ssl.SSLError:
        return False  # it answered, in something other than TLS
    except OSError:
        return None  # refused, unreachable, reset or silent: down, not mismatched


def tls_mismatch(address: str, insecure: bool, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the node and the coordinator at `address` cannot talk, if it is TLS; else None."""
    tls = speaks_tls(address, timeout)
    if insecure and tls is True:
        return (
            f"the coordinator at {address} speaks TLS, but node.toml's [superlink] sets "
            "insecure = true; remove it and set root_certificates to the consortium's ca.crt"
        )
    if not insecure and tls is False:
        return (
            f"the coordinator at {address} does not speak TLS (was it started with "
            "--insecure?); use its TLS address, or for local development set insecure = true "
            "in node.toml's [superlink]"
        )
    return None


def presented_certificate(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bytes:
    """The DER bytes of the certificate the server at host:port presents, trusted or not.

    For `consortia node doctor`, which says what is wrong with a certificate
    that fails the node's trust; raises `OSError` (`ssl.SSLError` included).
    """
    with _connected(host, port, _unverified(), timeout) as tls:
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    return der


def verified_handshake(
    host: str, port: int, context: ssl.SSLContext, timeout: float = PROBE_TIMEOUT_S
) -> None:
    """A TLS handshake as the node's SuperNode makes it with `context`; raises if it fails."""
    with _connected(host, port, context, timeout):
        return


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol (or the bytes) asked, not the trust
    return context


@contextlib.contextmanager
def _connected(
    host: str, port: int, context: ssl.SSLContext, timeout: float
) -> Iterator[ssl.SSLSocket]:
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        yield tls
