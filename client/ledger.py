"""The node's durable privacy ledger: every DP release of every registered dataset.

ε protects a dataset, not a job. The Flower `Context` (`privacy_state.py`)
lives as long as one run, but a node that serves the same data to many jobs
must compose all of them: this ledger is that memory. It is one SQLite file
in the node's state directory, holding per registered dataset its ε budget,
δ and accountant (fixed at registration) and every release made from it.

- **Composition never resets.** ε is the composition of the dataset's whole
  history, across rounds and across jobs (run ids).
- **Storage, not accounting.** ε is composed by consortia's one accountant
  (`consortia.common.privacy`); the ledger stores its state, loads it back
  into an accountant to compose a release, and stores the result.
- **RDP is O(#orders) per release.** The accountant's RDP state is one
  vector (float64 over `RDP_ORDERS`), kept in the dataset row; a release
  adds `steps × curve(σ, q)` to it, the very sum `privacy.epsilon` computes
  over the history (bit-for-bit: same operations, same order). Recording a
  release does not read the history. A (σ, q) pair's curve costs 10-20 ms
  the first time (Opacus' `compute_rdp`) and is cached in the file after
  (`step_curves`): `projected_epsilon` before training warms it for
  `record_release` after.
- **PRV is selectable per dataset, and slow.** The PRV accountant has no
  additive shortcut: its state is the history (releases of one mechanism,
  σ and q merged, which SQL groups), and every release recomputes ε with
  Opacus' `PRVAccountant`, 0.1 s to tens of seconds depending on the number
  of distinct (σ, q) pairs and total steps. The accountant cannot change
  after registration: one history is never accounted two ways.
- **Durable before the update leaves.** `record_release` writes the release
  row and the new composed state in one transaction, committed with
  `synchronous=FULL` (see `_open_connection`), and refuses (writing nothing)
  a release that would exceed the budget. A caller records *before* it sends
  the update; a crash between the two over-counts, never under-counts.
- **Auditable.** `verify` recomputes ε from the stored history with Opacus'
  own accountant and compares it with the stored composed value, and (RDP)
  recomposes the stored vector from the history with curves computed afresh.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, computed_field

from consortia.common.atomic import fsync_dir
from consortia.common.errors import ConsortiaError, PrivacyError
from consortia.common.privacy import (
    RDP_ORDERS,
    AccountantName,
    Mechanism,
    PrivacyAccountant,
    PrvAccountant,
    RdpAccountant,
    Release,
    StepCurves,
    opacus_epsilon,
    rdp_per_step,
)

LEDGER_FILENAME = "privacy-ledger.sqlite3"
SCHEMA_VERSION = 1
# `PRAGMA application_id` marks the file as a consortia ledger ("CNSL").
APPLICATION_ID = 0x434E534C
# How long a writer waits for another process's write transaction to end.
BUSY_TIMEOUT_S = 60.0
# Relative tolerance of `verify`'s comparisons (summation order differs by ulps).
VERIFY_REL_TOL = 1e-9

_ORDER_LIST: list[float] = list(RDP_ORDERS)
_VECTOR_BYTES = 8 * len(RDP_ORDERS)
_ACCOUNTANTS: tuple[str, ...] = get_args(AccountantName)
_MECHANISMS: tuple[str, ...] = tuple(mechanism.value for mechanism in Mechanism)
_MECHANISM_LIST = ", ".join(f"'{mechanism}'" for mechanism in _MECHANISMS)  # for SQL
# Optimistic PRV writes: recompute this often if another writer got in between.
_PRV_ATTEMPTS = 3

_M = TypeVar("_M", bound=BaseModel)

_STEP_CURVES = """
CREATE TABLE IF NOT EXISTS step_curves (
    -- cache: RDP of one subsampled-Gaussian step per order, as `composed_rdp`
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    curve BLOB NOT NULL,
    PRIMARY KEY (noise_multiplier, sample_rate)
)"""

# One statement per item: `executescript` would commit the open transaction.
_SCHEMA: tuple[str, ...] = (
    """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""",
    """
CREATE TABLE datasets (
    name TEXT PRIMARY KEY,
    epsilon_budget REAL NOT NULL CHECK (epsilon_budget > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant TEXT NOT NULL CHECK (accountant IN ('rdp', 'prv')),
    created_at TEXT NOT NULL,
    releases INTEGER NOT NULL CHECK (releases >= 0),
    epsilon_spent REAL NOT NULL CHECK (epsilon_spent >= 0),
    -- float64 little-endian, one per RDP order (NULL for PRV datasets)
    composed_rdp BLOB
)""",
    # The mechanisms of this consortia; a ledger created before a new one needs a migration.
    f"""
CREATE TABLE releases (
    dataset TEXT NOT NULL REFERENCES datasets (name),
    seq INTEGER NOT NULL CHECK (seq >= 1),
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    mechanism TEXT NOT NULL CHECK (mechanism IN ({_MECHANISM_LIST})),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    delta REAL NOT NULL,
    epsilon REAL NOT NULL,
    accountant TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (dataset, seq)
)""",
    _STEP_CURVES,
)

_RELEASE_COLUMNS = (
    "dataset, seq, run_id, server_round, mechanism, noise_multiplier, sample_rate, steps, "
    "delta, epsilon, accountant, recorded_at"
)
_DATASET_COLUMNS = (
    "name, epsilon_budget, delta, accountant, created_at, releases, epsilon_spent, composed_rdp"
)


# ------------------------------------------------------------------ errors


class LedgerError(ConsortiaError):
    """The privacy ledger cannot do what was asked (locked, unwritable, conflicting input)."""


class LedgerCorruptError(LedgerError):
    """The ledger file is not a readable consortia ledger."""


class LedgerIntegrityError(LedgerCorruptError):
    """The stored composed ε disagrees with the ε recomputed from the stored history."""


class UnknownDatasetError(LedgerError):
    """The dataset is not registered in the ledger."""


class BudgetExceededError(PrivacyError):
    """A release would take a dataset's ε above its budget; nothing was recorded."""


# ------------------------------------------------------------------ models


class DatasetBudget(BaseModel):
    """A registered dataset: its fixed budget, δ and accountant, and what it has spent."""

    model_config = ConfigDict(frozen=True)

    name: str
    epsilon_budget: float
    delta: float
    accountant: AccountantName
    epsilon_spent: float
    releases: int
    created_at: datetime

    # mypy models no decorator over @property; this is pydantic's documented form.
    @computed_field  # type: ignore[prop-decorator]
    @property
    def epsilon_remaining(self) -> float:
        """Budget left (never negative)."""
        return max(0.0, self.epsilon_budget - self.epsilon_spent)


class LedgerEntry(BaseModel):
    """One recorded release; `epsilon` is the dataset's ε after composing it, at `delta`."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    seq: int
    run_id: str
    server_round: int
    mechanism: Mechanism
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    accountant: AccountantName
    recorded_at: datetime

    @property
    def release(self) -> Release:
        """The release as the accountants see it."""
        return Release(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps
        )


class LedgerVerification(BaseModel):
    """What `verify` compared: the stored ε and Opacus' ε over the stored history."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    accountant: AccountantName
    releases: int
    stored_epsilon: float
    recomputed_epsilon: float


# ------------------------------------------------------------------ ledger


def ledger_path(state_dir: Path) -> Path:
    """Where a node keeps its ledger inside its state directory."""
    return state_dir / LEDGER_FILENAME


class PrivacyLedger:
    """A node's privacy ledger in the SQLite file at `path` (created if missing).

    One connection per object, guarded by a lock, so one ledger may be shared
    by threads; several processes may open the same file (SQLite serialises
    their writes). Use as a context manager or call `close()`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = _open_connection(self.path)
        try:
            with self._transaction("initialise its schema", write=True) as conn:
                _ensure_schema(conn, self.path)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the connection (idempotent); committed releases are already durable."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------- datasets

    def register_dataset(
        self,
        name: str,
        epsilon_budget: float,
        delta: float,
        accountant: AccountantName = "rdp",
    ) -> DatasetBudget:
        """Register `name` with its total ε budget at `delta`, accounted with `accountant`.

        Registering again with the same values is a no-op (a node may do it at
        every start); different values are refused, because budget, δ and
        accountant are fixed for the whole history of a dataset.
        """
        _check_registration(name, epsilon_budget, delta, accountant)
        with self._transaction(f"register dataset {name!r}", write=True) as conn:
            existing = _dataset_row(conn, name)
            if existing is not None:
                budget = _budget_from_row(existing, self.path)
                _check_same_registration(budget, epsilon_budget, delta, accountant, self.path)
                return budget
            composed = _encode_vector(np.zeros(len(RDP_ORDERS))) if accountant == "rdp" else None
            conn.execute(
                f"INSERT INTO datasets ({_DATASET_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, 0.0, ?)",
                (name, float(epsilon_budget), float(delta), accountant, _utc_now(), composed),
            )
            return _budget_from_row(_require_dataset(conn, name, self.path), self.path)

    def budget(self, dataset: str) -> DatasetBudget:
        """The dataset's budget, δ, accountant and spend so far."""
        with self._transaction(f"read dataset {dataset!r}", write=False) as conn:
            return _budget_from_row(_require_dataset(conn, dataset, self.path), self.path)

    def datasets(self) -> list[DatasetBudget]:
        """Every registered dataset, by name."""
        with self._transaction("list its datasets", write=False) as conn:
            rows = conn.execute(f"SELECT {_DATASET_COLUMNS} FROM datasets ORDER BY name")
            return [_budget_from_row(row, self.path) for row in rows.fetchall()]

    def spent(self, dataset: str) -> float:
        """ε spent so far on `dataset` (composed over its whole history), at its δ."""
        return self.budget(dataset).epsilon_spent

    def history(self, dataset: str) -> list[LedgerEntry]:
        """Every release of `dataset`, oldest first."""
        with self._transaction(f"read the history of {dataset!r}", write=False) as conn:
            _require_dataset(conn, dataset, self.path)
            return _entries(conn, dataset, self.path)

    # ----------------------------------------------------------- releases

    def accountant(self, dataset: str) -> PrivacyAccountant:
        """The dataset's composed state in an accountant, to project releases on; writes nothing."""
        with self._transaction(f"read dataset {dataset!r}", write=False) as conn:
            row = _require_dataset(conn, dataset, self.path)
            return _stored_accountant(conn, row, self.path)

    def projected_epsilon(
        self, dataset: str, release: Release, mechanism: Mechanism = Mechanism.DPSGD
    ) -> float:
        """ε of `dataset` if `release` were added; writes nothing.

        A node calls this before training to refuse a round that would exceed
        its budget (it also warms the RDP curve cache for `record_release`).
        """
        with self._transaction(f"read dataset {dataset!r}", write=False) as conn:
            row = _require_dataset(conn, dataset, self.path)
            accountant = _stored_accountant(conn, row, self.path, _file_curves(conn, store=False))
            accountant.compose(release, mechanism)
        return accountant.epsilon(float(row["delta"]))  # PRV: seconds, outside the transaction

    def record_release(
        self,
        dataset: str,
        release: Release,
        *,
        run_id: str,
        server_round: int,
        mechanism: Mechanism = Mechanism.DPSGD,
    ) -> LedgerEntry:
        """Durably record `release` of `dataset` and return it with the composed ε.

        Call it *before* the update leaves the node; when it returns, the
        release and the new composed state are committed together (fsync'd).
        Raises `BudgetExceededError`, writing nothing, if the release would
        take ε above the dataset's budget: the update must then not be sent.
        """
        _check_release_labels(run_id, server_round, mechanism)
        labels = _Labels(run_id=run_id, server_round=server_round, mechanism=Mechanism(mechanism))
        with self._transaction(f"record a release of {dataset!r}", write=True) as conn:
            row = _require_dataset(conn, dataset, self.path)
            if row["accountant"] == "rdp":
                accountant = _stored_accountant(
                    conn, row, self.path, _file_curves(conn, store=True)
                )
                accountant.compose(release, labels.mechanism)
                projected = accountant.epsilon(float(row["delta"]))
                return _write_release(conn, row, release, projected, accountant, labels)
        return self._record_prv(dataset, release, labels)

    def verify(self, dataset: str) -> LedgerVerification:
        """Recompute ε from the stored history with Opacus' accountant; raise on disagreement.

        Detects a tampered or corrupt ledger: edited, deleted or inserted
        release rows, or an edited composed state. Cost is O(history) to read
        plus one Opacus curve (RDP, 10-20 ms) or PRV composition per distinct
        (σ, q) pair. Raises `LedgerIntegrityError` naming the failed check.
        """
        with self._transaction(f"read the history of {dataset!r}", write=False) as conn:
            row = _require_dataset(conn, dataset, self.path)
            budget = _budget_from_row(row, self.path)
            entries = _entries(conn, dataset, self.path)
            composed = row["composed_rdp"]
        problem = _history_problem(budget, entries)
        recomputed = _reference_epsilon(entries, budget)
        if problem is None and not _close(recomputed, budget.epsilon_spent):
            problem = (
                f"the stored ε={budget.epsilon_spent!r} differs from ε={recomputed!r} recomputed "
                f"from its {len(entries)} releases with Opacus' {budget.accountant.upper()} "
                "accountant"
            )
        if problem is None and budget.accountant == "rdp":
            problem = _composed_rdp_problem(composed, entries, budget, self.path)
        if problem is not None:
            raise LedgerIntegrityError(
                f"the privacy ledger at {self.path} fails its integrity check for dataset "
                f"{dataset!r}: {problem}. It was modified outside consortia or is damaged: "
                "restore it from a backup, and until then treat the dataset's budget as spent "
                "(do not train on it)"
            )
        return LedgerVerification(
            dataset=dataset,
            accountant=budget.accountant,
            releases=len(entries),
            stored_epsilon=budget.epsilon_spent,
            recomputed_epsilon=recomputed,
        )

    # ----------------------------------------------------------- internals

    def _record_prv(self, dataset: str, release: Release, labels: _Labels) -> LedgerEntry:
        """Record a PRV release, computing ε outside SQLite's write lock when possible.

        PRV takes seconds; holding the (file-wide) write lock meanwhile would
        stall every other dataset's writers. So ε is computed from a snapshot
        and written only if no release was recorded in between; if writers
        keep getting in first, the last attempt computes under the lock.
        """
        action = f"record a release of {dataset!r}"
        for _ in range(_PRV_ATTEMPTS):
            with self._transaction(f"read dataset {dataset!r}", write=False) as conn:
                seen = _require_dataset(conn, dataset, self.path)
                accountant = _stored_accountant(conn, seen, self.path)
            accountant.compose(release, labels.mechanism)
            projected = accountant.epsilon(float(seen["delta"]))
            with self._transaction(action, write=True) as conn:
                row = _require_dataset(conn, dataset, self.path)
                if row["releases"] == seen["releases"]:
                    return _write_release(conn, row, release, projected, accountant, labels)
        with self._transaction(action, write=True) as conn:
            row = _require_dataset(conn, dataset, self.path)
            accountant = _stored_accountant(conn, row, self.path)
            accountant.compose(release, labels.mechanism)
            projected = accountant.epsilon(float(row["delta"]))
            return _write_release(conn, row, release, projected, accountant, labels)

    @contextmanager
    def _transaction(self, action: str, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction; BEGIN IMMEDIATE for writes so read-modify-write is atomic."""
        with self._lock, _sqlite_errors(self.path, action):
            if self._conn is None:
                raise LedgerError(
                    f"the privacy ledger at {self.path} is closed; open a new PrivacyLedger"
                )
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise


# ------------------------------------------------------------------ sqlite plumbing


def _open_connection(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database at `path` with durable settings.

    WAL rather than DELETE: with `synchronous=FULL` every WAL commit is
    fsync'd before it returns, so a committed release survives SIGKILL and
    power loss, and a commit is one append + one fsync. In DELETE mode a
    commit is several fsyncs, and its commit point (unlinking the rollback
    journal) is not itself fsync'd, so power loss can roll a "committed"
    release back. WAL also lets an auditor read while the node writes. Its
    cost: the state directory must be on a local filesystem (WAL needs shared
    memory), which `PRAGMA journal_mode` reports and we check.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LedgerError(
            f"cannot create the folder of the privacy ledger {path}: {exc}; "
            "choose a writable node state directory"
        ) from None
    is_new = not path.exists()
    with _sqlite_errors(path, "open"):
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    try:
        with _sqlite_errors(path, "open"):
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(
                    f"the privacy ledger at {path} cannot use SQLite's WAL journal (got "
                    f"{mode!r}); put the node's state directory on a local filesystem"
                )
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA fullfsync=ON")  # macOS: flush the drive cache too
            conn.execute("PRAGMA foreign_keys=ON")
            _quick_check(conn, path)
    except BaseException:
        conn.close()
        raise
    if is_new:
        fsync_dir(path.parent)  # the new file's directory entry, too
    return conn


def _quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """SQLite's structural check (pages, indexes) once at open: milliseconds for a ledger."""
    results = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
    if results != ["ok"]:
        raise LedgerCorruptError(
            f"the privacy ledger at {path} is damaged (SQLite quick_check: "
            f"{'; '.join(results[:3])}); {_RESTORE_ADVICE}"
        )


_RESTORE_ADVICE = (
    "restore it from a backup (together with its -wal file, if any). Do not delete it or start "
    "a new ledger: that forgets every release recorded there and resets each dataset's spent ε "
    "to 0"
)


@contextmanager
def _sqlite_errors(path: Path, action: str) -> Iterator[None]:
    """Turn sqlite3's exceptions into one-message `LedgerError`s that say what to do."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise LedgerError(
                f"the privacy ledger at {path} stayed locked by another process for over "
                f"{BUSY_TIMEOUT_S:.0f} s while trying to {action}; retry, or stop the process "
                "that holds it"
            ) from None
        raise LedgerError(
            f"the privacy ledger at {path} could not {action}: {exc}; check that the file and "
            "its folder exist and are writable by this user and that the disk is not full"
        ) from None
    except sqlite3.DatabaseError as exc:
        raise LedgerCorruptError(
            f"the privacy ledger at {path} is damaged or not a SQLite database ({exc}); "
            f"{_RESTORE_ADVICE}"
        ) from None


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in an empty file; otherwise check it is a ledger we can read."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if application_id == 0 and version == 0 and tables == 0:
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('rdp_orders', ?)", (json.dumps(_ORDER_LIST),))
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return
    if application_id != APPLICATION_ID:
        raise LedgerCorruptError(
            f"{path} is a SQLite database but not a consortia privacy ledger; point the node "
            "at its own state directory, or move this file away"
        )
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"the privacy ledger at {path} was written by a newer consortia (schema "
            f"{version}, this one reads {SCHEMA_VERSION}); upgrade consortia on this node"
        )
    if version != SCHEMA_VERSION:
        raise LedgerCorruptError(
            f"the privacy ledger at {path} has unknown schema version {version}; {_RESTORE_ADVICE}"
        )
    _check_orders(conn, path)
    conn.execute(_STEP_CURVES)  # a cache added within schema 1: ledgers without it get it


def _check_orders(conn: sqlite3.Connection, path: Path) -> None:
    """Composed RDP vectors are only meaningful over the orders they were summed on."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'rdp_orders'").fetchone()
    try:
        stored = [float(order) for order in json.loads(row[0])] if row is not None else None
    except (TypeError, ValueError):
        stored = None
    if stored is None:
        raise LedgerCorruptError(
            f"the privacy ledger at {path} lacks its RDP orders; {_RESTORE_ADVICE}"
        )
    if stored != [float(order) for order in _ORDER_LIST]:
        raise LedgerError(
            f"the privacy ledger at {path} composes RDP over other orders than this Opacus "
            "version's RDPAccountant.DEFAULT_ALPHAS; run the node with the Opacus version "
            "consortia pins (opacus==1.6.0)"
        )


# ------------------------------------------------------------------ rows


def _dataset_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(
        f"SELECT {_DATASET_COLUMNS} FROM datasets WHERE name = ?", (name,)
    ).fetchone()
    return row


def _require_dataset(conn: sqlite3.Connection, name: str, path: Path) -> sqlite3.Row:
    row = _dataset_row(conn, name)
    if row is None:
        names = [r[0] for r in conn.execute("SELECT name FROM datasets ORDER BY name")]
        known = ", ".join(repr(n) for n in names) if names else "none"
        raise UnknownDatasetError(
            f"dataset {name!r} is not registered in the privacy ledger at {path} (registered: "
            f"{known}); register it with its ε budget and δ first, or check the name"
        )
    return row


def _budget_from_row(row: sqlite3.Row, path: Path) -> DatasetBudget:
    fields = dict(row)
    fields.pop("composed_rdp", None)
    return _validated(DatasetBudget, fields, path)


def _entries(conn: sqlite3.Connection, dataset: str, path: Path) -> list[LedgerEntry]:
    rows = conn.execute(
        f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE dataset = ? ORDER BY seq", (dataset,)
    ).fetchall()
    return [_validated(LedgerEntry, dict(row), path) for row in rows]


def _validated(model: type[_M], fields: dict[str, object], path: Path) -> _M:
    """A row as a model; a row that does not validate means the file was tampered with."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise LedgerCorruptError(
            f"the privacy ledger at {path} holds an invalid {model.__name__} row "
            f"({exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}); {_RESTORE_ADVICE}"
        ) from None


class _Group(BaseModel):
    """Releases of one mechanism, σ and q, merged: their steps summed."""

    mechanism: Mechanism
    release: Release


def _grouped_history(conn: sqlite3.Connection, dataset: str, path: Path) -> list[_Group]:
    """The history merged per mechanism, σ and q, in first-use order: the PRV state.

    SQL merges it without parsing every row; the PRV accountant merges the same way.
    """
    rows = conn.execute(
        "SELECT mechanism, noise_multiplier, sample_rate, SUM(steps) FROM releases "
        "WHERE dataset = ? AND steps > 0 GROUP BY mechanism, noise_multiplier, sample_rate "
        "ORDER BY MIN(seq)",
        (dataset,),
    ).fetchall()
    return [
        _validated(
            _Group,
            {"mechanism": m, "release": {"noise_multiplier": s, "sample_rate": q, "steps": n}},
            path,
        )
        for m, s, q, n in rows
    ]


@dataclass(frozen=True)
class _Labels:
    """What a release is labelled with besides its mechanism parameters."""

    run_id: str
    server_round: int
    mechanism: Mechanism


def _write_release(
    conn: sqlite3.Connection,
    row: sqlite3.Row,
    release: Release,
    projected: float,
    accountant: PrivacyAccountant,
    labels: _Labels,
) -> LedgerEntry:
    """Inside the caller's write transaction: refuse over budget, else insert and compose.

    `accountant` has composed `release`; `projected` is its ε.
    """
    _refuse_over_budget(row, projected)
    entry = _new_entry(row, release, projected, labels)
    _insert_entry(conn, entry)
    composed_rdp = accountant.composed if isinstance(accountant, RdpAccountant) else None
    _store_composition(conn, entry.dataset, entry.seq, projected, composed_rdp)
    return entry


def _new_entry(
    row: sqlite3.Row,
    release: Release,
    epsilon_after: float,
    labels: _Labels,
) -> LedgerEntry:
    return LedgerEntry(
        dataset=row["name"],
        seq=int(row["releases"]) + 1,
        run_id=labels.run_id,
        server_round=labels.server_round,
        mechanism=labels.mechanism,
        noise_multiplier=release.noise_multiplier,
        sample_rate=release.sample_rate,
        steps=release.steps,
        delta=float(row["delta"]),
        epsilon=epsilon_after,
        accountant=row["accountant"],
        recorded_at=datetime.fromisoformat(_utc_now()),
    )


def _insert_entry(conn: sqlite3.Connection, entry: LedgerEntry) -> None:
    conn.execute(
        f"INSERT INTO releases ({_RELEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            entry.dataset,
            entry.seq,
            entry.run_id,
            entry.server_round,
            entry.mechanism.value,
            entry.noise_multiplier,
            entry.sample_rate,
            entry.steps,
            entry.delta,
            entry.epsilon,
            entry.accountant,
            entry.recorded_at.isoformat(),
        ),
    )


def _store_composition(
    conn: sqlite3.Connection,
    dataset: str,
    releases: int,
    epsilon_spent: float,
    composed_rdp: np.ndarray | None,
) -> None:
    """The dataset's new composed state; same transaction as the release row it includes."""
    blob = None if composed_rdp is None else _encode_vector(composed_rdp)
    conn.execute(
        "UPDATE datasets SET releases = ?, epsilon_spent = ?, composed_rdp = ? WHERE name = ?",
        (releases, epsilon_spent, blob, dataset),
    )


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# ------------------------------------------------------------------ accounting


def _encode_vector(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f8").tobytes()


def _decode_vector(blob: object, dataset: str, path: Path) -> np.ndarray:
    if not isinstance(blob, bytes) or len(blob) != _VECTOR_BYTES:
        raise LedgerCorruptError(
            f"the privacy ledger at {path} holds an unreadable composed RDP state for dataset "
            f"{dataset!r}; {_RESTORE_ADVICE}"
        )
    return np.frombuffer(blob, dtype="<f8").astype(np.float64)


def _stored_accountant(
    conn: sqlite3.Connection, row: sqlite3.Row, path: Path, curves: StepCurves = rdp_per_step
) -> PrivacyAccountant:
    """The dataset's stored composed state, loaded into the accountant it was composed by."""
    if row["accountant"] == "rdp":
        return RdpAccountant(_decode_vector(row["composed_rdp"], row["name"], path), curves)
    accountant = PrvAccountant()
    for group in _grouped_history(conn, row["name"], path):
        accountant.compose(group.release, group.mechanism)
    return accountant


def _file_curves(conn: sqlite3.Connection, *, store: bool) -> StepCurves:
    """One step's RDP curve from the ledger file's cache (`store`: cache what is computed)."""
    return functools.partial(_step_curve, conn, store)


def _step_curve(
    conn: sqlite3.Connection, store: bool, noise_multiplier: float, sample_rate: float
) -> np.ndarray:
    """RDP of one step at (σ, q), from the ledger's cache when it is there.

    Opacus' `compute_rdp` costs up to ~0.5 s for q < 1, and a deployed node
    runs every message in a new process, so the in-process cache alone would
    pay it per round. The stored curve is derived data: `verify` recomputes
    every curve from scratch, so a wrong cache entry cannot hide.
    """
    key = (noise_multiplier, sample_rate)
    cached = conn.execute(
        "SELECT curve FROM step_curves WHERE noise_multiplier = ? AND sample_rate = ?", key
    ).fetchone()
    if cached is not None:
        curve = np.frombuffer(cached["curve"], dtype="<f8")
        if curve.shape == (len(RDP_ORDERS),) and not np.isnan(curve).any():
            return curve
    curve = rdp_per_step(*key)
    if store:
        conn.execute(
            "INSERT OR REPLACE INTO step_curves VALUES (?, ?, ?)",
            (*key, _encode_vector(curve)),
        )
    return curve


def _reference_epsilon(entries: list[LedgerEntry], budget: DatasetBudget) -> float:
    """ε by Opacus' own accountant over the history (merged per (σ, q) to stay fast)."""
    history = [entry.mechanism.accounted_as(entry.release) for entry in entries]
    return opacus_epsilon(history, budget.delta, budget.accountant)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=VERIFY_REL_TOL, abs_tol=0.0)


# ------------------------------------------------------------------ checks


def _check_registration(name: str, epsilon_budget: float, delta: float, accountant: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise LedgerError(f"a dataset needs a non-empty name to be registered (got {name!r})")
    if not (math.isfinite(epsilon_budget) and epsilon_budget > 0):
        raise PrivacyError(
            f"dataset {name!r}: the ε budget must be a positive finite number, got "
            f"{epsilon_budget!r}"
        )
    if not (0 < delta < 1):
        raise PrivacyError(
            f"dataset {name!r}: δ must lie strictly between 0 and 1 (well below 1/records), "
            f"got {delta!r}"
        )
    if accountant not in _ACCOUNTANTS:
        raise PrivacyError(
            f"dataset {name!r}: unknown accountant {accountant!r}; use one of "
            f"{', '.join(_ACCOUNTANTS)}"
        )


def _check_same_registration(
    budget: DatasetBudget, epsilon_budget: float, delta: float, accountant: str, path: Path
) -> None:
    asked = (float(epsilon_budget), float(delta), accountant)
    if asked != (budget.epsilon_budget, budget.delta, budget.accountant):
        raise LedgerError(
            f"dataset {budget.name!r} is already registered in the privacy ledger at {path} "
            f"with ε budget {budget.epsilon_budget!r}, δ {budget.delta!r} and the "
            f"{budget.accountant.upper()} accountant (asked: ε budget {asked[0]!r}, δ "
            f"{asked[1]!r}, {accountant.upper()}); these are fixed for a dataset's whole "
            "history: use the registered values"
        )


def _check_release_labels(run_id: str, server_round: int, mechanism: str) -> None:
    if not isinstance(run_id, str) or not run_id:
        raise LedgerError(f"a release needs the non-empty id of its run (got {run_id!r})")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise LedgerError(f"a release's round must be an integer ≥ 0 (got {server_round!r})")
    if mechanism not in _MECHANISMS:
        raise LedgerError(
            f"unknown mechanism {mechanism!r} for a release; use one of {', '.join(_MECHANISMS)}"
        )


def _refuse_over_budget(row: sqlite3.Row, projected: float) -> None:
    """Raise (the caller's transaction then rolls back) if `projected` exceeds the budget."""
    budget = float(row["epsilon_budget"])
    if projected <= budget:  # also refuses NaN
        return
    raise BudgetExceededError(
        f"dataset {row['name']!r} would exceed its privacy budget: ε spent so far "
        f"{float(row['epsilon_spent']):.6g}, ε with this release {projected:.6g}, budget "
        f"ε={budget:.6g} at δ={float(row['delta']):g} ({str(row['accountant']).upper()} "
        "accountant). Nothing was recorded and the update must not be sent; skip this round "
        "or train with fewer steps or more noise"
    )


def _history_problem(budget: DatasetBudget, entries: list[LedgerEntry]) -> str | None:
    """The first bookkeeping inconsistency of a history, if any (cheap checks, no accounting)."""
    if [e.seq for e in entries] != list(range(1, len(entries) + 1)):
        return "its release sequence numbers are not 1..n (a release row was deleted or added)"
    if len(entries) != budget.releases:
        return (
            f"it holds {len(entries)} release rows but its composed state counts {budget.releases}"
        )
    for entry in entries:
        if entry.delta != budget.delta or entry.accountant != budget.accountant:
            return f"release {entry.seq} was accounted at another δ or with another accountant"
    for before, after in itertools.pairwise(entries):
        if after.epsilon < before.epsilon:
            return f"ε decreases from release {before.seq} to release {after.seq}"
    last = entries[-1].epsilon if entries else 0.0
    if not _close(last, budget.epsilon_spent):
        return f"its last release says ε={last!r} but the dataset says ε={budget.epsilon_spent!r}"
    return None


def _composed_rdp_problem(
    composed: object, entries: list[LedgerEntry], budget: DatasetBudget, path: Path
) -> str | None:
    """Does the stored RDP vector (what future releases build on) match the history?"""
    stored = RdpAccountant(_decode_vector(composed, budget.name, path))
    expected = RdpAccountant()  # curves computed afresh, not read from the file's cache
    for entry in entries:
        expected.compose(entry.release, entry.mechanism)
    if not np.allclose(stored.composed, expected.composed, rtol=VERIFY_REL_TOL, atol=0.0):
        return "its stored composed RDP vector does not match the sum over its releases"
    if not _close(stored.epsilon(budget.delta), budget.epsilon_spent):
        return "its stored composed RDP vector does not give the stored ε"
    return None
