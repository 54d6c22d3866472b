"""The node's privacy ledger: exact composition, budget refusal, durability, integrity."""

from __future__ import annotations

import itertools
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from consortia.client.ledger import (
    BudgetExceededError,
    DatasetBudget,
    LedgerCorruptError,
    LedgerEntry,
    LedgerError,
    LedgerIntegrityError,
    PrivacyLedger,
    UnknownDatasetError,
    ledger_path,
)
from consortia.common.errors import ConsortiaError, PrivacyError
from consortia.common.privacy import RDP_ORDERS, Release, epsilon, opacus_epsilon

DELTA = 1e-5
DATASET = "hospital-a"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return ledger_path(tmp_path / "node-state")


@pytest.fixture
def ledger(path: Path) -> Iterator[PrivacyLedger]:
    with PrivacyLedger(path) as opened:
        yield opened


def _release(sigma: float, q: float, steps: int) -> Release:
    return Release(noise_multiplier=sigma, sample_rate=q, steps=steps)


# ------------------------------------------------------------------ composition

JOB_A = [_release(1.1, 0.01, 50), _release(0.9, 0.02, 30), _release(1.1, 0.01, 50)] * 4
JOB_B = [_release(2.0, 0.1, 12), _release(1.5, 0.05, 0), _release(0.8, 0.04, 25)] * 4


def test_composition_spans_rounds_and_jobs_and_equals_opacus(path: Path) -> None:
    values: list[float] = []
    with PrivacyLedger(path) as ledger:
        ledger.register_dataset(DATASET, epsilon_budget=1_000.0, delta=DELTA)
        for server_round, release in enumerate(JOB_A, start=1):
            entry = ledger.record_release(
                DATASET, release, run_id="job-a", server_round=server_round
            )
            values.append(entry.epsilon)
        after_job_a = ledger.spent(DATASET)
    # A second job, in a fresh process's view of the ledger, continues the same spend.
    with PrivacyLedger(path) as ledger:
        assert ledger.spent(DATASET) == after_job_a
        for server_round, release in enumerate(JOB_B, start=1):
            entry = ledger.record_release(
                DATASET, release, run_id="job-b", server_round=server_round
            )
            values.append(entry.epsilon)
        history = ledger.history(DATASET)
        spent = ledger.spent(DATASET)
        ledger.verify(DATASET)

    assert values[len(JOB_A)] > after_job_a  # job B's first round adds to job A's ε
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert [e.run_id for e in history] == ["job-a"] * len(JOB_A) + ["job-b"] * len(JOB_B)
    releases = [entry.release for entry in history]
    assert releases == JOB_A + JOB_B
    # The stored composition is privacy.epsilon's sum, bit for bit, and Opacus' number.
    assert spent == epsilon(releases, DELTA) == values[-1]
    assert spent == pytest.approx(opacus_epsilon(releases, DELTA, "rdp"), rel=1e-9)


def test_projected_epsilon_predicts_without_writing(ledger: PrivacyLedger) -> None:
    ledger.register_dataset(DATASET, epsilon_budget=10.0, delta=DELTA)
    ledger.record_release(DATASET, _release(1.0, 0.02, 40), run_id="job", server_round=1)
    release = _release(1.3, 0.05, 20)
    projected = ledger.projected_epsilon(DATASET, release)
    assert len(ledger.history(DATASET)) == 1
    entry = ledger.record_release(DATASET, release, run_id="job", server_round=2)
    assert entry.epsilon == projected == ledger.spent(DATASET)


def test_prv_is_selectable_per_dataset_and_equals_opacus(ledger: PrivacyLedger) -> None:
    ledger.register_dataset("prv-data", epsilon_budget=50.0, delta=DELTA, accountant="prv")
    ledger.register_dataset("rdp-data", epsilon_budget=50.0, delta=DELTA)
    history = [_release(1.0, 0.02, 60), _release(1.5, 0.05, 40)]
    for server_round, release in enumerate(history, start=1):
        ledger.record_release("prv-data", release, run_id="job", server_round=server_round)
        ledger.record_release("rdp-data", release, run_id="job", server_round=server_round)
    prv = ledger.spent("prv-data")
    assert prv == opacus_epsilon(history, DELTA, "prv")
    assert prv < ledger.spent("rdp-data")
    assert ledger.verify("prv-data").recomputed_epsilon == prv
    assert ledger.budget("prv-data").accountant == "prv"
    # The accountant is fixed when the dataset is registered.
    with pytest.raises(LedgerError, match="fixed for a dataset's whole history"):
        ledger.register_dataset("prv-data", epsilon_budget=50.0, delta=DELTA, accountant="rdp")


def test_two_ledger_objects_on_one_file_compose_one_history(path: Path) -> None:
    with PrivacyLedger(path) as first, PrivacyLedger(path) as second:
        first.register_dataset(DATASET, epsilon_budget=100.0, delta=DELTA)
        for server_round in range(1, 7):
            writer = first if server_round % 2 else second
            release = _release(1.1, 0.01, server_round)
            writer.record_release(DATASET, release, run_id="job", server_round=server_round)
        assert first.verify(DATASET).releases == 6
        assert first.spent(DATASET) == second.spent(DATASET)


# ------------------------------------------------------------------ budget


def test_budget_refusal_writes_nothing(ledger: PrivacyLedger) -> None:
    ledger.register_dataset(DATASET, epsilon_budget=2.0, delta=DELTA)
    ledger.record_release(DATASET, _release(1.1, 0.01, 100), run_id="job", server_round=1)
    spent, rows = ledger.spent(DATASET), len(ledger.history(DATASET))
    too_much = _release(0.7, 0.1, 500)
    projected = ledger.projected_epsilon(DATASET, too_much)
    assert projected > 2.0

    with pytest.raises(BudgetExceededError) as refused:
        ledger.record_release(DATASET, too_much, run_id="job", server_round=2)

    assert isinstance(refused.value, PrivacyError)
    message = str(refused.value)
    assert DATASET in message
    assert f"{spent:.6g}" in message and f"{projected:.6g}" in message and "ε=2" in message
    assert ledger.spent(DATASET) == spent
    assert len(ledger.history(DATASET)) == rows
    assert ledger.verify(DATASET).releases == rows
    # The ledger is still usable: a release within budget is recorded.
    small = _release(1.1, 0.01, 10)
    assert ledger.record_release(DATASET, small, run_id="job", server_round=3).seq == rows + 1


def test_budget_is_fixed_at_registration_and_reregistering_is_a_no_op(
    ledger: PrivacyLedger,
) -> None:
    first = ledger.register_dataset(DATASET, epsilon_budget=4.0, delta=DELTA)
    assert ledger.register_dataset(DATASET, epsilon_budget=4.0, delta=DELTA) == first
    with pytest.raises(LedgerError, match=r"already registered.*ε budget 4\.0"):
        ledger.register_dataset(DATASET, epsilon_budget=8.0, delta=DELTA)
    with pytest.raises(LedgerError, match="already registered"):
        ledger.register_dataset(DATASET, epsilon_budget=4.0, delta=1e-6)
    assert ledger.datasets() == [first]
    assert isinstance(first, DatasetBudget)
    assert first.epsilon_remaining == 4.0


@pytest.mark.parametrize(
    ("budget", "delta", "accountant", "match"),
    [
        (0.0, DELTA, "rdp", "ε budget must be a positive finite number"),
        (float("inf"), DELTA, "rdp", "ε budget must be a positive finite number"),
        (1.0, 1.0, "rdp", "δ must lie strictly between 0 and 1"),
        (1.0, DELTA, "gdp", "unknown accountant 'gdp'"),
    ],
)
def test_invalid_registration_is_a_clear_error(
    ledger: PrivacyLedger, budget: float, delta: float, accountant: str, match: str
) -> None:
    with pytest.raises(PrivacyError, match=match):
        ledger.register_dataset(DATASET, budget, delta, accountant)  # type: ignore[arg-type]
    assert ledger.datasets() == []


def test_unknown_dataset_is_a_clear_error(ledger: PrivacyLedger) -> None:
    ledger.register_dataset(DATASET, epsilon_budget=1.0, delta=DELTA)
    with pytest.raises(UnknownDatasetError, match=r"'clinic-b' is not registered.*'hospital-a'"):
        ledger.record_release("clinic-b", _release(1.0, 0.1, 1), run_id="job", server_round=1)
    with pytest.raises(ConsortiaError, match="not registered"):
        ledger.spent("clinic-b")


def test_entries_are_models_with_labels(ledger: PrivacyLedger) -> None:
    ledger.register_dataset(DATASET, epsilon_budget=10.0, delta=DELTA)
    release = _release(2.0, 1.0, 1)
    ledger.record_release(DATASET, release, run_id="stats-7", server_round=0, mechanism="gaussian")
    (entry,) = ledger.history(DATASET)
    assert isinstance(entry, LedgerEntry)
    assert (entry.run_id, entry.server_round, entry.mechanism) == ("stats-7", 0, "gaussian")
    assert (entry.delta, entry.accountant, entry.release) == (DELTA, "rdp", release)
    assert entry.recorded_at.utcoffset() is not None
    with pytest.raises(LedgerError, match="unknown mechanism 'laplace'"):
        ledger.record_release(DATASET, release, run_id="x", server_round=1, mechanism="laplace")  # type: ignore[arg-type]


# ------------------------------------------------------------------ integrity


def _tamper(path: Path, sql: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(sql)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("UPDATE releases SET steps = steps - 1 WHERE seq = 2", "recomputed"),
        ("DELETE FROM releases WHERE seq = 3", "release rows"),
        ("DELETE FROM releases WHERE seq = 1", "sequence numbers"),
        ("UPDATE datasets SET epsilon_spent = epsilon_spent / 2", "last release says"),
        (
            f"UPDATE datasets SET composed_rdp = zeroblob({8 * len(RDP_ORDERS)})",
            "composed RDP vector",
        ),
        ("UPDATE releases SET noise_multiplier = 5.0 WHERE seq = 1", "recomputed"),
    ],
)
def test_verify_detects_a_tampered_ledger(path: Path, sql: str, match: str) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.register_dataset(DATASET, epsilon_budget=100.0, delta=DELTA)
        for server_round in range(1, 4):
            release = _release(1.1, 0.01, 20)
            ledger.record_release(DATASET, release, run_id="job", server_round=server_round)
        ledger.verify(DATASET)
    _tamper(path, sql)
    with PrivacyLedger(path) as ledger, pytest.raises(LedgerIntegrityError, match=match) as bad:
        ledger.verify(DATASET)
    assert str(path) in str(bad.value) and DATASET in str(bad.value)


def test_garbage_file_is_a_clear_error(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.register_dataset(DATASET, epsilon_budget=1.0, delta=DELTA)
    path.write_bytes(np.random.default_rng(0).bytes(8192))
    with pytest.raises(LedgerCorruptError) as corrupt:
        PrivacyLedger(path)
    message = str(corrupt.value)
    assert isinstance(corrupt.value, ConsortiaError)
    assert str(path) in message
    assert "damaged or not a SQLite database" in message and "restore it from a backup" in message


def test_damaged_pages_are_a_clear_error(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.register_dataset(DATASET, epsilon_budget=100.0, delta=DELTA)
        for server_round in range(1, 50):
            release = _release(1.1, 0.01, 1)
            ledger.record_release(DATASET, release, run_id="job", server_round=server_round)
    data = bytearray(path.read_bytes())
    data[4096:8192] = b"\xa5" * 4096  # the second page: a table's b-tree
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerCorruptError, match=str(path)), PrivacyLedger(path) as ledger:
        ledger.history(DATASET)


def test_another_sqlite_database_is_not_taken_for_a_ledger(path: Path) -> None:
    path.parent.mkdir(parents=True)
    _tamper(path, "CREATE TABLE notes (text TEXT)")
    with pytest.raises(LedgerCorruptError, match="not a consortia privacy ledger"):
        PrivacyLedger(path)


# ------------------------------------------------------------------ durability

_RECORDING_CHILD = """
import sys
from pathlib import Path
from consortia.client.ledger import PrivacyLedger
from consortia.common.privacy import Release

pairs = [(1.1, 0.01), (0.9, 0.02), (2.0, 0.05)]
with PrivacyLedger(Path(sys.argv[1])) as ledger:
    for server_round in range(1, 10**9):
        sigma, q = pairs[server_round % len(pairs)]
        release = Release(noise_multiplier=sigma, sample_rate=q, steps=1 + server_round % 7)
        entry = ledger.record_release(
            "hospital-a", release, run_id=sys.argv[2], server_round=server_round
        )
        print(entry.seq, flush=True)
"""

_CRASHING_CHILD = """
import os, signal, sys
from pathlib import Path
import consortia.client.ledger as ledger_module
from consortia.common.privacy import Release

def crash(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

# Die after the release row is inserted, before the composed state is updated.
ledger_module._store_composition = crash
with ledger_module.PrivacyLedger(Path(sys.argv[1])) as ledger:
    release = Release(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    ledger.record_release("hospital-a", release, run_id="job-crash", server_round=1)
print("survived", flush=True)
"""


def _check_consistent(path: Path) -> int:
    """Open after a crash: Opacus agrees with the stored ε; returns the number of releases."""
    with PrivacyLedger(path) as ledger:
        report = ledger.verify(DATASET)
        history = ledger.history(DATASET)
        assert ledger.spent(DATASET) == epsilon([e.release for e in history], DELTA)
    assert report.releases == len(history)
    return len(history)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_never_under_counts(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.register_dataset(DATASET, epsilon_budget=1e9, delta=DELTA)
    chance = random.Random(20240611)
    for attempt in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _RECORDING_CHILD, str(path), f"job-{attempt}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = child.stdout.readline() if child.stdout else ""
        time.sleep(chance.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        rest, stderr = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, f"the child failed early:\n{stderr}"
        # Only whole lines: a line cut by the kill was never a report of a commit.
        lines = (first + rest).splitlines(keepends=True)
        committed = [int(line) for line in lines if line.endswith("\n")]
        assert committed, f"the child never committed a release:\n{stderr}"
        rows = _check_consistent(path)
        # Every release reported as committed is there; at most the one in flight is extra.
        assert committed[-1] <= rows <= committed[-1] + 1


@pytest.mark.slow
def test_sigkill_inside_the_transaction_records_nothing(path: Path) -> None:
    with PrivacyLedger(path) as ledger:
        ledger.register_dataset(DATASET, epsilon_budget=100.0, delta=DELTA)
        for server_round in (1, 2):
            release = _release(1.1, 0.01, 30)
            ledger.record_release(DATASET, release, run_id="job", server_round=server_round)
        spent = ledger.spent(DATASET)
    child = subprocess.run(
        [sys.executable, "-c", _CRASHING_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "survived" not in child.stdout
    assert _check_consistent(path) == 2
    with PrivacyLedger(path) as ledger:
        assert ledger.spent(DATASET) == spent


def test_step_curves_are_cached_in_the_file_and_checked_by_verify(path: Path) -> None:
    """A new process (here: a new connection) reuses the stored curve; a forged one is caught."""
    release = _release(1.1, 0.37, 3)
    with PrivacyLedger(path) as ledger:
        ledger.register_dataset(DATASET, epsilon_budget=100.0, delta=DELTA)
        ledger.record_release(DATASET, release, run_id="job", server_round=1)
    with sqlite3.connect(path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM step_curves").fetchone()
        assert count == 1
        # Forge the cache: a curve of zeros would make every later step free.
        conn.execute("UPDATE step_curves SET curve = ?", (bytes(8 * len(RDP_ORDERS)),))
    with PrivacyLedger(path) as ledger:
        ledger.record_release(DATASET, release, run_id="job", server_round=2)
        with pytest.raises(LedgerIntegrityError, match="recomputed"):
            ledger.verify(DATASET)
