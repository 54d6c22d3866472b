"""`python -m consortia.client.clientapp_worker`: one long-lived process runs the node's ClientApp.

Flower 1.41's SuperNode, in its default `subprocess` isolation, starts a
SuperExec that launches a fresh `flwr-clientapp` process for every message;
each re-imports torch, Flower and consortia (about 3 s) and installs the
run's app bundle (FAB) before it handles a message that trains for a
second. `consortia node start` instead runs flower-supernode with
`--isolation process` (it then launches nothing) and this worker beside it,
under the same guarded environment. The worker imports everything once,
then, per task:

1. asks the SuperNode's runtime API for a ClientApp task, as Flower's
   SuperExec does (`AcquireTask`, which answers with the task and a token);
2. does in-process what `flwr-clientapp` does with that token, through
   Flower's own functions: a `RuntimeHttpClient` with the token
   interceptor, `pull_task_input`, a `HeartbeatSender`, the ClientApp call,
   `push_message` for the reply and `push_task_output` for the context and
   sub-status. An exception in the ClientApp becomes an error reply exactly
   as Flower builds it, and the worker goes on to the next task.

What it never does: install or import the FAB, or call `flwr_exit` (which
ends the process). It runs `consortia.client.app:app` and nothing else: a
FAB whose `pyproject.toml` names another ClientApp is answered with an
error reply (`ForeignClientAppError`, logged), so the codeguard's promise,
only code the operator installed runs, holds by construction.

Two of Flower's helpers would end this process and are replaced: the HTTP
retry policy (`make_simple_http_retry_invoker` raises SIGINT on a 401, i.e.
a revoked task token) and the heartbeat function (`make_task_heartbeat_fn_http`
raises SIGINT when the SuperNode drops the task). Here both only fail the
task at hand.

Between messages it restores what a fresh process would start with and the
ClientApp changes: torch's thread count (the handler sets 1 on CPU) and its
CPU random generator state. The ClientApp keeps no other state between
messages (its Context comes from the SuperNode each time).

With `--metrics-file` (a node with `[metrics]`), it rewrites that file after
every message with its figures (client/worker_metrics.py): what it handled,
the time each round's training took, the device `auto` picks.

It polls `AcquireTask` 20 ms after finishing a task, doubling while idle up
to the node's `poll_interval_s` (no busy loop; a task is picked up within
one interval), and up to 1 s once no task came for a minute (between jobs,
when the SuperNode itself only pulls every 3 s).

One wait of Flower's is shortened. The SuperNode creates a task *before* it
has pulled the message's objects (weights) from the SuperLink, so a worker
that acquires the task at once finds them not there yet, and Flower's
object pull backs off 1 s before its second try (`PULL_INITIAL_BACKOFF`;
a fresh `flwr-clientapp`, 3 s of imports later, never sees that). The
worker binds `pull_task_input`'s `pull_and_inflate_object_from_tree` to a
20 ms first backoff capped at `poll_interval_s` (`install_quick_object_pulls`,
through `consortia.common.flower_waits`, which checks Flower's structure first).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from types import FrameType

import httpx
import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from consortia.client.app import app as consortia_app
from consortia.client.device import resolve_device
from consortia.client.worker_metrics import (
    WorkerMetrics,
    read_worker_metrics,
    write_worker_metrics,
)
from consortia.common import protocol as p
from consortia.common.errors import ConsortiaError
from consortia.common.flower_log import flower_handler_only
from consortia.common.flower_waits import (
    ACTIVE_WINDOW_S,
    DEFAULT_POLL_INTERVAL_S,
    FIRST_RETRY_S,
    shorten_object_pull_backoff,
)

CLIENTAPP = "consortia.client.app:app"  # the only ClientApp this worker runs
FIRST_POLL_S = FIRST_RETRY_S
IDLE_POLL_S = 1.0  # between jobs (no task for ACTIVE_WINDOW_S); the SuperNode itself waits 3 s
RUN_CLIENTAPP_MODULE = "flwr.supernode.runtime.run_clientapp"
_RETRYABLE_STATUS = frozenset({502, 503, 504})
_TASK_CALL_MAX_S = 60.0  # retrying one Runtime API call of a task, SuperNode restarting


class ForeignClientAppError(ConsortiaError):
    """The run's app bundle names a ClientApp other than consortia's installed one."""


class _Stop(BaseException):
    """SIGTERM/SIGINT: abandon what is in hand and end the worker (not an `Exception`)."""


@dataclass(frozen=True)
class Outcome:
    """What one message came to: the reply (if any) and the task's final sub-status."""

    reply: Message | None
    sub_status: str
    details: str


def check_clientapp(fab: Fab) -> None:
    """Refuse a FAB that does not name `consortia.client.app:app` as its ClientApp.

    Reads the bundle's pyproject.toml from its bytes (Flower's
    `get_fab_config`); nothing is unpacked, installed or imported.
    """
    try:
        config = get_fab_config(fab.content)
        component = config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except Exception as exc:  # zip, TOML or schema: all mean "not ours"
        raise ForeignClientAppError(
            f"this node runs only {CLIENTAPP}; the run's app bundle declares no readable "
            f"ClientApp ({exc})"
        ) from exc
    if component != CLIENTAPP:
        raise ForeignClientAppError(
            f"this node runs only {CLIENTAPP} as installed by its operator; the run's app "
            f"bundle names {component!r}"
        )


def answer(app: ClientApp, message: Message, context: Context, fab: Fab) -> Outcome:
    """Run `app` on one message, as `flwr-clientapp` does, without leaving the process.

    A foreign ClientApp is refused before anything runs; an exception in the
    ClientApp becomes Flower's error reply (`CLIENT_APP_RAISED_EXCEPTION`,
    reason `"<class ...>:<'message'>"`) and the task's sub-status FAILED.
    """
    try:
        check_clientapp(fab)
        reply = app(message=message, context=context)
        return Outcome(reply, SubStatus.COMPLETED, "")
    except ForeignClientAppError as exc:
        log(ERROR, "refused %s message of run %s: %s", _kind(message), _run(message), exc)
        code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, exc.message
    except Exception as exc:  # any ClientApp failure is the task's, not ours
        log(ERROR, "ClientApp raised an exception", exc_info=exc)
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc)}:<'{exc}'>"
    return Outcome(
        Message(Error(code=code, reason=reason), reply_to=message), SubStatus.FAILED, reason
    )


@contextlib.contextmanager
def fresh_process_state() -> Iterator[None]:
    """Give back, after a message, the torch settings a fresh ClientApp process starts with."""
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # as a finished process would, for the node's other users


def install_quick_object_pulls(cap_s: float) -> None:
    """`pull_task_input` retries a not-yet-stored object after 20 ms, not 1 s (checked first)."""
    shorten_object_pull_backoff(
        RUN_CLIENTAPP_MODULE,
        "pull_and_inflate_object_from_tree",
        "pull_task_input",
        FIRST_RETRY_S,
        cap_s,
    )


def _kind(message: Message) -> str:
    return str(message.metadata.message_type)


def _run(message: Message) -> str:
    return str(message.metadata.run_id)


def _task_retry_invoker() -> RetryInvoker:
    """Retry transport errors and 502/503/504 for a while; give up at once on anything else.

    Unlike Flower's `make_simple_http_retry_invoker`, a 401 (the task's token
    was revoked) fails the call instead of sending this process SIGINT.
    """
    return RetryInvoker(
        wait_gen_factory=lambda: exponential(base_delay=0.1, max_delay=2),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=_TASK_CALL_MAX_S,
        should_giveup=lambda exc: (
            isinstance(exc, httpx.HTTPStatusError)
            and exc.response.status_code not in _RETRYABLE_STATUS
        ),
    )


def _heartbeat_fn(client: RuntimeHttpClient, lost: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a task the SuperNode dropped is noted, not SIGINT."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            accepted = client.SendTaskHeartbeat(request).success
        except httpx.TransportError:
            return False  # HeartbeatSender retries
        except httpx.HTTPStatusError as err:
            if err.response.status_code in _RETRYABLE_STATUS:
                return False
            accepted = False
        if not accepted and not lost.is_set():
            lost.set()
            log(WARNING, "the SuperNode dropped the task in hand; its reply will be refused")
        return True

    return beat


class Worker:
    """The loop: acquire a ClientApp task, run it in-process, report it, repeat."""

    def __init__(
        self,
        runtime_api_address: str,
        app: ClientApp,
        *,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        metrics_file: Path | None = None,
    ) -> None:
        """`metrics_file`: where to keep the figures the node's metrics endpoint serves
        (client/worker_metrics.py); None when the node serves none."""
        self.address = runtime_api_address
        self.app = app
        self.metrics_file = metrics_file
        self.figures = _starting_figures(metrics_file)
        self.max_poll_s = poll_interval_s
        self.first_poll_s = min(FIRST_POLL_S, poll_interval_s)
        self._acquirer = self._client([RuntimeVersionHttpInterceptor(component_name="SuperExec")])

    def _client(
        self, interceptors: Sequence[ProtobufClientInterceptor], retry: RetryInvoker | None = None
    ) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # 127.0.0.1: consortia runs the runtime API without TLS, as Flower does
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=retry,
        )

    def acquire(self) -> str | None:
        """Claim the oldest pending ClientApp task: its token, or None when there is none."""
        acquired = self._acquirer.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        )
        return acquired.token if acquired.HasField("task") and acquired.token else None

    def serve_forever(self) -> None:
        """Poll for tasks until SIGTERM/SIGINT (raised here as `_Stop`)."""
        log(INFO, "consortia worker: serving %s via the SuperNode at %s", CLIENTAPP, self.address)
        interval = self.first_poll_s
        last_task = -math.inf
        unreachable = False
        while True:
            try:
                token = self.acquire()
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                if not unreachable:  # the SuperNode starting up, or restarting: say it once
                    log(INFO, "consortia worker: SuperNode runtime API not reachable yet (%s)", exc)
                unreachable = True
                time.sleep(self.max_poll_s)
                continue
            if unreachable:
                log(INFO, "consortia worker: connected to the SuperNode runtime API")
                unreachable = False
            if token is not None:
                with fresh_process_state():
                    self.run_task(token)
                last_task = time.monotonic()
                interval = self.first_poll_s
            else:
                active = time.monotonic() - last_task < ACTIVE_WINDOW_S
                interval = min(interval * 2, self.max_poll_s if active else IDLE_POLL_S)
            time.sleep(interval)

    def run_task(self, token: str) -> None:
        """What `flwr-clientapp --token TOKEN` does, in this process, reusing Flower's steps."""
        retry = _task_retry_invoker()
        client = self._client(
            [
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry,
        )
        lost = threading.Event()
        heartbeat = HeartbeatSender(_heartbeat_fn(client, lost))
        context: Context | None = None
        message: Message | None = None
        seconds = 0.0
        outcome = Outcome(None, SubStatus.FAILED, "ClientApp task failed due to unknown reason")
        try:
            heartbeat.start()
            message, context, _run_info, fab = pull_task_input(client)
            started = time.perf_counter()
            outcome = answer(self.app, message, context, fab)
            seconds = time.perf_counter() - started
            if outcome.reply is not None:
                try:
                    push_message(client, outcome.reply, context)
                except Exception as exc:  # Flower logs and goes on, so do we
                    log(ERROR, "Failed to push reply message", exc_info=exc)
            log(
                INFO,
                "consortia worker: [RUN %s, ROUND %s] %s message handled in %.3f s (%s)",
                message.metadata.run_id,
                message.metadata.group_id or "-",
                message.metadata.message_type,
                seconds,
                outcome.sub_status,
            )
        except _Stop:
            outcome = Outcome(None, SubStatus.FAILED, "the node is stopping")
            retry.max_tries = 1  # as flwr-clientapp on exit: one try, do not hold the stop up
            raise
        except Exception as exc:  # e.g. the task input could not be pulled
            log(ERROR, "consortia worker: the task failed before the ClientApp ran", exc_info=exc)
            outcome = Outcome(None, SubStatus.FAILED, f"{type(exc)}:<'{exc}'>")
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            push_task_output(client, context, outcome.sub_status, outcome.details)
            client.close()
            if message is not None:
                self._count(message, outcome.sub_status, seconds)

    def _count(self, message: Message, sub_status: str, seconds: float) -> None:
        """Note the message in the worker's figures; a write that fails costs a warning."""
        if self.figures is None or self.metrics_file is None:
            return
        meta = message.metadata
        config = message.content.config_records.get(p.CONFIG_KEY)
        server_round = None if config is None else config.get(p.ROUND_KEY)
        self.figures.handled(
            meta.message_type,
            sub_status,
            seconds,
            meta.run_id,
            server_round if isinstance(server_round, int) else None,
        )
        try:
            write_worker_metrics(self.metrics_file, self.figures)
        except OSError as exc:
            log(WARNING, "consortia worker: cannot write %s: %s", self.metrics_file, exc)


def _starting_figures(metrics_file: Path | None) -> WorkerMetrics | None:
    """The counts so far (a restarted worker continues them) and the device 'auto' picks."""
    if metrics_file is None:
        return None
    figures = read_worker_metrics(metrics_file) or WorkerMetrics()
    device = resolve_device("auto")
    figures.device = device.type
    figures.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    try:
        write_worker_metrics(metrics_file, figures)
    except OSError as exc:
        log(WARNING, "consortia worker: cannot write %s: %s", metrics_file, exc)
    return figures


def _stop_on_signals() -> None:
    """SIGTERM/SIGINT (also what Flower's parent monitor raises) end the worker, once."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stop(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m consortia.client.clientapp_worker",
        description="Run consortia's ClientApp for a SuperNode started with --isolation process.",
    )
    parser.add_argument(
        "--runtime-api-address", required=True, help="host:port, e.g. 127.0.0.1:9094"
    )
    parser.add_argument("--poll-interval-s", type=float, default=DEFAULT_POLL_INTERVAL_S)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when it exits")
    parser.add_argument(
        "--metrics-file", type=Path, default=None, help="keep the node's worker figures here"
    )
    args = parser.parse_args(argv)
    flower_handler_only()  # Opacus' root handler would print every Flower line twice
    _stop_on_signals()
    try:
        install_quick_object_pulls(args.poll_interval_s)
    except ConsortiaError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    worker = Worker(
        args.runtime_api_address,
        consortia_app,
        poll_interval_s=args.poll_interval_s,
        metrics_file=args.metrics_file,
    )
    try:
        worker.serve_forever()
    except _Stop:
        log(INFO, "consortia worker: stopped")
    sys.exit(0)


if __name__ == "__main__":
    main()
