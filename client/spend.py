"""Where a node keeps its privacy spend, and the rule that it is kept before the update leaves.

Two accounts, one contract (`PrivacyAccount`):
- `JobAccount` (simulation): the job's release history in the node's Flower
  Context, composed over every round of the job.
- `LedgerAccount` (deployment): the node's durable SQLite ledger, composed
  over every release of the dataset across jobs, guarded by the node's
  policy; a round that would break the policy or the budget is refused
  before any training. Each recorded release is also written to the node's
  audit log (`privacy.spend`) before the update leaves: the ledger stays
  the source of truth for ε, the audit entry is the record of the event.
Both calibrate the noise once per job (kept in the Context) so that the
job's ε after all planned rounds stays within its target.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flwr.app import Context, MetricRecord

from consortia.client import training
from consortia.client.ledger import DatasetBudget, PrivacyLedger, ledger_path
from consortia.client.noise_key import derive_secret, noise_key
from consortia.client.policy import (
    NodePolicy,
    Refusal,
    check_architecture,
    check_budget,
    check_job,
    check_noise,
    check_statistics,
)
from consortia.client.privacy_state import JobPrivacyState, load_state, save_state
from consortia.common.audit import AuditLog
from consortia.common.config import JobConfig
from consortia.common.errors import ConsortiaError
from consortia.common.privacy import (
    AccountantName,
    Mechanism,
    Release,
    calibrate_noise,
    check_reachable,
    epsilon,
    histogram_release,
)


class NodeRefusedError(ConsortiaError):
    """The node declines the round; Flower returns this to the coordinator as the reason.

    `metrics`: the round's recorded spend, when the node refuses after training
    (its ε must still reach the coordinator's account).
    """

    def __init__(self, refusal: Refusal, metrics: MetricRecord | None = None) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal
        self.metrics = metrics


class PrivacyAccount(Protocol):
    """What the ClientApp needs from the node's privacy bookkeeping."""

    delta: float
    accountant: AccountantName

    def admit(
        self, job: JobConfig, num_records: int, architecture: str
    ) -> training.DpSettings | None:
        """The round's DP mechanism, or `NodeRefusedError`; None when the job trains without DP.

        `architecture` is the `architecture_hash` of the model the job builds.
        """
        ...

    def check_model(self, job: JobConfig, architecture: str) -> None:
        """`NodeRefusedError` if the node would not run this job's model at all (evaluation)."""
        ...

    def record(
        self, release: Release, server_round: int, mechanism: Mechanism = Mechanism.DPSGD
    ) -> float:
        """Store the release durably; return ε spent so far. Call before replying.

        Raises `BudgetExceededError` (recording nothing) if it would pass the budget.
        """
        ...

    def histogram_withheld(self, job: JobConfig) -> str | None:
        """Why the node's policy withholds the job's label histogram; None if it may share it."""
        ...

    def check_statistics(self, query_epsilon: float) -> None:
        """`NodeRefusedError` if the node's policy does not answer a statistics query of this ε."""
        ...

    def noise_secret(self, material: Iterable[bytes]) -> int | None:
        """Secret mixed into the noise seed of a release that depends on `material`.

        None keeps simulations reproducible from the job seed alone.
        """
        ...


def planned_noise(
    job: JobConfig,
    num_records: int,
    state: JobPrivacyState,
    accountant: AccountantName,
    prior: list[Release],
) -> float:
    """The job's noise multiplier, calibrated once over all planned rounds.

    The node assumes it takes part in every round, so its ε after the last
    round stays within the target however the coordinator samples.
    `accountant` is the one that will state the node's ε (on a deployed node,
    its ledger's, whatever the job says); `prior` are the job's other
    releases the target must also cover.
    """
    if state.noise_multiplier is None:
        privacy = job.privacy
        if privacy.noise_multiplier is not None:
            state.noise_multiplier = privacy.noise_multiplier
        else:
            assert privacy.target_epsilon is not None  # guaranteed by PrivacyConfig
            job_steps = planned_job(job, num_records, 1.0)
            state.noise_multiplier = calibrate_noise(
                privacy.target_epsilon,
                privacy.delta,
                job_steps.sample_rate,
                job_steps.steps,
                accountant,
                prior=prior,
            )
    return state.noise_multiplier


def check_simulated_target(job: JobConfig, num_records: int) -> None:
    """`UnreachableTargetError` if a simulated node of `num_records` could not meet the ε target.

    What `planned_noise` would raise on that node (its accountant, its
    histogram), found without the search: closed-form checks and at most
    one evaluation at the cap (`privacy.check_reachable`).
    """
    privacy = job.privacy
    if not privacy.enabled or privacy.target_epsilon is None:
        return
    job_steps = planned_job(job, num_records, 1.0)
    check_reachable(
        privacy.target_epsilon,
        privacy.delta,
        job_steps.sample_rate,
        job_steps.steps,
        privacy.accountant,
        prior=other_releases(job),
    )


def planned_release(job: JobConfig, num_records: int, sigma: float) -> Release:
    """The release one full round of the job makes (every planned step)."""
    batch = job.training.batch_size
    return Release(
        noise_multiplier=sigma,
        sample_rate=training.poisson_sample_rate(num_records, batch),
        steps=job.training.local_epochs * training.steps_per_epoch(num_records, batch),
    )


def planned_job(job: JobConfig, num_records: int, sigma: float) -> Release:
    """The releases of every planned round, as one (what the ε target covers besides `prior`)."""
    one_round = planned_release(job, num_records, sigma)
    return one_round.model_copy(update={"steps": one_round.steps * job.rounds})


def other_releases(job: JobConfig, shares_histogram: bool = True) -> list[Release]:
    """What the job releases besides DP-SGD, which its ε target must also cover."""
    if job.label_histogram is None or not shares_histogram:
        return []
    return [histogram_release(job.label_histogram.noise_multiplier)]


def _dp_settings(job: JobConfig, sigma: float) -> training.DpSettings:
    return training.DpSettings(noise_multiplier=sigma, max_grad_norm=job.privacy.max_grad_norm)


class JobAccount:
    """Simulation: the job's history in the node's Context, never reset between rounds."""

    def __init__(self, context: Context, job: JobConfig) -> None:
        self.context = context
        self.job = job
        self.delta = job.privacy.delta
        self.accountant: AccountantName = job.privacy.accountant
        self.state = load_state(context)

    def admit(
        self, job: JobConfig, num_records: int, architecture: str
    ) -> training.DpSettings | None:
        if not job.privacy.enabled:
            return None
        sigma = planned_noise(
            job, num_records, self.state, job.privacy.accountant, other_releases(job)
        )
        save_state(self.context, self.state)
        return _dp_settings(job, sigma)

    def check_model(self, job: JobConfig, architecture: str) -> None:
        return None  # a simulated node runs whatever the scenario names

    def record(
        self, release: Release, server_round: int, mechanism: Mechanism = Mechanism.DPSGD
    ) -> float:
        self.state.history.append(release)
        save_state(self.context, self.state)
        return epsilon(self.state.history, self.delta, self.job.privacy.accountant)

    def histogram_withheld(self, job: JobConfig) -> str | None:
        return None  # a simulated node has no operator policy; the scenario decides

    def check_statistics(self, query_epsilon: float) -> None:
        return None  # likewise

    def noise_secret(self, material: Iterable[bytes]) -> int | None:
        return None


class LedgerAccount:
    """Deployment: the dataset's ledger across all jobs, under the node's policy.

    The ledger file is opened per operation (a node answers each message in
    a fresh process; evaluation never opens it) and closed right after.
    With `audit`, each recorded release is appended there as `privacy.spend`
    (labelled with `job`, the job's name) before `record` returns.
    """

    def __init__(
        self,
        context: Context,
        ledger: Path,
        dataset: str,
        policy: NodePolicy,
        *,
        audit: AuditLog | None = None,
        job: str | None = None,
    ) -> None:
        self.context = context
        self.ledger_path = ledger
        self.dataset = dataset
        self.policy = policy
        self.state = load_state(context)
        self.delta = policy.delta
        self.accountant: AccountantName = policy.accountant
        self.audit = audit
        self.job = job

    @contextmanager
    def _ledger(self) -> Iterator[PrivacyLedger]:
        with PrivacyLedger(self.ledger_path) as ledger:
            register_budget(ledger, self.dataset, self.policy)
            yield ledger

    def admit(
        self, job: JobConfig, num_records: int, architecture: str
    ) -> training.DpSettings | None:
        try:
            with budget_view(self.ledger_path, self.dataset, self.policy) as view:
                return admit_under_policy(
                    job,
                    num_records,
                    architecture,
                    self.policy,
                    view.ledger,
                    self.dataset,
                    self.state,
                )
        finally:
            save_state(self.context, self.state)  # the calibrated noise, kept for the job

    def check_model(self, job: JobConfig, architecture: str) -> None:
        refusal = check_job(job, self.policy) or check_architecture(architecture, self.policy)
        if refusal is not None:
            raise NodeRefusedError(refusal)

    def record(
        self, release: Release, server_round: int, mechanism: Mechanism = Mechanism.DPSGD
    ) -> float:
        self._refuse_first_release_over_budget(release, server_round, mechanism)
        with self._ledger() as ledger:
            entry = ledger.record_release(
                self.dataset,
                release,
                run_id=str(self.context.run_id),
                server_round=server_round,
                mechanism=mechanism,
            )
        if self.audit is not None:
            # After the ledger (which over-counts rather than under-counts), before the
            # update leaves: an AuditError here stops the update, like a ledger error.
            self.audit.append(
                "privacy.spend",
                dataset=entry.dataset,
                job=self.job,
                run_id=entry.run_id,
                round=entry.server_round,
                mechanism=entry.mechanism.value,
                noise_multiplier=entry.noise_multiplier,
                sample_rate=entry.sample_rate,
                steps=entry.steps,
                epsilon_after=entry.epsilon,
                delta=entry.delta,
                accountant=entry.accountant,
                ledger_seq=entry.seq,
            )
        return entry.epsilon

    def _refuse_first_release_over_budget(
        self, release: Release, server_round: int, mechanism: Mechanism
    ) -> None:
        """`BudgetExceededError` before the ledger exists, for a first release over budget.

        `record_release` refuses it too, writing no release, but only after
        the dataset's budget was entered (and the file created): a refused
        statistics query on a fresh node would leave a ledger behind. So a
        dataset's first release is recorded in the scratch ledger first, with
        the very same check and message; the real one follows if it passes.
        """
        with budget_view(self.ledger_path, self.dataset, self.policy) as view:
            if view.scratch:  # else the ledger holds the dataset: record_release decides
                view.ledger.record_release(
                    self.dataset,
                    release,
                    run_id=str(self.context.run_id),
                    server_round=server_round,
                    mechanism=mechanism,
                )

    def histogram_withheld(self, job: JobConfig) -> str | None:
        return histogram_refusal(job, self.policy)

    def check_statistics(self, query_epsilon: float) -> None:
        refusal = check_statistics(query_epsilon, self.policy)
        if refusal is not None:
            raise NodeRefusedError(refusal)

    def noise_secret(self, material: Iterable[bytes]) -> int | None:
        # Keyed by the node's noise key (client/noise_key.py): unpredictable to the
        # coordinator, identical for an identical question, independent otherwise.
        return derive_secret(noise_key(self.ledger_path.parent), [self.dataset.encode(), *material])


def register_budget(ledger: PrivacyLedger, dataset: str, policy: NodePolicy) -> DatasetBudget:
    """Enter the dataset's budget from the policy (a no-op once there, an error if it changed)."""
    return ledger.register_dataset(dataset, policy.epsilon_budget, policy.delta, policy.accountant)


@dataclass(frozen=True)
class BudgetView:
    """A ledger to check a job against, and the dataset's budget in it.

    `scratch`: the node's ledger does not hold the dataset yet, so `ledger`
    is a temporary one holding only the budget the first release would
    enter, with nothing spent.
    """

    ledger: PrivacyLedger
    budget: DatasetBudget
    scratch: bool


@contextmanager
def budget_view(path: Path, dataset: str, policy: NodePolicy) -> Iterator[BudgetView]:
    """The dataset's ledger for checks only: writes no ledger, creates no file at `path`.

    The node's own ledger at `path` when it already holds the dataset (its
    budget there is checked against the policy, as a round does); otherwise a
    scratch ledger in a temporary folder, deleted afterwards, whose answers
    are those of the node's ledger before its first release. So a refused
    job, or `consortia node check-job`, never leaves a ledger behind: the
    ledger is created by the first release actually recorded.
    """
    if path.exists():
        with PrivacyLedger(path) as ledger:
            if dataset in {budget.name for budget in ledger.datasets()}:
                yield BudgetView(ledger, register_budget(ledger, dataset, policy), scratch=False)
                return
    with (
        tempfile.TemporaryDirectory(prefix="consortia-ledger-view-") as folder,
        PrivacyLedger(ledger_path(Path(folder))) as scratch,
    ):
        yield BudgetView(scratch, register_budget(scratch, dataset, policy), scratch=True)


def histogram_refusal(job: JobConfig, policy: NodePolicy) -> str | None:
    """Why a node under `policy` withholds the job's label histogram, or None."""
    if job.label_histogram is None:
        return "the job asks for no label histogram"
    if not policy.share_label_histogram:
        return "the node's policy does not share label histograms"
    if job.label_histogram.noise_multiplier < policy.min_noise_multiplier:
        return (
            f"its noise multiplier {job.label_histogram.noise_multiplier:g} is below the "
            f"node's minimum of {policy.min_noise_multiplier:g}"
        )
    return None


def admit_under_policy(
    job: JobConfig,
    num_records: int,
    architecture: str,
    policy: NodePolicy,
    ledger: PrivacyLedger,
    dataset: str,
    state: JobPrivacyState,
) -> training.DpSettings:
    """Every check a deployed node makes before a round, in order; raises `NodeRefusedError`.

    Static settings first (DP, model, architecture, epochs, clipping, δ), then
    the noise (the job's own, or calibrated to its ε with the ledger's
    accountant and the releases the node will make) against the floor, then
    the round's projected ε against the dataset's remaining budget. `state`
    receives the job's noise multiplier. Also used by `consortia node
    check-job` to answer "would this node accept that job?" without training.
    """
    refusal = check_job(job, policy) or check_architecture(architecture, policy)
    if refusal is None:
        prior = other_releases(job, histogram_refusal(job, policy) is None)
        sigma = planned_noise(job, num_records, state, policy.accountant, prior)
        refusal = check_noise(sigma, policy) or _budget_refusal(
            planned_release(job, num_records, sigma), policy, ledger, dataset
        )
    if refusal is not None:
        raise NodeRefusedError(refusal)
    assert state.noise_multiplier is not None
    return _dp_settings(job, state.noise_multiplier)


def _budget_refusal(
    release: Release, policy: NodePolicy, ledger: PrivacyLedger, dataset: str
) -> Refusal | None:
    spent = ledger.spent(dataset)
    projected = ledger.projected_epsilon(dataset, release)
    return check_budget(spent, projected, policy, dataset)
