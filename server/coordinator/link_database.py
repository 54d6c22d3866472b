"""The SuperLink's SQLite database under load: longer lock waits, and a busy database as 503.

Flower's SuperLink keeps its state in one SQLite file (WAL mode) that every
request of every node writes to. Flower sets `busy_timeout = 5000`: a
writer waits at most 5 s for the lock, then SQLite raises "database is
locked". With tens of nodes pushing replies on a loaded host that happens,
and Flower's HTTP error translator answers it as a generic 500, which
Flower's SuperNode does not retry (it retries only 502/503/504) — the
node's reply is lost and the round waits for its whole timeout.

Kept from Flower: every other pragma, its error translator, its retrying
clients. Changed, in the SuperLink process only (`superlink.py` calls
`install` before Flower builds its app):

- `busy_timeout` is `BUSY_TIMEOUT_MS` (60 s): a writer queues for the lock
  instead of failing; each transaction holds it for milliseconds.
- A locked database that still surfaces is answered 503 with
  `Retry-After`, so the node's and the ServerApp's clients back off and
  send again. That resend is safe: the statement that raised was rolled
  back with its session, so nothing of the request was stored.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import OperationalError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["BUSY_TIMEOUT_MS", "RETRY_AFTER_S", "install", "is_locked_database", "pragmas"]

BUSY_TIMEOUT_MS = 60_000
RETRY_AFTER_S = 1

CallNext = Callable[[Request], Awaitable[Response]]
Translator = Callable[[Request, CallNext], Awaitable[Response]]


def pragmas(flower_pragmas: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Flower's SQLite pragmas with the longer lock wait."""
    return tuple(
        (name, str(BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
        for name, value in flower_pragmas
    )


def is_locked_database(exc: BaseException) -> bool:
    """Whether `exc` is SQLite's "database is locked" / "busy" (retryable as a whole)."""
    original = exc.orig if isinstance(exc, OperationalError) else exc
    if not isinstance(original, sqlite3.OperationalError):
        return False
    text = str(original).lower()
    return "database is locked" in text or "database is busy" in text


def retrying_translator(flower_translator: Translator) -> Translator:
    """Flower's translator, with a locked database answered 503 instead of 500."""

    async def translate(request: Request, call_next: CallNext) -> Response:
        async def guarded(inner: Request) -> Response:
            try:
                return await call_next(inner)
            except (OperationalError, sqlite3.OperationalError) as exc:
                if not is_locked_database(exc):
                    raise
                return JSONResponse(
                    status_code=503,
                    content={"detail": "the coordinator's database is busy; retry"},
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )

        return await flower_translator(request, guarded)

    return translate


def install() -> None:
    """Apply both changes to Flower's modules; call before the SuperLink builds its app."""
    from flwr.supercore import sql_mixin
    from flwr.superlink import main as superlink_main

    # Module attributes Flower reads at call time: `_set_sqlite_pragmas` on each
    # new connection, `_get_middleware` when `create_app` builds the app.
    flower_pragmas: tuple[tuple[str, str], ...] = sql_mixin.SQLITE_PRAGMAS  # type: ignore[attr-defined]
    flower_translator: Translator = superlink_main.http_error_translator  # type: ignore[attr-defined]
    vars(sql_mixin)["SQLITE_PRAGMAS"] = pragmas(flower_pragmas)
    vars(superlink_main)["http_error_translator"] = retrying_translator(flower_translator)
