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
from consortia.client.ledger import PrivacyLedger
from consortia.client.policy import NodePolicy, Refusal, check_budget, check_job, check_noise
from consortia.client.privacy_state import JobPrivacyState, load_state, save_state
from consortia.common.config import JobConfig
from consortia.common.errors import ConsortiaError
from consortia.common.privacy import Release, calibrate_noise, epsilon


class NodeRefusedError(ConsortiaError):
    """The node declines the round; Flower returns this to the coordinator as the reason."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


class PrivacyAccount(Protocol):
    """What `train` needs from the node's privacy bookkeeping."""

    delta: float

    def admit(self, job: JobConfig, num_records: int) -> training.DpSettings | None:
        """The round's DP mechanism, or `NodeRefusedError`; None when the job trains without DP."""
        ...

    def record(self, release: Release, server_round: int) -> float:
        """Store the release durably; return ε spent so far. Call before replying."""
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
            )
    return state.noise_multiplier


class JobAccount:
    """Simulation: the job's history in the node's Context, never reset between rounds."""

    def __init__(self, context: Context, job: JobConfig) -> None:
        self.context = context
        self.job = job
        self.delta = job.privacy.delta
        self.state = load_state(context)

    def admit(self, job: JobConfig, num_records: int) -> training.DpSettings | None:
        if not job.privacy.enabled:
            return None
        sigma = planned_noise(job, num_records, self.state)
        save_state(self.context, self.state)
        return training.DpSettings(noise_multiplier=sigma, max_grad_norm=job.privacy.max_grad_norm)

    def record(self, release: Release, server_round: int) -> float:
        self.state.history.append(release)
        save_state(self.context, self.state)
        return epsilon(self.state.history, self.delta, self.job.privacy.accountant)

    def noise_secret(self) -> int | None:
        return None


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
        budget = ledger.register_dataset(dataset, policy.epsilon_budget, policy.delta)
        self.delta = budget.delta

    def admit(self, job: JobConfig, num_records: int) -> training.DpSettings | None:
        refusal = check_job(job, self.policy)
        if refusal is None and job.privacy.enabled:
            sigma = planned_noise(job, num_records, self.state)
            save_state(self.context, self.state)
            refusal = check_noise(sigma, self.policy) or self._budget_refusal(
                job, num_records, sigma
            )
        if refusal is not None:
            raise NodeRefusedError(refusal)
        if not job.privacy.enabled:
            return None
        assert self.state.noise_multiplier is not None
        return training.DpSettings(
            noise_multiplier=self.state.noise_multiplier,
            max_grad_norm=job.privacy.max_grad_norm,
        )

    def _budget_refusal(self, job: JobConfig, num_records: int, sigma: float) -> Refusal | None:
        batch = job.training.batch_size
        planned = Release(
            noise_multiplier=sigma,
            sample_rate=training.poisson_sample_rate(num_records, batch),
            steps=job.training.local_epochs * training.steps_per_epoch(num_records, batch),
        )
        spent = self.ledger.spent(self.dataset)
        projected = self.ledger.projected_epsilon(self.dataset, planned)
        return check_budget(spent, projected, self.policy, self.dataset)

    def record(self, release: Release, server_round: int) -> float:
        entry = self.ledger.record_release(
            self.dataset, release, run_id=str(self.context.run_id), server_round=server_round
        )
        return entry.epsilon

    def noise_secret(self) -> int | None:
        return secrets.randbits(128)
