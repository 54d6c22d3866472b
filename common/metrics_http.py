"""A Prometheus endpoint: `GET /metrics` on a port of its own, for allowed networks only.

The coordinator service (`[metrics]` in coordinator.toml) and a node's
supervisor (`[metrics]` in node.toml) each serve their figures through one
of these, never on the SuperLink's port nor on a node's runtime API port.
What they serve is a `prometheus_client` collector that reads the service's
own files at scrape time (see `consortia.server.coordinator.metrics` and
`consortia.client.node_metrics`); this module only serves it.

Two locks on who may read: the endpoint binds 127.0.0.1 unless told
otherwise (other machines cannot even connect), and a request whose peer
address is outside `allow` (loopback by default) is answered 403 whatever
the address it reached. An endpoint bound to a wider address for a remote
Prometheus therefore needs that Prometheus' network in `allow` too: the
figures name nodes, datasets and privacy spend, which are not for anyone
who can reach the port. Plain HTTP: keep it on localhost or a monitoring
network (or behind a TLS proxy).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from collections.abc import Iterable, Sequence
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import Field, field_validator

from consortia.common.config import StrictModel
from consortia.common.errors import FederationError
from consortia.common.ports import check_port_free

LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
METRICS_PATH = "/metrics"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_networks(values: tuple[str, ...]) -> tuple[str, ...]:
    """Each value must be a network ('10.0.0.0/8', '127.0.0.1/32'); a config validator."""
    for network in values:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(
                f"{network!r} is not a network (write e.g. '10.0.0.0/8' or '127.0.0.1/32')"
            ) from None
    return values


def peer_allowed(peer: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether the address `peer` is in one of `networks` (an IPv4-mapped IPv6 one as IPv4)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class MetricsConfig(StrictModel):
    """`[metrics]`: where the Prometheus endpoint listens, and who may read it."""

    host: str = Field(
        default="127.0.0.1",
        description="address the endpoint binds; 127.0.0.1 keeps other machines out",
    )
    port: int = Field(ge=1, le=65535, description="its own port (not the SuperLink's)")
    allow: tuple[str, ...] = Field(
        default=LOOPBACK_NETWORKS,
        description="networks whose requests are answered; others get 403",
    )

    @field_validator("allow")
    @classmethod
    def _networks_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_networks(value)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
        return f"http://{host}:{self.port}{METRICS_PATH}"


def metrics_app(registry: CollectorRegistry, allow: Sequence[str]) -> WSGIApplication:
    """The WSGI app: 403 outside `allow`, 404 off `/metrics`, else the registry's exposition."""
    networks = [ipaddress.ip_network(network, strict=False) for network in allow]

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if not peer_allowed(str(environ.get("REMOTE_ADDR", "")), networks):
            return _answer(start_response, "403 Forbidden", b"this address may not read metrics\n")
        if environ.get("PATH_INFO") != METRICS_PATH:
            return _answer(start_response, "404 Not Found", f"see {METRICS_PATH}\n".encode())
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", b"GET only\n")
        body = generate_latest(registry)
        return _answer(start_response, "200 OK", body, CONTENT_TYPE_LATEST)

    return app


def _answer(
    start_response: StartResponse, status: str, body: bytes, content_type: str = "text/plain"
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request (a slow scrape does not hold the next one); threads are daemons."""

    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log on the service's output: Prometheus scrapes every few seconds."""

    def log_message(self, format: str, *args: object) -> None:
        return


class MetricsServer:
    """Serves `collector` at `config`'s address in a background thread until `stop`."""

    def __init__(self, config: MetricsConfig, collector: Collector, what: str) -> None:
        self.config = config
        self.what = what
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; `FederationError` naming the holder if the port is taken."""
        config = self.config
        check_port_free(config.host, config.port, f"{self.what} metrics")
        server_class = _Server6 if ":" in config.host else _Server
        try:
            self._server = make_server(
                config.host,
                config.port,
                metrics_app(self.registry, config.allow),
                server_class,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            held = " (already in use)" if exc.errno == errno.EADDRINUSE else ""
            raise FederationError(
                f"{self.what} metrics: cannot listen on {config.host}:{config.port}{held}: "
                f"{exc.strerror}; choose another [metrics] port"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
