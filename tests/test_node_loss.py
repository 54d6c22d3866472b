"""A node killed mid-round and restarted at once: the run goes on, the node waits and rejoins.

Real processes on 127.0.0.1, no mocks: `consortia coordinator start` (TLS,
node authentication), three `consortia node start` nodes, `consortia job
submit`. While round 1 trains, one node's whole process tree is killed with
SIGKILL, so it neither replies nor signs off from the SuperLink, and the
node is started again at once from the same node.toml and state folder.

- The run: the SuperLink answers the dead node's round-1 message itself once
  the node's heartbeats lapse (two heartbeat intervals: the nodes declare
  `HEARTBEAT_S`, so 30 s instead of Flower's minute), with its own node id. That
  is the node's failure in that round (`no-reply`), never an unknown sender
  that ends the run; the run completes.
- The restarted node: within Flower's heartbeat window its activation is
  refused (HTTP 412). It must not give up: it says why in one line, retries
  until the old session lapses, and joins. Neither the coordinator's audit
  log nor the node's calls that an authentication failure or a refused key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from consortium import Consortium, cancer_sites, run_id_of, start_consortium
from federation import descendants, kill_tree, write_job

from consortia.common.audit import verify

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds processes in /proc"),
]

NODES = ("st-mary", "riverside", "northgate")
VICTIM = "riverside"
# Long enough local rounds that the kill lands inside round 1's training.
EPOCHS = 100
KILL_DELAY_S = 1.0
# node.toml [superlink] heartbeat_interval_s: the old session lapses 30 s after its last
# heartbeat, long enough that the restarted node is refused at first (what is tested).
HEARTBEAT_S = 15


def _wait_for(what: str, probe: Callable[[], bool], timeout: float, fed: Consortium) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.2)
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}"
        for log in sorted(fed.root.glob("*.log"))
    )
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _alive(pid: int) -> bool:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead


def _connections(fed: Consortium, node: str) -> int:
    return sum(
        e["event"] == "node.connected" and e["details"]["node"] == node for e in fed.audit_events()
    )


def test_a_node_killed_mid_round_fails_its_round_and_rejoins_when_restarted(
    tmp_path: Path,
) -> None:
    fed = Consortium(tmp_path)
    node_tomls = cancer_sites(
        fed, NODES, 5.0, seed=2, policies={n: f"max_local_epochs = {EPOCHS}\n" for n in NODES}
    )
    job = write_job(
        tmp_path / "job.toml",
        1.0,
        name="loss",
        rounds=2,
        evaluation="none",
        model="mlp",
        local_epochs=EPOCHS,
        batch_size=16,
        learning_rate=0.1,
        round_timeout_s=240,  # only a safety net: the SuperLink's word comes after ~30 s
    )
    for node_toml in node_tomls.values():  # [superlink] is node.toml's last table
        node_toml.write_text(node_toml.read_text() + f"heartbeat_interval_s = {HEARTBEAT_S}\n")
    try:
        start_consortium(fed, node_tomls)
        victim = fed.processes[1 + NODES.index(VICTIM)]  # after the coordinator
        submitted = fed.consortia("job", "submit", str(job), "--config", str(fed.config))
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_id = run_id_of(submitted)
        victim_log = tmp_path / f"{VICTIM}.log"
        _wait_for(
            "round 1 to be admitted by the node to kill",
            lambda: f"run {run_id} round 1: admitted" in victim_log.read_text(errors="replace"),
            300,
            fed,
        )
        time.sleep(KILL_DELAY_S)  # inside seconds of local training
        assert _connections(fed, VICTIM) == 1
        tree = {victim.pid, *descendants([victim.pid])}  # service, SuperNode, worker
        kill_tree(victim)
        _wait_for("the killed node's processes to end", lambda: not any(map(_alive, tree)), 30, fed)
        restarted = fed.start_node(node_tomls[VICTIM], f"{VICTIM}-restarted")
        restarted_log = tmp_path / f"{VICTIM}-restarted.log"

        def finished() -> bool:
            status = fed.consortia("job", "status", str(run_id), "--config", str(fed.config))
            return "finished" in status.stdout

        _wait_for("the run to finish", finished, 600, fed)
        status = fed.consortia("job", "status", str(run_id), "--config", str(fed.config))
        assert "finished (completed)" in status.stdout, status.stdout + status.stderr

        metrics = json.loads((fed.state / "runs" / f"run-{run_id}" / "metrics.json").read_text())
        assert [r["round"] for r in metrics["rounds"]] == [1, 2]
        first = metrics["rounds"][0]
        assert sorted(first["participants"]) == sorted(set(NODES) - {VICTIM})
        (failure,) = first["failures"]
        assert (failure["node"], failure["kind"]) == (VICTIM, "no-reply"), failure

        # The restarted node waited, said why, and joined with the same key.
        _wait_for("the restarted node to join", lambda: _connections(fed, VICTIM) == 2, 180, fed)
        assert restarted.poll() is None, restarted_log.read_text(errors="replace")
        text = " ".join(restarted_log.read_text(errors="replace").split())
        assert text.count("its previous session (node id") == 1, text[-3000:]
        assert "still counts as active" in text

        coordinator_events = fed.audit_events()
        assert verify(fed.audit_log).ok
        of_victim = [e for e in coordinator_events if e["details"].get("node") == VICTIM]
        assert "node.connection_deferred" in [e["event"] for e in of_victim]
        assert not [e for e in of_victim if e["event"] == "node.connection_refused"], of_victim
        node_audit = node_tomls[VICTIM].parent / "state" / "audit.jsonl"
        assert verify(node_audit).ok
        node_events = [e["event"] for e in fed.audit_events(node_audit)]
        assert "node.connection_deferred" in node_events
        assert "node.connection_refused" not in node_events
    finally:
        fed.stop()
