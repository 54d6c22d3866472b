"""Membership-inference statistics: ROC figures and the ε lower bound an attack implies.

An (ε, δ)-DP training algorithm bounds every membership test on every
record: TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ (Kairouz et al.
2015; used for auditing by Jagielski et al. 2020 and Nasr et al. 2021). An
attack that reaches (FPR, TPR) therefore proves ε ≥ max(log((TPR − δ)/FPR),
log((1 − FPR − δ)/(1 − TPR))). With finitely many trials the rates are
estimates, so the bound uses Clopper–Pearson intervals: the lower end of
TPR, the upper end of FPR — a claim that holds with the stated confidence.

The attacks themselves (which score says "member") live with the audit
(simulations/privacy_audit.py); this module only turns scores into figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError
from scipy.stats import beta as beta_distribution
from scipy.stats import rankdata


class AttackFigures(BaseModel):
    """One attack's success, as `consortia audit privacy` reports it."""

    model_config = ConfigDict(frozen=True)

    attack: str
    members: int
    non_members: int
    auc: float
    tpr_at_fpr_0_1pct: float | None  # None: too few non-members to resolve an FPR of 0.1%
    tpr_at_fpr_1pct: float | None
    epsilon_lower_bound: float  # at `confidence`, from the threshold chosen on the other half
    confidence: float


AUDIT_FILE = "privacy-audit.json"


class PrivacyAudit(BaseModel):
    """privacy-audit.json in a run folder: what the attacks achieved against what the run claims."""

    run: str
    round: int
    claimed_epsilon: float | None  # the largest ε any node reported by that round (None: no DP)
    delta: float
    shadows: int
    attacks: list[AttackFigures]


def read_audit(run_dir: Path) -> PrivacyAudit | None:
    """The run's audit, if one was made and the file still reads (else None)."""
    path = run_dir / AUDIT_FILE
    try:
        return PrivacyAudit.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def roc_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P(a random member scores higher than a random non-member), ties counted half."""
    scores = np.concatenate([member_scores, non_member_scores])
    ranks = rankdata(scores)  # ties share their mean rank
    m, n = len(member_scores), len(non_member_scores)
    member_rank_sum = float(ranks[:m].sum())
    return (member_rank_sum - m * (m + 1) / 2) / (m * n)


def tpr_at_fpr(
    member_scores: np.ndarray, non_member_scores: np.ndarray, fpr: float
) -> float | None:
    """The TPR of the strictest threshold whose FPR is at most `fpr` (None if unresolvable).

    With n non-members the smallest non-zero FPR is 1/n; a target below it
    cannot be told from zero, so it is reported as unknown, not as a number.
    """
    if len(non_member_scores) * fpr < 1:
        return None
    allowed = math.floor(len(non_member_scores) * fpr)  # non-members allowed above the threshold
    ordered = np.sort(non_member_scores)[::-1]
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float(np.mean(member_scores > threshold))


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """Two-sided Clopper–Pearson interval of a binomial rate."""
    alpha = 1.0 - confidence
    low = (
        0.0
        if successes == 0
        else beta_distribution.ppf(alpha / 2, successes, trials - successes + 1)
    )
    high = (
        1.0
        if successes == trials
        else beta_distribution.ppf(1 - alpha / 2, successes + 1, trials - successes)
    )
    return float(low), float(high)


def epsilon_bound(
    true_positives: int,
    members: int,
    false_positives: int,
    non_members: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The ε an attack with these counts proves, at `confidence` (0 when it proves nothing)."""
    tpr_low, _ = clopper_pearson(true_positives, members, confidence)
    _, fpr_high = clopper_pearson(false_positives, non_members, confidence)
    bounds = [0.0]
    if fpr_high > 0 and tpr_low - delta > 0:
        bounds.append(math.log((tpr_low - delta) / fpr_high))
    if tpr_low < 1 and 1 - fpr_high - delta > 0:
        # The complementary test: "non-member" when the score is low.
        bounds.append(math.log((1 - fpr_high - delta) / (1 - tpr_low)))
    return max(bounds)


def audited_epsilon(
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    delta: float,
    rng: np.random.Generator,
    confidence: float = 0.95,
) -> float:
    """ε lower bound of the best threshold, chosen on one half and counted on the other.

    Picking the threshold on the same records it is evaluated on would
    overstate the bound (the maximum of many noisy estimates); a split keeps
    the confidence statement honest.
    """
    members = rng.permutation(member_scores)
    non_members = rng.permutation(non_member_scores)
    m, n = len(members) // 2, len(non_members) // 2
    choose_m, count_m = members[:m], members[m:]
    choose_n, count_n = non_members[:n], non_members[n:]

    def bound(members: np.ndarray, non_members: np.ndarray, threshold: float) -> float:
        """The bound of the test "member when the score is at least `threshold`"."""
        caught = int(np.sum(members >= threshold))
        accused = int(np.sum(non_members >= threshold))
        return epsilon_bound(caught, len(members), accused, len(non_members), delta, confidence)

    candidates = np.unique(np.concatenate([choose_m, choose_n]))
    best = max(candidates, key=lambda threshold: bound(choose_m, choose_n, threshold))
    return bound(count_m, count_n, float(best))
