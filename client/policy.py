"""The node's policy: what its operator allows, whatever a job asks.

The coordinator proposes; the node decides. Every check returns a
machine-readable refusal (a code and a sentence) instead of raising, so the
node can log it, reply with it, and train nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from consortia.common.config import (
    MAX_NOISE_MULTIPLIER,
    ClippingNorm,
    Delta,
    Epsilon,
    JobConfig,
    StrictModel,
)
from consortia.common.model_plugins import InstalledModel, canonical_name
from consortia.common.protocol import RefusalCode


class NodePolicy(StrictModel):
    """Limits a node enforces on every job and every round."""

    epsilon_budget: Epsilon = Field(
        default=3.0, description="total ε per dataset, over all jobs, at `delta`"
    )
    delta: Delta = 1e-5
    min_noise_multiplier: float = Field(default=0.5, ge=0, le=MAX_NOISE_MULTIPLIER)
    max_grad_norm: ClippingNorm = Field(default=10.0, description="largest clipping bound allowed")
    max_local_epochs: int = Field(default=5, ge=1)
    models: tuple[str, ...] = Field(
        default=("logreg", "mlp", "cnn"),
        description="model names (entry points of `consortia.models`) the node trains",
    )
    model_distributions: dict[str, str] = Field(
        default_factory=dict,
        description="distribution -> the exact version the operator reviewed; when set, a "
        "model must come from one of them, installed at that version (empty: any installed)",
    )
    architectures: tuple[str, ...] = Field(
        default=(),
        description="sha256 architecture hashes the node accepts (empty: any of `models`); "
        "`consortia node check-job` prints a job's hash",
    )
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp", description="accountant the ledger composes each dataset's history with"
    )
    min_cohort: int = Field(
        default=2, ge=1, description="smallest cohort of a secure-aggregation round it joins"
    )
    require_secure_aggregation: bool = Field(
        default=False, description="refuse jobs whose updates would reach the coordinator alone"
    )
    share_label_histogram: bool = False
    answer_statistics: bool = Field(
        default=False, description="answer federated statistics queries (`consortia job stats`)"
    )
    max_statistics_epsilon: Epsilon = Field(
        default=0.5, description="largest ε one statistics query may cost, at `delta`"
    )


class Refusal(StrictModel):
    """Why a node will not take part: `code` for machines, `reason` for people."""

    code: RefusalCode
    reason: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.reason}"


def check_job(job: JobConfig, policy: NodePolicy) -> Refusal | None:
    """Refuse a job whose settings break the policy, before any data is touched."""
    privacy = job.privacy
    if not privacy.enabled:
        # Not a policy choice: the ledger can bound only DP releases, and one
        # non-private round would make every later ε of the dataset meaningless.
        return Refusal(code=RefusalCode.DP_REQUIRED, reason="this node trains only with DP-SGD")
    if policy.require_secure_aggregation and job.secure_aggregation is None:
        return Refusal(
            code=RefusalCode.SECURE_AGGREGATION_REQUIRED,
            reason="this node's policy requires secure aggregation; the job has no "
            "[secure_aggregation] block",
        )
    refusal = check_model_name(job.model.name, policy)
    if refusal is not None:
        return refusal
    if job.training.local_epochs > policy.max_local_epochs:
        return Refusal(
            code=RefusalCode.TOO_MANY_EPOCHS,
            reason=f"{job.training.local_epochs} local epochs per round exceed the node's "
            f"maximum of {policy.max_local_epochs}",
        )
    if privacy.enabled and privacy.max_grad_norm > policy.max_grad_norm:
        return Refusal(
            code=RefusalCode.CLIPPING_TOO_LARGE,
            reason=f"max_grad_norm {privacy.max_grad_norm} exceeds the node's maximum "
            f"of {policy.max_grad_norm}",
        )
    if privacy.enabled and privacy.delta > policy.delta:
        return Refusal(
            code=RefusalCode.DELTA_TOO_LARGE,
            reason=f"δ = {privacy.delta:g} exceeds the node's δ = {policy.delta:g}",
        )
    return None


def check_model_name(name: str, policy: NodePolicy) -> Refusal | None:
    """Refuse a model whose name the operator has not listed in `models`."""
    if name not in policy.models:
        return Refusal(
            code=RefusalCode.MODEL_NOT_ALLOWED,
            reason=f"model {name!r} is not in this node's list {list(policy.models)}",
        )
    return None


def check_architecture(digest: str, policy: NodePolicy) -> Refusal | None:
    """Refuse a model whose architecture hash the operator has not pinned (if any are)."""
    if policy.architectures and digest not in policy.architectures:
        return Refusal(
            code=RefusalCode.ARCHITECTURE_NOT_ALLOWED,
            reason=f"the job's model has architecture {digest}, which is not among the "
            f"{len(policy.architectures)} hashes in this node's policy",
        )
    return None


def check_model_source(installed: InstalledModel, policy: NodePolicy) -> Refusal | None:
    """Refuse a model from a distribution, or a version of one, that the operator has not pinned.

    Against what is installed on this node: the code that would run. Names
    compare as packaging does ('consortia_example_models' is
    'consortia-example-models').
    """
    if not policy.model_distributions:
        return None
    pins = {
        canonical_name(name): (name, version)
        for name, version in policy.model_distributions.items()
    }
    pinned = pins.get(canonical_name(installed.distribution))
    if pinned is None:
        return Refusal(
            code=RefusalCode.MODEL_NOT_ALLOWED,
            reason=f"{installed.label()}: distribution {installed.distribution!r} is not among "
            f"this node's model_distributions {sorted(policy.model_distributions)}",
        )
    if pinned[1] != installed.version:
        return Refusal(
            code=RefusalCode.MODEL_VERSION_MISMATCH,
            reason=f"{installed.label()}: this node's policy pins {pinned[0]} {pinned[1]}, but "
            f"{installed.distribution} {installed.version} is installed; review the new version "
            "and update model_distributions (or install the pinned one)",
        )
    return None


def check_noise(noise_multiplier: float, policy: NodePolicy) -> Refusal | None:
    """Refuse a noise multiplier (the job's own, or calibrated to its ε) below the node's floor."""
    if noise_multiplier < policy.min_noise_multiplier:
        return Refusal(
            code=RefusalCode.NOISE_TOO_LOW,
            reason=f"the job's noise multiplier {noise_multiplier:.3g} is below the node's "
            f"minimum of {policy.min_noise_multiplier}",
        )
    return None


def check_budget(
    spent: float, projected: float, policy: NodePolicy, dataset: str
) -> Refusal | None:
    """Refuse a round whose release would take the dataset past its ε budget."""
    if projected > policy.epsilon_budget:
        return Refusal(
            code=RefusalCode.BUDGET_EXHAUSTED,
            reason=f"dataset {dataset!r} has spent ε = {spent:.4g} of {policy.epsilon_budget:g}; "
            f"this round would bring it to {projected:.4g}",
        )
    return None


def check_statistics(query_epsilon: float, policy: NodePolicy) -> Refusal | None:
    """Refuse a statistics query the policy does not answer, or one that costs too much ε."""
    if not policy.answer_statistics:
        return Refusal(
            code=RefusalCode.STATISTICS_NOT_ANSWERED,
            reason="this node's policy does not answer statistics queries (answer_statistics)",
        )
    if query_epsilon > policy.max_statistics_epsilon:
        return Refusal(
            code=RefusalCode.STATISTICS_TOO_COSTLY,
            reason=f"the query would cost ε = {query_epsilon:.4g}, above this node's limit of "
            f"{policy.max_statistics_epsilon:g} per statistics query",
        )
    return None
