"""Flower's Control API, as the coordinator's administration tools use it.

Enrollment, job submission and status all go through the SuperLink's Control
API (the same calls `flwr supernode register`, `flwr run`, `flwr ls` make),
over TLS, from an address the SuperLink's gatekeeper admits. This module
wraps Flower's `ControlHttpClient` so that an unreachable coordinator, a
certificate it does not trust or a refused call is one `FederationError`
that says what to do, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import httpx
from pydantic import BaseModel, ConfigDict, field_validator

from consortia.common.errors import FederationError

_BANNER = "Using SuperLink:"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CoordinatorTarget(BaseModel):
    """Where the coordinator's SuperLink is and how to trust it."""

    model_config = ConfigDict(frozen=True)

    address: str
    root_certificates: Path | None = None
    insecure: bool = False

    @field_validator("root_certificates")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Flower accepts only an absolute path (a relative one is a ValueError deep in its
        # client); `--root-certificates ca.crt` means the file in the working folder.
        return None if value is None else value.expanduser().resolve()

    def describe(self) -> str:
        scheme = "http" if self.insecure else "https"
        return f"{scheme}://{self.address}"


class NodeView(BaseModel):
    """A SuperNode as the SuperLink knows it."""

    node_id: int
    name: str
    status: str
    public_key: bytes


class RunView(BaseModel):
    """A Flower run as the SuperLink knows it."""

    run_id: int
    status: str
    sub_status: str
    details: str
    fab_id: str
    pending_at: str
    running_at: str
    finished_at: str
    override_config: dict[str, Any]


class Control:
    """One session with the Control API; use as a context manager."""

    def __init__(self, target: CoordinatorTarget) -> None:
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        self.target = target
        with self._translated(), _without_flower_banner():
            connection = SuperLinkConnection(
                name="consortia",
                address=target.address,
                root_certificates=(
                    None if target.root_certificates is None else str(target.root_certificates)
                ),
                insecure=target.insecure,
            )
            self._client = init_http_client_from_connection(connection)

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    # ------------------------------------------------------------------ nodes

    def register_node(self, public_key: bytes, name: str) -> int:
        from flwr.proto.control_pb2 import RegisterNodeRequest

        with self._translated():
            response = self._client.RegisterNode(
                RegisterNodeRequest(public_key=public_key, name=name)
            )
        if not response.node_id:
            raise FederationError(f"the coordinator did not register node {name!r}")
        return int(response.node_id)

    def unregister_node(self, node_id: int) -> None:
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        with self._translated():
            self._client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def list_nodes(self) -> list[NodeView]:
        from flwr.proto.control_pb2 import ListNodesRequest

        with self._translated():
            response = self._client.ListNodes(ListNodesRequest())
        return [
            NodeView(
                node_id=info.node_id,
                name=info.name,
                status=info.status,
                public_key=info.public_key,
            )
            for info in response.nodes_info
        ]

    # ------------------------------------------------------------------- runs

    def start_run(self, fab_bytes: bytes, fab_hash: str) -> int:
        from flwr.common.serde import fab_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        request = StartRunRequest(fab=fab_to_proto(Fab(fab_hash, fab_bytes, {})))
        with self._translated():
            response = self._client.StartRun(request)
        if not response.HasField("run_id"):
            raise FederationError("the coordinator did not start the run")
        return int(response.run_id)

    def list_runs(self, run_id: int | None = None) -> list[RunView]:
        from flwr.common.serde import user_config_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        request = ListRunsRequest() if run_id is None else ListRunsRequest(run_id=run_id)
        with self._translated():
            response = self._client.ListRuns(request)
        runs = [
            RunView(
                run_id=run.run_id,
                status=run.status.status,
                sub_status=run.status.sub_status,
                details=run.status.details,
                fab_id=run.fab_id,
                pending_at=run.pending_at,
                running_at=run.running_at,
                finished_at=run.finished_at,
                override_config=dict(user_config_from_proto(run.override_config)),
            )
            for run in response.run_dict.values()
        ]
        if run_id is not None and not runs:
            raise FederationError(f"the coordinator has no run {run_id}")
        return sorted(runs, key=lambda r: r.run_id)

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        with self._translated():
            self._client.StopRun(StopRunRequest(run_id=run_id))

    def logs(self, run_id: int, after: float = 0.0) -> tuple[str, float]:
        """The run's log output after `after` (a timestamp), and the newest timestamp."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        text, latest = [], after
        with self._translated():
            for response in self._client.StreamLogs(
                StreamLogsRequest(run_id=run_id, after_timestamp=after)
            ):
                text.append(response.log_output)
                latest = max(latest, response.latest_timestamp)
                break  # one batch: StreamLogs keeps the stream open while the run lives
        return "".join(text), latest

    # ----------------------------------------------------------------- errors

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn transport and API failures into one message naming the coordinator."""
        where = self.target.describe()
        try:
            yield
        except httpx.ConnectError as exc:
            if _is_certificate_failure(exc):
                raise FederationError(
                    f"{where}: the coordinator's certificate is not trusted ({_reason(exc)}); "
                    "pass the consortium CA certificate (ca.crt) the coordinator was "
                    "provisioned with"
                ) from None
            raise FederationError(
                f"{where}: cannot reach the coordinator ({_reason(exc)}); is "
                "`consortia coordinator start` running, and is this address admitted?"
            ) from None
        except httpx.HTTPStatusError as exc:
            raise FederationError(f"{where}: {_status_reason(exc)}") from None
        except httpx.HTTPError as exc:
            raise FederationError(f"{where}: {_reason(exc)}") from None
        except click.ClickException as exc:
            raise FederationError(f"{where}: {exc.format_message()}") from None
        except ValueError as exc:  # Flower's TLS settings checks
            raise FederationError(f"{where}: {exc}") from None


@contextlib.contextmanager
def _without_flower_banner() -> Iterator[None]:
    """Drop Flower's "Using SuperLink: …" banner: consortia prints its own messages.

    Flower 1.42's client factory prints it on stdout (`typer.secho`), where
    `consortia coordinator status` and `job submit` print their results; an
    older Flower logged it at INFO. Anything else printed meanwhile is kept.
    """
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        logger.setLevel(level)
        for line in printed.getvalue().splitlines(keepends=True):
            if not _ANSI.sub("", line).startswith(_BANNER):
                sys.stdout.write(line)


def _is_certificate_failure(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _status_reason(exc: httpx.HTTPStatusError) -> str:
    from flwr.supercore.error import FlowerError

    response = exc.response
    flower_error = FlowerError.from_json(response.text)
    if flower_error is not None:
        return f"refused: {flower_error}"
    if response.status_code == httpx.codes.FORBIDDEN:
        return (
            "refused (403): this address may not use the coordinator's Control API; add its "
            "network to admin_networks in coordinator.toml, or run the command on the coordinator"
        )
    return f"HTTP {response.status_code}: {response.text[:200]}"
