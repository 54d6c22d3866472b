"""`JobConfig`: a federated training job, the same schema in simulation and deployment.

A job gathers the blocks of the sibling modules and checks what spans them
(secure aggregation against the strategy, privacy and update checks).
`check_cohort` says whether a round of n nodes can satisfy its aggregation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from consortia.common.config.privacy import PrivacyConfig
from consortia.common.config.secure_aggregation import SecureAggregationConfig, check_secure_cohort
from consortia.common.config.statistics import LabelHistogramConfig, StatisticsConfig
from consortia.common.config.strategy import (
    ROBUST_STRATEGIES,
    FedAvgConfig,
    FedTrimmedAvgConfig,
    KrumFamilyConfig,
    MultiKrumConfig,
    StrategyConfig,
)
from consortia.common.config.strict import StrictModel
from consortia.common.config.training import ModelConfig, TrainingConfig
from consortia.common.config.update_checks import UpdateChecksConfig

# A lost reply costs the coordinator the whole round timeout, so its default
# follows the job's work instead of a flat hour: a base for connecting and
# exchanging weights, plus a generous allowance per local epoch on a CPU node
# (tabular and MNIST-sized data train an epoch in seconds to a few minutes).
# Large imaging datasets set `round_timeout_s` themselves.
ROUND_TIMEOUT_BASE_S = 300.0
ROUND_TIMEOUT_PER_EPOCH_S = 300.0


def default_round_timeout_s(local_epochs: int) -> float:
    """The round timeout a job gets when it does not set one."""
    return ROUND_TIMEOUT_BASE_S + ROUND_TIMEOUT_PER_EPOCH_S * local_epochs


def _round_timeout_for(training: object) -> float:
    # `training` is absent from the validated data when it failed validation:
    # that error is reported, and the timeout then needs no error of its own.
    epochs = training.local_epochs if isinstance(training, TrainingConfig) else 1
    return default_round_timeout_s(epochs)


class JobConfig(StrictModel):
    """A federated training job: the same schema in simulation and deployment."""

    name: str = Field(default="job", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    dataset: str | None = Field(
        default=None, description="registered dataset the nodes train on (deployment)"
    )
    min_nodes: int = Field(default=2, ge=1, description="nodes to wait for (deployment)")
    seed: int = Field(default=0, ge=0, lt=2**32)
    rounds: int = Field(default=10, ge=1, le=100_000)
    clients_per_round: int | None = Field(
        default=None, ge=1, description="nodes sampled per round; all nodes if unset"
    )
    evaluation: Literal["federated", "centralized", "none"] = "federated"
    # A factory: the default model is looked up when a job without [model] is validated,
    # not when this module is imported.
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = TrainingConfig()
    # After `training`: its default is derived from the validated local epochs.
    round_timeout_s: float = Field(
        default_factory=lambda data: _round_timeout_for(data.get("training")),
        gt=0,
        description=(
            "seconds the coordinator waits for a round's replies; default "
            f"{ROUND_TIMEOUT_BASE_S:g} s + {ROUND_TIMEOUT_PER_EPOCH_S:g} s per local epoch"
        ),
    )
    privacy: PrivacyConfig = PrivacyConfig(target_epsilon=1.0)
    strategy: StrategyConfig = FedAvgConfig()
    update_checks: UpdateChecksConfig = UpdateChecksConfig()
    label_histogram: LabelHistogramConfig | None = Field(
        default=None, description="DP label histograms from the nodes, to report label skew"
    )
    secure_aggregation: SecureAggregationConfig | None = Field(
        default=None, description="SecAgg+: the coordinator sees only the sum of the updates"
    )
    statistics: StatisticsConfig | None = Field(
        default=None, description="the federated statistics query of `consortia job stats`"
    )

    @model_validator(mode="after")
    def _strategy_fits_cohort(self) -> JobConfig:
        if self.clients_per_round is not None:
            check_cohort(self, self.clients_per_round, "clients_per_round")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> JobConfig:
        if self.secure_aggregation is None:
            return self
        settings = self.secure_aggregation
        if settings.neighbours is not None and settings.threshold is not None:
            # The largest graph degree `neighbours` gives (odd values round up to even).
            settings.threshold_for(settings.neighbours + settings.neighbours % 2)
        if self.strategy.name in ROBUST_STRATEGIES:
            raise ValueError(
                f"strategy '{self.strategy.name}' needs every update in the clear, which secure "
                "aggregation hides; use fedavg, fedprox, fedadam or fedyogi with it"
            )
        bounded = (
            self.privacy.enabled
            or self.training.optimizer == "adam"
            or self.update_checks.max_update_norm is not None
        )
        if not bounded:
            raise ValueError(
                "secure aggregation encodes updates in a range derived from the DP clipping "
                "norm; without DP (and with SGD) set update_checks.max_update_norm"
            )
        return self


def check_cohort(job: JobConfig, cohort: int, source: str) -> None:
    """Raise ValueError if a round of `cohort` updates cannot satisfy the job's aggregation.

    Checked where the cohort size is known (`clients_per_round`, or a
    scenario's node count). At run time fewer updates may survive screening:
    `update_checks.min_updates` decides whether such a round still aggregates.
    """
    checks = job.update_checks
    if checks.min_updates > cohort:
        raise ValueError(
            f"update_checks.min_updates ({checks.min_updates}) exceeds the {cohort} nodes "
            f"per round ({source}): every round would fail"
        )
    strategy = job.strategy
    if isinstance(strategy, FedTrimmedAvgConfig) and int(strategy.beta * cohort) < 1:
        raise ValueError(
            f"strategy 'trimmed_mean' with beta = {strategy.beta} trims int({strategy.beta} × "
            f"{cohort}) = 0 updates from each end of a round of {cohort} nodes ({source}): "
            f"that is the plain mean; raise beta to at least {1 / cohort:.3g}"
        )
    if job.secure_aggregation is not None:
        check_secure_cohort(job.secure_aggregation, cohort, source)
    if isinstance(strategy, KrumFamilyConfig) and cohort < strategy.fewest_nodes():
        f = strategy.num_malicious_nodes
        need = f"more than 2·{f} + 2 = {2 * f + 2} updates per round"
        if isinstance(strategy, MultiKrumConfig):
            need += (
                f" and at least num_nodes_to_select + num_malicious_nodes = "
                f"{strategy.num_nodes_to_select + f}"
            )
        raise ValueError(
            f"strategy '{strategy.name}' with num_malicious_nodes = {f} needs {need}, "
            f"but a round has {cohort} nodes ({source}); lower num_malicious_nodes"
            + (" or num_nodes_to_select" if isinstance(strategy, MultiKrumConfig) else "")
            + " or add nodes"
        )
