"""Where a node keeps its privacy spend, and the rule that it is kept before the update leaves.

Two accounts, one contract (`PrivacyAccount`):
- `JobAccount` (simulation): the job's release history in the node's Flower
  Context, composed over every round of the job.
- `LedgerAccount` (deployment): the node's durable SQLite ledger, composed
  over every release of the dataset across jobs, guarded by the node's
  policy; a round that would break the policy or the budget is refused
  before any training.
Both calibrate the noise once per job (kept in the Context) so that the
job's ε after all planned rounds stays within its target.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from flwr.app import Context

from consortia.client import training
from consortia.client.ledger import Mechanism, PrivacyLedger
from consortia.client.policy import (
    NodePolicy,
    Refusal,
    check_architecture,
    check_budget,
    check_job,
    check_noise,
)
from consortia.client.privacy_state import JobPrivacyState, load_state, save_state
from consortia.common.config import JobConfig
from consortia.common.errors import ConsortiaError
from consortia.common.privacy import Release, calibrate_noise, epsilon, histogram_release


class NodeRefusedError(ConsortiaError):
    """The node declines the round; Flower returns this to the coordinator as the reason."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


class PrivacyAccount(Protocol):
    """What `train` needs from the node's privacy bookkeeping."""

    delta: float

    def admit(
        self, job: JobConfig, num_records: int, architecture: str
    ) -> training.DpSettings | None:
        """The round's DP mechanism, or `NodeRefusedError`; None when the job trains without DP.

        `architecture` is the `architecture_hash` of the model the job builds.
        """
        ...

    def record(self, release: Release, server_round: int, mechanism: Mechanism = "dpsgd") -> float:
        """Store the release durably; return ε spent so far. Call before replying.

        Raises `BudgetExceededError` (recording nothing) if it would pass the budget.
        """
        ...

    def shares_label_histogram(self) -> bool:
        """Whether the node's policy lets it release a DP label histogram."""
        ...

    def noise_secret(self) -> int | None:
        """Entropy mixed into the round's noise seed; None keeps simulations reproducible."""
        ...


def planned_noise(job: JobConfig, num_records: int, state: JobPrivacyState) -> float:
    """The job's noise multiplier, calibrated once over all planned rounds.

    The node assumes it takes part in every round, so its ε after the last
    round stays within the target however the coordinator samples.
    """
    if state.noise_multiplier is None:
        privacy = job.privacy
        if privacy.noise_multiplier is not None:
            state.noise_multiplier = privacy.noise_multiplier
        else:
            assert privacy.target_epsilon is not None  # guaranteed by PrivacyConfig
            batch = job.training.batch_size
            per_round = job.training.local_epochs * training.steps_per_epoch(num_records, batch)
            state.noise_multiplier = calibrate_noise(
                privacy.target_epsilon,
                privacy.delta,
                training.poisson_sample_rate(num_records, batch),
                job.rounds * per_round,
                privacy.accountant,
                prior=other_releases(job),
            )
    return state.noise_multiplier


def other_releases(job: JobConfig) -> list[Release]:
    """What the job releases besides DP-SGD, which its ε target must also cover."""
    if job.label_histogram is None:
        return []
    return [histogram_release(job.label_histogram.noise_multiplier)]


class JobAccount:
    """Simulation: the job's history in the node's Context, never reset between rounds."""

    def __init__(self, context: Context, job: JobConfig) -> None:
        self.context = context
        self.job = job
        self.delta = job.privacy.delta
        self.state = load_state(context)

    def admit(
        self, job: JobConfig, num_records: int, architecture: str
    ) -> training.DpSettings | None:
        if not job.privacy.enabled:
            return None
        sigma = planned_noise(job, num_records, self.state)
        save_state(self.context, self.state)
        return training.DpSettings(noise_multiplier=sigma, max_grad_norm=job.privacy.max_grad_norm)

    def record(self, release: Release, server_round: int, mechanism: Mechanism = "dpsgd") -> float:
        self.state.history.append(release)
        save_state(self.context, self.state)
        return epsilon(self.state.history, self.delta, self.job.privacy.accountant)

    def noise_secret(self) -> int | None:
        return None

    def shares_label_histogram(self) -> bool:
        return True  # a simulated node has no operator policy; the scenario decides


class LedgerAccount:
    """Deployment: the dataset's ledger across all jobs, under the node's policy."""

    def __init__(
        self,
        context: Context,
        ledger: PrivacyLedger,
        dataset: str,
        policy: NodePolicy,
    ) -> None:
        self.context = context
        self.ledger = ledger
        self.dataset = dataset
        self.policy = policy
        self.state = load_state(context)
        budget = ledger.register_dataset(
            dataset, policy.epsilon_budget, policy.delta, policy.accountant
        )
        self.delta = budget.delta

    def admit(
        self, job: JobConfig, num_records: int, architecture: str
    ) -> training.DpSettings | None:
        try:
            return admit_under_policy(
                job, num_records, architecture, self.policy, self.ledger, self.dataset, self.state
            )
        finally:
            save_state(self.context, self.state)  # the calibrated noise, kept for the job

    def record(self, release: Release, server_round: int, mechanism: Mechanism = "dpsgd") -> float:
        entry = self.ledger.record_release(
            self.dataset,
            release,
            run_id=str(self.context.run_id),
            server_round=server_round,
            mechanism=mechanism,
        )
        return entry.epsilon

    def noise_secret(self) -> int | None:
        return secrets.randbits(128)

    def shares_label_histogram(self) -> bool:
        return self.policy.share_label_histogram


def admit_under_policy(
    job: JobConfig,
    num_records: int,
    architecture: str,
    policy: NodePolicy,
    ledger: PrivacyLedger,
    dataset: str,
    state: JobPrivacyState,
) -> training.DpSettings | None:
    """Every check a deployed node makes before a round, in order; raises `NodeRefusedError`.

    Static settings first (DP, model, architecture, epochs, clipping, δ, noise
    floor), then the calibrated noise against the floor, then the round's
    projected ε against the dataset's remaining budget. `state` receives the
    job's calibrated noise multiplier. Also used by `consortia node check-job`
    to answer "would this node accept that job?" without training.
    """
    refusal = check_job(job, policy) or check_architecture(architecture, policy)
    if refusal is None and job.privacy.enabled:
        sigma = planned_noise(job, num_records, state)
        refusal = check_noise(sigma, policy) or _budget_refusal(
            job, num_records, sigma, policy, ledger, dataset
        )
    if refusal is not None:
        raise NodeRefusedError(refusal)
    if not job.privacy.enabled:
        return None
    assert state.noise_multiplier is not None
    return training.DpSettings(
        noise_multiplier=state.noise_multiplier, max_grad_norm=job.privacy.max_grad_norm
    )


def planned_release(job: JobConfig, num_records: int, sigma: float) -> Release:
    """The release one full round of the job makes (every planned step)."""
    batch = job.training.batch_size
    return Release(
        noise_multiplier=sigma,
        sample_rate=training.poisson_sample_rate(num_records, batch),
        steps=job.training.local_epochs * training.steps_per_epoch(num_records, batch),
    )


def _budget_refusal(
    job: JobConfig,
    num_records: int,
    sigma: float,
    policy: NodePolicy,
    ledger: PrivacyLedger,
    dataset: str,
) -> Refusal | None:
    spent = ledger.spent(dataset)
    projected = ledger.projected_epsilon(dataset, planned_release(job, num_records, sigma))
    return check_budget(spent, projected, policy, dataset)
