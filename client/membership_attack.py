"""Membership-inference attacks on a trained model, run by whoever holds the records.

Members are records the model's training saw, non-members records it did
not; each attack scores every record, and common/membership.py turns the
scores into AUC, TPR at low FPR and the ε lower bound they prove. Used by
the simulation lab's `consortia audit privacy` (simulations/privacy_audit.py)
and by a deployed node's `consortia node audit` (client/node_privacy_audit.py),
which attacks a global model with its own train and test split.

* **loss threshold** (Yeom et al. 2018): a member has a lower loss; score =
  minus the record's cross-entropy under the audited model.
* **likelihood ratio with shadow models** (LiRA, Carlini et al. 2022):
  `shadows` models of the same architecture are trained without DP, each on
  a random half of the audit pool, with the job's optimiser and learning
  rate. For each record, the logit-scaled confidence of its true class under
  the shadows that trained on it and those that did not gives two Gaussians;
  the score is the log-likelihood ratio of the audited model's confidence
  under them (variances pooled over records, as the paper recommends for
  few shadows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from consortia.client.training import train_locally
from consortia.common.arrays import LabeledArrays, concat
from consortia.common.config import JobConfig
from consortia.common.errors import ConsortiaError
from consortia.common.membership import AttackFigures, audited_epsilon, roc_auc, tpr_at_fpr
from consortia.common.models import build_model

CONFIDENCE = 0.95
MAX_PER_SIDE = 5_000  # records per side: enough for 0.1% FPR, cheap to score
MIN_PER_SIDE = 20
_SHADOW_MAX_EPOCHS = 30


@dataclass(frozen=True)
class ShadowRecipe:
    """How the attacker trains its shadow models: the audited job's model and training."""

    job: JobConfig
    feature_shape: tuple[int, ...]
    num_classes: int


def balanced(
    members: LabeledArrays, non_members: LabeledArrays, rng: np.random.Generator, hint: str
) -> tuple[LabeledArrays, LabeledArrays]:
    """As many members as non-members (at most MAX_PER_SIDE each), drawn at random.

    `hint` ends the error when either side has fewer than MIN_PER_SIDE records.
    """
    per_side = min(len(members), len(non_members), MAX_PER_SIDE)
    if per_side < MIN_PER_SIDE:
        short = "training" if len(members) < len(non_members) else "held-out"
        raise ConsortiaError(
            f"only {per_side} {short} records; a membership audit needs at least "
            f"{MIN_PER_SIDE} of each ({hint})"
        )
    return _sample(members, per_side, rng), _sample(non_members, per_side, rng)


def standard_attacks(
    model: nn.Module,
    members: LabeledArrays,
    non_members: LabeledArrays,
    recipe: ShadowRecipe,
    shadows: int,
    delta: float,
    rng: np.random.Generator,
) -> list[AttackFigures]:
    """The loss-threshold and LiRA attacks' figures on balanced `members` and `non_members`."""
    target = np.concatenate([confidence(model, members), confidence(model, non_members)])
    losses = -np.concatenate([record_losses(model, members), record_losses(model, non_members)])
    lira = _lira_scores(recipe, members, non_members, target, shadows, rng)
    return [
        figures("loss threshold", losses, len(members), delta, rng),
        figures(f"LiRA ({shadows} shadow models)", lira, len(members), delta, rng),
    ]


def _sample(data: LabeledArrays, size: int, rng: np.random.Generator) -> LabeledArrays:
    return data.subset(rng.choice(len(data), size=size, replace=False))


@torch.no_grad()
def _logits(model: nn.Module, data: LabeledArrays) -> torch.Tensor:
    model.eval()
    logits: torch.Tensor = model(torch.as_tensor(data.x))
    return logits


def record_losses(model: nn.Module, data: LabeledArrays) -> np.ndarray:
    """Each record's cross-entropy under `model`."""
    labels = torch.as_tensor(data.y, dtype=torch.long)
    return functional.cross_entropy(_logits(model, data), labels, reduction="none").numpy()


def confidence(model: nn.Module, data: LabeledArrays) -> np.ndarray:
    """log(p / (1 - p)) of the true class: LiRA's statistic, close to Gaussian per record."""
    logits = _logits(model, data).double()
    labels = torch.as_tensor(data.y, dtype=torch.long)
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.clone()
    others.scatter_(1, labels[:, None], -math.inf)
    # log p - log(1 - p) = true logit - logsumexp(other logits), computed stably.
    return (true - torch.logsumexp(others, dim=1)).numpy()


def _lira_scores(
    recipe: ShadowRecipe,
    members: LabeledArrays,
    non_members: LabeledArrays,
    target: np.ndarray,
    shadows: int,
    rng: np.random.Generator,
) -> np.ndarray:
    job = recipe.job
    pool = concat([members, non_members])
    inside = rng.random((shadows, len(pool))) < 0.5
    confidences = np.empty((shadows, len(pool)))
    epochs = min(job.rounds * job.training.local_epochs, _SHADOW_MAX_EPOCHS)
    training = job.training.model_copy(update={"local_epochs": epochs})
    for k in range(shadows):
        shadow = build_model(job.model, recipe.feature_shape, recipe.num_classes, job.seed + 1 + k)
        subset = pool.subset(np.flatnonzero(inside[k]))
        train_locally(
            shadow, subset, training, None, seed=job.seed + 1 + k, device=torch.device("cpu")
        )
        confidences[k] = confidence(shadow, pool)
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
    ratio: np.ndarray = _log_normal(target, in_mean, in_std) - _log_normal(
        target, out_mean, out_std
    )
    return ratio


def _log_normal(x: np.ndarray, mean: np.ndarray, std: float) -> np.ndarray:
    density: np.ndarray = -0.5 * ((x - mean) / std) ** 2 - math.log(std)
    return density


def figures(
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
