"""The SuperLink's SQLite under load: a locked database is a retryable 503, lock waits are long.

A real SQLite lock (a second connection holds an exclusive transaction)
raises through SQLAlchemy inside a Starlette app wrapped by Flower's own
HTTP error translator, as in the SuperLink; `install` is checked in a fresh
interpreter, where it patches the Flower modules the SuperLink process uses.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from flwr.supercore.constant import SQLITE_PRAGMAS
from flwr.supercore.error import http_error_translator
from sqlalchemy import create_engine, text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from consortia.server.coordinator.link_database import (
    BUSY_TIMEOUT_MS,
    is_locked_database,
    pragmas,
    retrying_translator,
)


def _app(db: Path) -> Starlette:
    engine = create_engine(f"sqlite:///{db}", connect_args={"timeout": 0})

    def push(request: Request) -> PlainTextResponse:
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO messages VALUES (1)"))
        return PlainTextResponse("stored")

    def broken(request: Request) -> PlainTextResponse:
        raise ValueError("not a database problem")

    translator = retrying_translator(http_error_translator)
    return Starlette(
        routes=[Route("/push", push, methods=["POST"]), Route("/broken", broken)],
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=translator)],
    )


def test_a_locked_database_is_answered_503_and_a_resend_stores_once(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE messages (id INTEGER)")
    client = TestClient(_app(db), raise_server_exceptions=False)

    holder.execute("BEGIN EXCLUSIVE")
    locked = client.post("/push")
    assert locked.status_code == 503 and locked.headers["retry-after"] == "1"
    assert "busy" in locked.json()["detail"]
    holder.execute("COMMIT")

    # The request that failed stored nothing, so the client's resend is safe.
    assert client.post("/push").status_code == 200
    assert holder.execute("SELECT COUNT(*) FROM messages").fetchone() == (1,)
    # Anything else stays Flower's generic 500 (not retried by its clients).
    assert client.get("/broken").status_code == 500


def test_only_lock_errors_count_as_locked() -> None:
    assert is_locked_database(sqlite3.OperationalError("database is locked"))
    assert not is_locked_database(sqlite3.OperationalError("no such table: messages"))
    assert not is_locked_database(ValueError("database is locked"))


def test_pragmas_keep_flowers_and_wait_longer_for_the_lock() -> None:
    ours = dict(pragmas(SQLITE_PRAGMAS))
    flowers = dict(SQLITE_PRAGMAS)
    assert ours.pop("busy_timeout") == str(BUSY_TIMEOUT_MS) and BUSY_TIMEOUT_MS >= 30_000
    flowers.pop("busy_timeout")
    assert ours == flowers


def test_install_patches_what_the_superlink_reads(tmp_path: Path) -> None:
    script = f"""
import json, sqlite3
from consortia.server.coordinator import link_database
link_database.install()
from flwr.supercore import sql_mixin
from flwr.superlink import main
connection = sqlite3.connect({str(tmp_path / "state.db")!r})
sql_mixin._set_sqlite_pragmas(connection, None)
timeout = connection.execute("PRAGMA busy_timeout").fetchone()[0]
print(json.dumps([timeout, main.http_error_translator.__qualname__]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    timeout, translator = json.loads(result.stdout.strip().splitlines()[-1])
    assert timeout == BUSY_TIMEOUT_MS
    assert translator.startswith("retrying_translator")
