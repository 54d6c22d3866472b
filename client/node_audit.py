"""A deployed node's audit log: `<state_dir>/audit.jsonl`, every entry signed by the node's name.

The privacy ledger says how much ε each dataset has spent; the audit log
says what the node did, in order, in a form an auditor can check for edits
(`consortia audit verify`, see `consortia.common.audit`). Four events:

- `data.registered`: `consortia node data add` registered a dataset
  (written by `DatasetRegistry.add`).
- `privacy.spend`: a DP release, written right after the ledger recorded it
  and before the update (label histogram, statistics answer) leaves
  (`LedgerAccount.record`).
- `node.refusal`: the node declined a message (`client/app.py`).
- `privacy.audited`: `consortia node audit` attacked a global model with the
  node's records (client/node_privacy_audit.py); nothing left the node.

Simulated nodes keep no audit log: they have no state folder and no operator.

Besides the anchor beside the log (`consortia.common.audit`), the node's
ledger witnesses the log's end: every release it records is followed by a
`privacy.spend` entry naming its `ledger_seq`, so the newest release of each
dataset must be in the log (`ledger_gaps`, run by `consortia audit verify`).
The ledger is another file of another format, so truncating the log and
rewriting its anchor is no longer enough to hide a spend; it is on the same
disk, so it is a second lock, not a witness off the machine.
"""

from __future__ import annotations

from pathlib import Path

from consortia.client.ledger import LedgerError, PrivacyLedger, ledger_path
from consortia.client.node_config import NodeConfig
from consortia.common.audit import AuditLog, iter_entries

AUDIT_FILENAME = "audit.jsonl"
SPEND_EVENT = "privacy.spend"


def audit_path(state_dir: Path) -> Path:
    """Where a node with this state folder keeps its audit log."""
    return Path(state_dir) / AUDIT_FILENAME


def node_audit_log(node: NodeConfig) -> AuditLog:
    """The node's audit log, its entries' actor being the node's name."""
    return AuditLog(audit_path(node.state_dir), actor=node.name)


def ledger_gaps(log: Path) -> list[str]:
    """Releases in the node ledger beside `log` whose `privacy.spend` entry the log lacks.

    Only the newest release of each dataset is asked for, and only if it was
    recorded after the log's first entry (a log started afresh after an
    edit does not hold older spends). Nothing to compare (not a node's log,
    no ledger, nothing recorded): no gaps. `log` must verify (`verify`).
    """
    ledger_file = ledger_path(Path(log).parent)
    if not ledger_file.is_file():
        return []
    entries = list(iter_entries(log))
    started = entries[0].time if entries else None
    logged = {
        (entry.details.get("dataset"), entry.details.get("ledger_seq"))
        for entry in entries
        if entry.event == SPEND_EVENT
    }
    gaps = []
    try:
        with PrivacyLedger(ledger_file) as ledger:
            for budget in ledger.datasets():
                history = ledger.history(budget.name)
                if not history or (started is not None and history[-1].recorded_at < started):
                    continue
                newest = history[-1]
                if (newest.dataset, newest.seq) not in logged:
                    gaps.append(
                        f"the ledger's newest release of {newest.dataset!r} (#{newest.seq}, "
                        f"{newest.recorded_at:%Y-%m-%d %H:%M:%S} UTC) has no {SPEND_EVENT} "
                        "entry: entries were removed from the log's end (or the node stopped "
                        "between the two writes, and the release never left)"
                    )
    except LedgerError as exc:
        gaps.append(f"the ledger beside the log cannot be compared with it: {exc.message}")
    return gaps
