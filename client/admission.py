"""Would a deployed node take part in a job? The same checks a round makes, without training.

The node operator runs this (`consortia node check-job`) before agreeing to
a consortium's job: it names the distribution and version the model comes
from on this node (a job whose model is not installed here, or is at
another version, is refused as a round would be), the model's architecture
hash to pin in the policy, the noise the node would calibrate, and where the dataset's budget
would stand after one round and after the whole job; for a statistics job,
whether it would answer the query and what that would cost (`--statistics`).
"""

from __future__ import annotations

from pydantic import BaseModel

from consortia.client.ledger import ledger_path
from consortia.client.model_admission import installed_for, node_model
from consortia.client.node_config import NodeConfig
from consortia.client.onboarding.registry import DatasetRegistry
from consortia.client.policy import Refusal, check_budget, check_statistics
from consortia.client.privacy_state import JobPrivacyState
from consortia.client.spend import (
    NodeRefusedError,
    admit_under_policy,
    budget_view,
    histogram_refusal,
    other_releases,
    planned_job,
    planned_release,
)
from consortia.client.statistics import deployed_facts, plan_query
from consortia.common.config import JobConfig
from consortia.common.errors import DataError, PrivacyError
from consortia.common.privacy import Mechanism
from consortia.common.protocol import RefusalCode


def served_dataset(job: JobConfig, node: NodeConfig) -> str:
    """The registered dataset the job asks for, if this node serves it; else a refusal."""
    if job.dataset is None or job.dataset not in node.serve:
        raise NodeRefusedError(
            Refusal(
                code=RefusalCode.DATASET_NOT_SERVED,
                reason=f"the job asks for dataset {job.dataset!r}; this node serves "
                f"{list(node.serve)}",
            )
        )
    return job.dataset


class AdmissionPreview(BaseModel):
    """What the node would decide for a job, and the figures behind the decision."""

    node: str
    dataset: str | None
    model: str
    distribution: str | None = None  # where the model comes from on this node, and its version
    architecture: str | None = None
    noise_multiplier: float | None = None
    epsilon_budget: float | None = None
    epsilon_spent: float | None = None
    epsilon_after_round: float | None = None
    epsilon_after_job: float | None = None
    refusal: Refusal | None = None

    def rows(self) -> list[tuple[str, str]]:
        """Label/value pairs for a table, skipping what was not reached."""
        values = {
            "node": self.node,
            "dataset": self.dataset,
            "model": self.model,
            "model distribution": self.distribution,
            "architecture": self.architecture,
            "noise multiplier": _fmt(self.noise_multiplier),
            "ε budget": _fmt(self.epsilon_budget),
            "ε spent": _fmt(self.epsilon_spent),
            "ε after one round": _fmt(self.epsilon_after_round),
            "ε after the whole job": _fmt(self.epsilon_after_job),
        }
        return [(label, value) for label, value in values.items() if value is not None]


def preview_admission(job: JobConfig, node: NodeConfig) -> AdmissionPreview:
    """Run a round's admission checks for `job` on `node`; nothing is trained, spent or written.

    Against the node's ledger if it holds the dataset, else against the
    empty one its first round would start (`budget_view`): no ledger is
    created or changed.
    """
    preview = AdmissionPreview(node=node.name, dataset=job.dataset, model=job.model.name)
    policy = node.policy
    try:
        dataset = served_dataset(job, node)
        installed = installed_for(job, policy)
        preview = preview.model_copy(
            update={"distribution": f"{installed.distribution} {installed.version}"}
        )
        registration = DatasetRegistry(node.state_dir).get(dataset)
        _, digest = node_model(job, registration.feature_shape, registration.num_classes, policy)
    except NodeRefusedError as refused:
        return preview.model_copy(update={"refusal": refused.refusal})
    state = JobPrivacyState()
    refusal = None
    with budget_view(ledger_path(node.state_dir), dataset, policy) as view:
        ledger, budget = view.ledger, view.budget
        try:
            admit_under_policy(
                job, registration.train_records, digest, policy, ledger, dataset, state
            )
        except NodeRefusedError as refused:
            refusal = refused.refusal
        after_round = after_job = None
        if state.noise_multiplier is not None:
            sigma, records = state.noise_multiplier, registration.train_records
            # What the node would release: its history, the histogram if it shares it, rounds.
            before = ledger.accountant(dataset)
            for release in other_releases(job, histogram_refusal(job, policy) is None):
                before.compose(release, Mechanism.GAUSSIAN)
            after_round = before.projected(planned_release(job, records, sigma), budget.delta)
            after_job = before.projected(planned_job(job, records, sigma), budget.delta)
    return preview.model_copy(
        update={
            "architecture": digest,
            "noise_multiplier": state.noise_multiplier,
            "epsilon_budget": budget.epsilon_budget,
            "epsilon_spent": budget.epsilon_spent,
            "epsilon_after_round": after_round,
            "epsilon_after_job": after_job,
            "refusal": refusal,
        }
    )


def _fmt(value: float | None) -> str | None:
    return None if value is None else f"{value:.4g}"


class StatisticsPreview(BaseModel):
    """Would the node answer the job's statistics query, and at what cost?"""

    blocks: int
    noise_multiplier: float  # σ of every block
    query_epsilon: float
    epsilon_after: float | None = None
    unranged: tuple[str, ...] = ()
    refusal: Refusal | None = None

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("statistics blocks", str(self.blocks)),
            ("σ per block", f"{self.noise_multiplier:.4g}"),
            ("ε of the query", f"{self.query_epsilon:.4g}"),
        ]
        if self.epsilon_after is not None:
            rows.append(("ε after the query", f"{self.epsilon_after:.4g}"))
        if self.unranged:
            rows.append(("not released (no range)", ", ".join(self.unranged)))
        return rows


def preview_statistics(job: JobConfig, node: NodeConfig) -> StatisticsPreview | Refusal:
    """The node's answer to the job's `[statistics]` query; nothing is spent.

    The checks of a query: the dataset served and unchanged, the features
    and group column known, the noise reachable, the policy's
    `answer_statistics` and per-query limit, the dataset's budget. A query
    with a model is also checked against the model policy when it arrives.
    """
    config = job.statistics
    assert config is not None  # the caller checked
    try:
        dataset = served_dataset(job, node)
        facts = deployed_facts(*DatasetRegistry(node.state_dir).load_inspected(dataset))
    except NodeRefusedError as refused:
        return refused.refusal
    except DataError as exc:
        return Refusal(code=RefusalCode.DATA_UNUSABLE, reason=exc.message)
    policy = node.policy
    try:
        plan = plan_query(facts, config, policy.delta, policy.accountant)
    except PrivacyError as exc:
        return Refusal(code=RefusalCode.PRIVACY_TARGET_UNREACHABLE, reason=exc.message)
    if isinstance(plan, Refusal):
        return plan
    with budget_view(ledger_path(node.state_dir), dataset, policy) as view:
        budget = view.budget
        after = view.ledger.projected_epsilon(dataset, plan.release)
    refusal = check_statistics(plan.epsilon, policy) or check_budget(
        budget.epsilon_spent, after, policy, dataset
    )
    return StatisticsPreview(
        blocks=len(plan.blocks),
        noise_multiplier=plan.sigma,
        query_epsilon=plan.epsilon,
        epsilon_after=after,
        unranged=plan.selection.unranged,
        refusal=refusal,
    )
