"""A node killed (SIGKILL) in the middle of local training, then restarted: its ledger holds.

Real processes on 127.0.0.1, no mocks: a flower-superlink, one SuperNode
started with `consortia node start`, `flwr run` of a two-round job.

The moment hit: round 1 of the job has been recorded in the node's ledger
(so its history is not empty), and the ClientApp process of round 2 (a
`flwr-clientapp` started by the node) has logged that the round was
admitted, which it does right before local training. Round 2's training
runs for seconds (many local epochs), so the SIGKILL to the node's whole
process group lands inside training, before round 2's release is recorded.

A deployed node records each release durably *before* its update leaves
(`PrivacyLedger.record_release`, committed with synchronous=FULL): a kill
between that commit and the reply leaves a release in the ledger whose
update the coordinator never received. That over-counts the spend, which is
allowed; the ledger must never under-count (hold less than what left the
node). So after the kill the ledger holds round 1's release, and possibly
round 2's, never a partial row.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from federation import Federation, add_site, descendants, kill_tree, write_job
from sklearn.datasets import load_breast_cancer

from consortia.client.ledger import LedgerEntry, PrivacyLedger, ledger_path
from consortia.common.privacy import opacus_epsilon

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds processes in /proc"),
]

NODE = "st-mary"
DATASET = "cancer"
BUDGET = 5.0
DELTA = 1e-5
# Long enough local rounds that the kill lands inside training (a few seconds on one core).
CRASH_EPOCHS = 100
KILL_DELAY_S = 1.0

T = TypeVar("T")


def _wait_for(what: str, probe: Callable[[], T | None], timeout: float, fed: Federation) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.05)
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}"
        for log in sorted(fed.root.glob("*.log"))
    )
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _release_count(ledger_file: Path) -> int:
    """Rows in the ledger's release table, read-only (0 before the node created its ledger)."""
    if not ledger_file.exists():
        return 0
    conn = sqlite3.connect(f"file:{ledger_file}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM releases").fetchone()[0])
    except sqlite3.OperationalError:  # its schema is being created
        return 0
    finally:
        conn.close()


def _alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead


def _online_node_ids(fed: Federation) -> list[str]:
    listed = fed.flwr("supernode", "list", "test", "--format", "json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    nodes = json.loads(listed.stdout)["nodes"]
    return [str(n["node-id"]) for n in nodes if n["status"] == "online"]


def _check_ledger_file(ledger_file: Path) -> list[LedgerEntry]:
    """SQLite integrity, complete release rows, stored ε equal to Opacus' recomputation."""
    conn = sqlite3.connect(ledger_file, timeout=30)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        columns = [row[1] for row in conn.execute("PRAGMA table_info(releases)")]
        rows = conn.execute("SELECT * FROM releases ORDER BY seq").fetchall()
        (counted,) = conn.execute(
            "SELECT releases FROM datasets WHERE name = ?", (DATASET,)
        ).fetchone()
    finally:
        conn.close()
    assert counted == len(rows)
    for row in rows:
        assert all(value is not None for value in row), dict(zip(columns, row, strict=True))
    with PrivacyLedger(ledger_file) as ledger:
        verification = ledger.verify(DATASET)
        entries = ledger.history(DATASET)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert all(e.steps > 0 and e.noise_multiplier > 0 and 0 < e.sample_rate <= 1 for e in entries)
    assert verification.releases == len(entries)
    assert verification.stored_epsilon == pytest.approx(verification.recomputed_epsilon, rel=1e-9)
    return entries


def test_sigkill_during_training_then_restart_keeps_the_ledger_consistent(
    tmp_path: Path,
) -> None:
    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    fed = Federation(tmp_path)
    node_toml = add_site(
        tmp_path / NODE,
        NODE,
        data.data,
        data.target,
        names,
        superlink_port=fed.port,
        budget=BUDGET,
        policy=f"max_local_epochs = {CRASH_EPOCHS}\n",
    )
    ledger_file = ledger_path(node_toml.parent / "state")
    crash_job = write_job(
        tmp_path / "crash.toml",
        1.0,
        name="crash",
        min_nodes=1,
        rounds=2,
        evaluation="none",
        model="mlp",
        local_epochs=CRASH_EPOCHS,
        batch_size=16,
        learning_rate=0.1,
    )
    follow_up = write_job(
        tmp_path / "follow-up.toml",
        0.5,
        name="follow-up",
        min_nodes=1,
        rounds=1,
        evaluation="none",
        model="mlp",
        batch_size=16,
        learning_rate=0.1,
    )
    try:
        fed.start_superlink()
        node = fed.start_node(node_toml, "node")
        runner = fed.start_job(crash_job, tmp_path / "runs-crash", "crash-run.log")

        # Round 1 recorded; round 1's ClientApp may still be replying.
        _wait_for("round 1's release", lambda: _release_count(ledger_file) or None, 180, fed)
        node_log = fed.root / "node.log"

        def round_two_in_training() -> bool | None:
            return "round 2: admitted" in node_log.read_text(errors="replace") or None

        _wait_for("round 2's ClientApp to be admitted", round_two_in_training, 120, fed)
        time.sleep(KILL_DELAY_S)  # past admission, well inside seconds of local training
        tree = {node.pid, *descendants([node.pid])}  # SuperNode, SuperExec, ClientApp
        assert len(tree) >= 3
        kill_tree(node)
        # SIGKILL is delivered asynchronously: on a loaded machine a child may take a
        # moment to be gone. None may survive it.
        deadline = time.monotonic() + 10
        while [pid for pid in tree if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in tree if _alive(pid)]

        after_kill = _check_ledger_file(ledger_file)
        run_id = after_kill[0].run_id
        assert [(e.run_id, e.server_round) for e in after_kill] == [
            (run_id, r) for r in range(1, len(after_kill) + 1)
        ]
        # Round 2 was not recorded (killed in training) or was (killed after its
        # commit, before its reply left): over-counting is allowed, a torn row is not.
        assert len(after_kill) in (1, 2)

        # The coordinator's side: stop the crash run, which waits for the dead
        # node, and drop the dead SuperNode (else it counts as online until its
        # heartbeats are missed, ~a minute). A restarted node gets a new node id.
        dead = _online_node_ids(fed)
        assert len(dead) == 1, dead
        fed.start_node(node_toml, "node")  # the same node.toml, state folder and ledger
        for args in (("stop", run_id), ("supernode", "unregister", dead[0])):
            done = fed.flwr(*args, "test")
            output = done.stdout + done.stderr
            # The crash run may have ended on its own (its round timed out waiting for the
            # dead node) between the kill and the stop: that is the state `stop` wants.
            ended = args[0] == "stop" and "Run is already finished" in output
            assert done.returncode == 0 or ended, output
        kill_tree(runner)

        out = tmp_path / "runs-follow-up"
        result = fed.run_job(follow_up, out, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        entries = _check_ledger_file(ledger_file)
        assert entries[: len(after_kill)] == after_kill  # the history is only appended to
        (new,) = entries[len(after_kill) :]
        assert new.run_id != run_id and new.server_round == 1
        composed = opacus_epsilon([e.release for e in entries], DELTA, "rdp")
        assert new.epsilon == pytest.approx(composed, rel=1e-9)
        with PrivacyLedger(ledger_file) as ledger:
            assert ledger.spent(DATASET) == pytest.approx(composed, rel=1e-9)
        (run_dir,) = out.iterdir()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["final"]["epsilon"][NODE] == pytest.approx(composed, rel=1e-9)
    finally:
        fed.stop()
