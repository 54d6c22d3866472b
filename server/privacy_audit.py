"""`consortia audit privacy RUN`: membership-inference attacks on a simulation run's model.

The lab knows what a real coordinator never does: which records each node
trained on (its train split) and which it held out (its test split), both
regenerated exactly from the run's manifest (scenario, seed, partition).
Members are the nodes' training records, non-members their held-out ones,
balanced and pooled over the nodes. Two attacks score every record:

* **loss threshold** (Yeom et al. 2018): a member has a lower loss; score =
  minus the record's cross-entropy under the audited model.
* **likelihood ratio with shadow models** (LiRA, Carlini et al. 2022):
  `shadows` models of the run's architecture are trained centrally, each on
  a random half of the audit pool, with the run's optimiser and learning
  rate and without DP (the attacker's best guess of a model that saw, or
  did not see, each record). For each record, the logit-scaled confidence
  of its true class under the shadows that trained on it and those that did
  not gives two Gaussians; the score is the log-likelihood ratio of the
  audited model's confidence under them (variances pooled over records, as
  the paper recommends for few shadows).
* **canaries**, where the scenario plants them (`[simulation.canaries]`):
  crafted records only memorisation can fit, each trained on by a coin
  flip; the loss threshold tells the trained from the untrained ones. This
  is the DP game played once per canary, the audit's rigorous form.

Each attack's figures (common/membership.py, written to privacy-audit.json
and shown in the run's report.html): AUC, TPR at 0.1% and 1% FPR,
and the ε lower bound it proves at 95% confidence, beside the largest ε a
node claimed at the audited round. A per-record attack on a federated model
is a heuristic audit: the bound treats every record as an independent trial
of the DP game, which is how published audits of trained models read it;
see docs/privacy-audit.md for what it can and cannot show.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from consortia.client.training import train_locally
from consortia.common.arrays import LabeledArrays, concat
from consortia.common.atomic import write_bytes_atomic
from consortia.common.config import ScenarioConfig
from consortia.common.errors import ConsortiaError
from consortia.common.membership import (
    AUDIT_FILE,
    AttackFigures,
    PrivacyAudit,
    audited_epsilon,
    roc_auc,
    tpr_at_fpr,
)
from consortia.common.models import build_model
from consortia.common.simulated_data import Canaries, canaries_of, simulated_node_data
from consortia.server.model_registry import load_model
from consortia.server.run_outputs import rewrite_report

CONFIDENCE = 0.95
_MAX_PER_SIDE = 5_000  # records per side: enough for 0.1% FPR, cheap to score
_SHADOW_MAX_EPOCHS = 30


def audit_run(run_dir: Path, server_round: int | None, shadows: int, seed: int = 0) -> PrivacyAudit:
    """Attack the model of `server_round` (default: the newest); write and return the result."""
    loaded = load_model(run_dir, server_round)
    doc, config, model = loaded.checkpoint.doc, loaded.config, loaded.model
    if not isinstance(config, ScenarioConfig):
        raise ConsortiaError(
            f"{run_dir}: a deployed job's run; `audit privacy` needs the nodes' records, which "
            "only a simulation run can regenerate"
        )
    rng = np.random.default_rng(seed)
    planted = canaries_of(config.simulation, config.seed)
    members, non_members = _audit_records(config, planted, rng)
    target = np.concatenate([_confidence(model, members), _confidence(model, non_members)])
    losses = -np.concatenate([_losses(model, members), _losses(model, non_members)])
    lira = _lira_scores(
        config, doc.feature_shape, doc.num_classes, members, non_members, target, shadows, rng
    )
    delta = config.privacy.delta
    attacks = [
        _figures("loss threshold", losses, len(members), delta, rng),
        _figures(f"LiRA ({shadows} shadow models)", lira, len(members), delta, rng),
    ]
    if planted is not None:
        # Each canary was trained on by a coin flip: the DP game itself, once per canary.
        scores = -_losses(model, planted.records)
        inside = planted.inside
        ordered = np.concatenate([scores[inside], scores[~inside]])
        name = f"canaries ({len(scores)}, loss threshold)"
        attacks.append(_figures(name, ordered, int(inside.sum()), delta, rng))
    audit = PrivacyAudit(
        run=run_dir.name,
        round=doc.round,
        claimed_epsilon=max(doc.epsilon.values(), default=0.0) if config.privacy.enabled else None,
        delta=delta,
        shadows=shadows,
        attacks=attacks,
    )
    write_bytes_atomic(run_dir / AUDIT_FILE, audit.model_dump_json(indent=2).encode("utf-8"))
    rewrite_report(run_dir)  # report.html gains its audit section
    return audit


def _audit_records(
    config: ScenarioConfig, planted: Canaries | None, rng: np.random.Generator
) -> tuple[LabeledArrays, LabeledArrays]:
    """Every node's train split (members) and test split (non-members), balanced.

    The canary node's planted canaries (appended last) are left out: they
    have an attack of their own.
    """
    sim = config.simulation
    canary_node = sim.canaries.node - 1 if sim.canaries is not None else None
    trains, tests = [], []
    for partition in range(sim.nodes):
        data = simulated_node_data(sim, config.seed, partition)
        train = data.train
        if planted is not None and partition == canary_node:
            train = train.subset(np.arange(len(train) - int(planted.inside.sum())))
        trains.append(train)
        tests.append(data.test)
    members, non_members = concat(trains), concat(tests)
    per_side = min(len(members), len(non_members), _MAX_PER_SIDE)
    if per_side < 20:
        raise ConsortiaError(
            f"the run's nodes hold {len(non_members)} held-out records in all; a membership "
            "audit needs at least 20 (raise simulation.data.test_fraction)"
        )
    return _sample(members, per_side, rng), _sample(non_members, per_side, rng)


def _sample(data: LabeledArrays, size: int, rng: np.random.Generator) -> LabeledArrays:
    return data.subset(rng.choice(len(data), size=size, replace=False))


@torch.no_grad()
def _logits(model: nn.Module, data: LabeledArrays) -> torch.Tensor:
    model.eval()
    return model(torch.as_tensor(data.x))


def _losses(model: nn.Module, data: LabeledArrays) -> np.ndarray:
    labels = torch.as_tensor(data.y, dtype=torch.long)
    return functional.cross_entropy(_logits(model, data), labels, reduction="none").numpy()


def _confidence(model: nn.Module, data: LabeledArrays) -> np.ndarray:
    """log(p / (1 - p)) of the true class: LiRA's statistic, close to Gaussian per record."""
    logits = _logits(model, data).double()
    labels = torch.as_tensor(data.y, dtype=torch.long)
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.clone()
    others.scatter_(1, labels[:, None], -math.inf)
    # log p - log(1 - p) = true logit - logsumexp(other logits), computed stably.
    return (true - torch.logsumexp(others, dim=1)).numpy()


def _lira_scores(
    config: ScenarioConfig,
    feature_shape: tuple[int, ...],
    num_classes: int,
    members: LabeledArrays,
    non_members: LabeledArrays,
    target: np.ndarray,
    shadows: int,
    rng: np.random.Generator,
) -> np.ndarray:
    pool = concat([members, non_members])
    inside = rng.random((shadows, len(pool))) < 0.5
    confidences = np.empty((shadows, len(pool)))
    training = config.training.model_copy(
        update={
            "local_epochs": min(config.rounds * config.training.local_epochs, _SHADOW_MAX_EPOCHS)
        }
    )
    for k in range(shadows):
        shadow = build_model(config.model, feature_shape, num_classes, config.seed + 1 + k)
        subset = pool.subset(np.flatnonzero(inside[k]))
        train_locally(
            shadow, subset, training, None, seed=config.seed + 1 + k, device=torch.device("cpu")
        )
        confidences[k] = _confidence(shadow, pool)
    return _likelihood_ratio(confidences, inside, target)


def _likelihood_ratio(
    confidences: np.ndarray, inside: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """log N(target; μ_in, σ_in) − log N(target; μ_out, σ_out), per record.

    A record no shadow trained on (or every shadow did) has no IN (OUT)
    mean; it falls back to the mean over all records' IN (OUT) offsets.
    """
    in_count, out_count = inside.sum(0), (~inside).sum(0)
    in_mean = np.where(
        in_count > 0, (confidences * inside).sum(0) / np.maximum(in_count, 1), np.nan
    )
    out_mean = np.where(
        out_count > 0, (confidences * ~inside).sum(0) / np.maximum(out_count, 1), np.nan
    )
    gap = np.nanmean(in_mean - out_mean)
    in_mean = np.where(np.isnan(in_mean), out_mean + gap, in_mean)
    out_mean = np.where(np.isnan(out_mean), in_mean - gap, out_mean)
    in_std = max(float(np.nanstd(np.where(inside, confidences - in_mean, np.nan))), 1e-6)
    out_std = max(float(np.nanstd(np.where(~inside, confidences - out_mean, np.nan))), 1e-6)
    return _log_normal(target, in_mean, in_std) - _log_normal(target, out_mean, out_std)


def _log_normal(x: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std)


def _figures(
    attack: str, scores: np.ndarray, members: int, delta: float, rng: np.random.Generator
) -> AttackFigures:
    """Figures of `scores`, the first `members` of which belong to members."""
    member_scores, non_member_scores = scores[:members], scores[members:]
    return AttackFigures(
        attack=attack,
        members=members,
        non_members=len(non_member_scores),
        auc=roc_auc(member_scores, non_member_scores),
        tpr_at_fpr_0_1pct=tpr_at_fpr(member_scores, non_member_scores, 0.001),
        tpr_at_fpr_1pct=tpr_at_fpr(member_scores, non_member_scores, 0.01),
        epsilon_lower_bound=audited_epsilon(
            member_scores, non_member_scores, delta, rng, CONFIDENCE
        ),
        confidence=CONFIDENCE,
    )
