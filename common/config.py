"""Typed configuration of a federated job and of a simulation scenario.

A *job* says what the federation trains and under which privacy rules; it is
the same in simulation and deployment. A *scenario* is a job plus a
`[simulation]` block that says how to fake the consortium on one machine (how
many nodes, which bundled data, how it is split). Every model forbids unknown
keys: a typo in a privacy setting must never be silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------- privacy


class PrivacyConfig(StrictModel):
    """Sample-level DP-SGD settings every node applies to its local training.

    Give either `target_epsilon` (the node calibrates its noise so that its ε
    after *all* planned rounds stays within it) or an explicit
    `noise_multiplier` (ε is then whatever the accountant says it is).
    """

    enabled: bool = True
    target_epsilon: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if not self.enabled:
            return self
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "set exactly one of 'target_epsilon' or 'noise_multiplier' "
                "(or enabled = false to train without DP)"
            )
        return self


class LabelHistogramConfig(StrictModel):
    """Ask each node once per run for its training labels' histogram, under the Gaussian mechanism.

    One record changes one count by 1, so the L2 sensitivity is 1 and the
    noise std is `noise_multiplier`. The release is charged to the node's ε
    (and calibrated into the job's target); a node shares it only if its
    policy allows.
    """

    noise_multiplier: float = Field(gt=0, description="std of the noise added to every count")


# -------------------------------------------------------------------- training


class TrainingConfig(StrictModel):
    """Local training on each node, per round.

    `device`: 'auto' trains on the GPU when CUDA is present, else on the CPU;
    'cpu' forces the CPU; 'cuda' insists on a GPU (an error without one).

    `dp_engine` picks how DP-SGD computes clipped per-sample gradients. The
    mechanism (Poisson sampling, flat clipping to `max_grad_norm`, Gaussian
    noise, one noisy step per Poisson batch) and so the privacy guarantee are
    the same for all three; only speed and memory differ:
    - 'auto': the fused path (`client/fused_dpsgd.py`, no per-sample gradient
      materialised) for Flatten/Linear/ReLU/Tanh stacks (`logreg`, `mlp`),
      Opacus' per-sample hooks for every other model;
    - 'opacus': always Opacus' per-sample hooks (grad_sample_mode="hooks");
    - 'ghost': Opacus' fast gradient clipping (grad_sample_mode="ghost"):
      Linear and Embedding layers get their per-sample gradient norms without
      materialising per-sample gradients (ghost clipping), other layers go
      through fast gradient clipping; a model with tied (shared) parameters
      cannot use it.

    `max_physical_batch_size` caps how many records go through the model at
    once under DP: a Poisson batch larger than it is processed in chunks
    whose clipped gradient sums are added up before the single noisy step
    (Opacus' `BatchMemoryManager` on the Opacus engines). The logical batch,
    the noise and the step count, hence the privacy accounting, are unchanged.
    With 'auto' a fused-path model is chunked in the fused path too rather
    than rerouted through Opacus: the fused path's memory grows with the batch
    like a plain step's, so the cap applies there as well, and a memory limit
    should not silently cost the fused path's speed. Without DP the setting
    is ignored (a plain batch is `batch_size` records, never more).
    """

    local_epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, description="expected (Poisson) batch size under DP")
    learning_rate: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_physical_batch_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "under DP, most records per forward/backward pass: larger Poisson batches are "
            "processed in chunks before their one noisy step (GPU memory; privacy unchanged)"
        ),
    )
    dp_engine: Literal["auto", "opacus", "ghost"] = Field(
        default="auto",
        description=(
            "DP-SGD implementation: 'auto' (fused for Linear-only models, else Opacus hooks), "
            "'opacus' (Opacus per-sample hooks), 'ghost' (Opacus fast gradient clipping)"
        ),
    )


class ModelConfig(StrictModel):
    """A model from consortia's registry, by name (never code from the wire)."""

    name: Literal["mlp", "logreg", "cnn"] = "mlp"
    hidden: tuple[int, ...] = (64,)


# -------------------------------------------------------------------- strategy


class FedAvgConfig(StrictModel):
    """Federated averaging (McMahan et al., 2017)."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(FedAvgConfig):
    """FedAvg plus a proximal term that keeps local models near the global one."""

    name: Literal["fedprox"] = "fedprox"  # type: ignore[assignment]
    proximal_mu: float = Field(default=0.01, ge=0)


class _FedOptConfig(FedAvgConfig):
    """Settings shared by Flower's server-side adaptive optimisers (FedOpt family).

    The node's learning rate (Flower's `eta_l`) is `training.learning_rate`.
    """

    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, description="adaptivity: added to the √v denominator")


class FedAdamConfig(_FedOptConfig):
    """Server-side Adam on the averaged update (Reddi et al., 2021)."""

    name: Literal["fedadam"] = "fedadam"  # type: ignore[assignment]
    eta: float = Field(default=0.05, gt=0, description="server learning rate")


class FedYogiConfig(_FedOptConfig):
    """Server-side Yogi on the averaged update (Reddi et al., 2021): Adam with additive v."""

    name: Literal["fedyogi"] = "fedyogi"  # type: ignore[assignment]
    eta: float = Field(default=0.01, gt=0, description="server learning rate")


class FedTrimmedAvgConfig(FedAvgConfig):
    """Coordinate-wise trimmed mean (Yin et al., 2018): drops each coordinate's extremes.

    `beta` of the updates is cut from each end of every coordinate (int(beta·n)
    updates per end), so up to that many arbitrary updates cannot drag the mean
    outside the range of the honest ones.
    """

    name: Literal["trimmed_mean"] = "trimmed_mean"  # type: ignore[assignment]
    beta: float = Field(
        default=0.2, gt=0, lt=0.5, description="fraction of updates trimmed from each end"
    )


class FedMedianConfig(FedAvgConfig):
    """Coordinate-wise median (Yin et al., 2018): robust while fewer than half are Byzantine."""

    name: Literal["median"] = "median"  # type: ignore[assignment]


class KrumConfig(FedAvgConfig):
    """Krum (Blanchard et al., 2017): the one update closest to its n − f − 2 neighbours.

    Its guarantee needs n > 2f + 2 updates in a round, f = `num_malicious_nodes`.
    """

    name: Literal["krum"] = "krum"  # type: ignore[assignment]
    num_malicious_nodes: int = Field(default=1, ge=0, description="f: Byzantine nodes tolerated")

    def fewest_nodes(self) -> int:
        """The smallest round Krum's guarantee holds for: n > 2f + 2."""
        return 2 * self.num_malicious_nodes + 3


class MultiKrumConfig(KrumConfig):
    """Multi-Krum: the mean of the `num_nodes_to_select` updates with the best Krum scores."""

    name: Literal["multikrum"] = "multikrum"  # type: ignore[assignment]
    num_nodes_to_select: int = Field(default=2, ge=1, description="m: updates averaged")

    def fewest_nodes(self) -> int:
        """n > 2f + 2 for the scores, and m ≤ n − f so that only honest-scored updates are kept."""
        return max(super().fewest_nodes(), self.num_nodes_to_select + self.num_malicious_nodes)


StrategyConfig = Annotated[
    FedAvgConfig
    | FedProxConfig
    | FedAdamConfig
    | FedYogiConfig
    | FedTrimmedAvgConfig
    | FedMedianConfig
    | KrumConfig
    | MultiKrumConfig,
    Field(discriminator="name"),
]


class UpdateChecksConfig(StrictModel):
    """The `[update_checks]` block: what a node's update must satisfy to be aggregated.

    Every update is checked before aggregation (array names, shapes, dtypes,
    finite values, and the L2 norm of local − global against a bound); a
    failing one is dropped with a reason, and the round goes on while at
    least `min_updates` remain. With DP (or the Adam optimiser) the norm bound
    is derived per reply from the job's training and privacy settings and
    the node's reported steps and noise (`consortia.server.update_checks`),
    times `norm_slack`; `max_update_norm` replaces it with a fixed bound.
    """

    max_update_norm: float | None = Field(
        default=None,
        gt=0,
        description="fixed bound on ‖local − global‖₂ over all arrays; replaces the derived one",
    )
    norm_slack: float = Field(
        default=1.5, ge=1, description="factor on the derived bound (unused with max_update_norm)"
    )
    min_updates: int = Field(
        default=1, ge=1, description="fewest accepted updates a round needs, or the run stops"
    )
    min_node_records: int = Field(
        default=1,
        ge=1,
        description=(
            "fewest training records any node is known to hold: tightens the derived bound "
            "for nodes whose data fits in one batch (their expected batch is their record count)"
        ),
    )


# ------------------------------------------------------------------------- job


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
    round_timeout_s: float = Field(default=3600.0, gt=0)
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig = PrivacyConfig(target_epsilon=1.0)
    strategy: StrategyConfig = FedAvgConfig()
    update_checks: UpdateChecksConfig = UpdateChecksConfig()
    label_histogram: LabelHistogramConfig | None = Field(
        default=None, description="DP label histograms from the nodes, to report label skew"
    )

    @model_validator(mode="after")
    def _strategy_fits_cohort(self) -> JobConfig:
        if self.clients_per_round is not None:
            check_cohort(self, self.clients_per_round, "clients_per_round")
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
    if isinstance(strategy, KrumConfig) and cohort < strategy.fewest_nodes():
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


# ------------------------------------------------------------------ simulation


class DataConfig(StrictModel):
    """Where the simulated consortium's data comes from."""

    source: Literal["breast_cancer", "digits", "idx"] = "breast_cancer"
    path: str | None = Field(default=None, description="folder with the IDX files (source = 'idx')")
    test_fraction: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _path_for_idx(self) -> DataConfig:
        if self.source == "idx" and not self.path:
            raise ValueError("source = 'idx' needs 'path' (the folder with the IDX files)")
        return self


class PartitionConfig(StrictModel):
    """How one dataset is split across the simulated nodes."""

    method: Literal["iid", "dirichlet"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0, description="Dirichlet concentration")
    min_records: int = Field(default=10, ge=1, description="fewest records a node may get")


class BackendConfig(StrictModel):
    """Resources of Flower's simulation engine (Ray)."""

    cpus_per_node: float = Field(default=1.0, gt=0)
    gpus_per_node: float | None = Field(
        default=None, ge=0, description="GPU share per virtual node; auto when unset"
    )
    ray_address: str | None = Field(default=None, description="join an existing Ray cluster")


class SimulationConfig(StrictModel):
    """The `[simulation]` block: a consortium faked on one machine."""

    nodes: int = Field(default=5, ge=2, le=100_000)
    node_names: tuple[str, ...] | None = None
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    backend: BackendConfig = BackendConfig()

    @model_validator(mode="after")
    def _names_match_nodes(self) -> SimulationConfig:
        if self.node_names is not None:
            if len(self.node_names) != self.nodes:
                raise ValueError(
                    f"'node_names' lists {len(self.node_names)} names but 'nodes' is {self.nodes}"
                )
            if len(set(self.node_names)) != len(self.node_names):
                raise ValueError("'node_names' must be unique")
        return self

    def node_name(self, partition_id: int) -> str:
        """Stable, human name of the simulated node holding `partition_id`."""
        if self.node_names is not None:
            return self.node_names[partition_id]
        width = len(str(self.nodes))
        return f"node-{partition_id + 1:0{width}d}"


class ScenarioConfig(JobConfig):
    """A job plus the simulated consortium it runs on."""

    simulation: SimulationConfig = SimulationConfig()

    @model_validator(mode="after")
    def _cohort_fits(self) -> ScenarioConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.simulation.nodes:
            raise ValueError(
                f"'clients_per_round' ({self.clients_per_round}) exceeds the "
                f"{self.simulation.nodes} simulated nodes"
            )
        if self.clients_per_round is None:
            check_cohort(self, self.simulation.nodes, "simulation.nodes")
        return self

    def job(self) -> JobConfig:
        """The deployable part of the scenario (everything but `[simulation]`)."""
        return JobConfig.model_validate(self.model_dump(exclude={"simulation"}))
