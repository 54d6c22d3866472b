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
    """One audit on one node: which model, which dataset, when, and what the attacks proved.

    `registration_fingerprint` and `registered_at` say which split was used:
    members and non-members are the split of the dataset as registered now.
    """

    node: str
    dataset: str
    job: str
    model_file: str
    model_sha256: str
    audited_utc: str
    registration_fingerprint: str
    registered_at: str
    warnings: list[str]
    audit: PrivacyAudit


def audit_on_node(
    node: NodeConfig, job: JobConfig, model_file: Path, shadows: int, seed: int = 0
) -> tuple[NodePrivacyAudit, Path]:
    """Attack the model in `model_file` with the node's records of the job's dataset.

    Returns the result and the file it was written to.
    """
    dataset = served_dataset(job, node)
    registry = DatasetRegistry(node.state_dir)
    registration = registry.get(dataset)
    data = registry.load(dataset)
    content = _read_bytes(model_file)
    raw = _model_arrays(content, model_file)
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
    hint = f"dataset '{dataset}' of this node; a model trained on fewer cannot be audited here"
    members, non_members = balanced(data.train, data.test, rng, hint)
    recipe = ShadowRecipe(job, data.feature_shape, data.num_classes)
    claimed, delta, first_release = _dataset_epsilon(node, dataset)
    attacks = standard_attacks(model, members, non_members, recipe, shadows, delta, rng)
    digest = hashlib.sha256(content).hexdigest()  # of the bytes audited
    warnings = []
    if first_release is not None and registration.registered_at > first_release:
        warnings.append(
            f"dataset '{dataset}' was registered again ({registration.registered_at:%Y-%m-%d}) "
            f"after its first release ({first_release:%Y-%m-%d}): if its split changed, some "
            "records the model trained on now count as non-members and the attacks understate"
        )
    result = NodePrivacyAudit(
        node=node.name,
        dataset=dataset,
        job=job.name,
        model_file=str(model_file),
        model_sha256=digest,
        audited_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        registration_fingerprint=registration.fingerprint,
        registered_at=registration.registered_at.isoformat(timespec="seconds"),
        warnings=warnings,
        audit=PrivacyAudit(
            run=model_file.name,
            round=_round_of(model_file),
            claimed_epsilon=claimed,
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


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such model file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _model_arrays(content: bytes, path: Path) -> dict[str, np.ndarray]:
    try:
        arrays = load(content)
    except SafetensorError as exc:
        raise DataError(
            f"{path}: not a safetensors model file ({exc}); pass a run's "
            "model/round-NNN.safetensors"
        ) from None
    if not arrays:
        raise DataError(f"{path}: the model file holds no arrays")
    return arrays


def _dataset_epsilon(node: NodeConfig, dataset: str) -> tuple[float, float, dt.datetime | None]:
    """(ε so far, the δ it is stated at, the first release's time) from the node's ledger.

    A dataset that never released anything: ε 0 at the policy's δ (no ledger is created).
    """
    path = ledger_path(node.state_dir)
    if not path.is_file():
        return 0.0, node.policy.delta, None
    with PrivacyLedger(path) as ledger:
        budget = next((b for b in ledger.datasets() if b.name == dataset), None)
        if budget is None:
            return 0.0, node.policy.delta, None
        history = ledger.history(dataset)
        first = history[0].recorded_at if history else None
        return ledger.spent(dataset), budget.delta, first


def _round_of(model_file: Path) -> int:
    """The round in a run's model file name (`round-007.safetensors`), else 0."""
    found = re.fullmatch(r"round-(\d+)\.safetensors", model_file.name)
    return int(found.group(1)) if found else 0
