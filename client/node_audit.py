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
"""

from __future__ import annotations

from pathlib import Path

from consortia.client.node_config import NodeConfig
from consortia.common.audit import AuditLog

AUDIT_FILENAME = "audit.jsonl"


def audit_path(state_dir: Path) -> Path:
    """Where a node with this state folder keeps its audit log."""
    return Path(state_dir) / AUDIT_FILENAME


def node_audit_log(node: NodeConfig) -> AuditLog:
    """The node's audit log, its entries' actor being the node's name."""
    return AuditLog(audit_path(node.state_dir), actor=node.name)
