"""`consortia node audit MODEL`: a deployed node attacks a global model with its own records.

Only a node knows which of its records a model's training saw: its train
split (members) and its held-out test split (non-members: no job trains on
it). So the membership audit of a deployed job runs on each node, on the
model file the consortium shares (a run's `model/round-NNN.safetensors`),
built from the job's own `[model]`. The attacks are the simulation lab's
(client/membership_attack.py). The claim they are set against is the
dataset's ε in the node's ledger: everything ever released from it, of
which the model is a post-processing. Nothing leaves the node: the result
is written to `<state_dir>/privacy-audits/` and recorded in its audit log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.numpy import load

from consortia.client.admission import served_dataset
from consortia.client.ledger import PrivacyLedger, ledger_path
from consortia.client.membership_attack import ShadowRecipe, balanced, standard_attacks
from consortia.client.node_audit import node_audit_log
from consortia.client.node_config import NodeConfig
from consortia.client.onboarding.registry import DatasetRegistry
from consortia.common.atomic import write_bytes_atomic
from consortia.common.config import JobConfig
from consortia.common.errors import ConsortiaError, DataError
from consortia.common.membership import PrivacyAudit
from consortia.common.models import build_model

AUDITS_DIR = "privacy-audits"


class NodePrivacyAudit(BaseModel):
    """One audit on one node: which model, which dataset, when, and what the attacks proved."""

    node: str
    dataset: str
    job: str
    model_file: str
    model_sha256: str
    audited_utc: str
    audit: PrivacyAudit


def audit_on_node(
    node: NodeConfig, job: JobConfig, model_file: Path, shadows: int, seed: int = 0
) -> tuple[NodePrivacyAudit, Path]:
    """Attack the model in `model_file` with the node's records of the job's dataset.

    Returns the result and the file it was written to.
    """
    dataset = served_dataset(job, node)
    data = DatasetRegistry(node.state_dir).load(dataset)
    raw = _read_model_file(model_file)
    model = build_model(job.model, data.feature_shape, data.num_classes, job.seed)
    state = {key: torch.from_numpy(np.array(array)) for key, array in raw.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConsortiaError(
            f"{model_file}: does not fit the job's model ({job.model.name}) on dataset "
            f"'{dataset}' ({first}); pass the job file the model was trained with"
        ) from None
    rng = np.random.default_rng(seed)
    members, non_members = balanced(data.train, data.test, rng, f"dataset '{dataset}' (test split)")
    recipe = ShadowRecipe(job, data.feature_shape, data.num_classes)
    delta = node.policy.delta
    attacks = standard_attacks(model, members, non_members, recipe, shadows, delta, rng)
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    result = NodePrivacyAudit(
        node=node.name,
        dataset=dataset,
        job=job.name,
        model_file=str(model_file),
        model_sha256=digest,
        audited_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        audit=PrivacyAudit(
            run=model_file.name,
            round=_round_of(model_file),
            claimed_epsilon=_dataset_epsilon(node, dataset),
            delta=delta,
            shadows=shadows,
            attacks=attacks,
        ),
    )
    path = node.state_dir / AUDITS_DIR / f"{dataset}-{digest[:16]}.json"
    write_bytes_atomic(path, result.model_dump_json(indent=2).encode("utf-8"))
    node_audit_log(node).append(
        "privacy.audited",
        dataset=dataset,
        job=job.name,
        model_sha256=digest,
        claimed_epsilon=result.audit.claimed_epsilon,
        attacks={
            a.attack: {"auc": a.auc, "epsilon_lower_bound": a.epsilon_lower_bound} for a in attacks
        },
        file=str(path),
    )
    return result, path


def _read_model_file(path: Path) -> dict[str, np.ndarray]:
    try:
        arrays = load(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: no such model file") from None
    except (OSError, SafetensorError) as exc:
        raise DataError(
            f"{path}: not a safetensors model file ({exc}); pass a run's "
            "model/round-NNN.safetensors"
        ) from None
    if not arrays:
        raise DataError(f"{path}: the model file holds no arrays")
    return arrays


def _dataset_epsilon(node: NodeConfig, dataset: str) -> float:
    """The dataset's ε so far in the node's ledger (0 if it never released anything)."""
    with PrivacyLedger(ledger_path(node.state_dir)) as ledger:
        if dataset not in [budget.name for budget in ledger.datasets()]:
            return 0.0
        return ledger.spent(dataset)


def _round_of(model_file: Path) -> int:
    """The round in a run's model file name (`round-007.safetensors`), else 0."""
    found = re.fullmatch(r"round-(\d+)\.safetensors", model_file.name)
    return int(found.group(1)) if found else 0
