"""Typed configuration of a federated job and of a simulation scenario.

A *job* says what the federation trains and under which privacy rules; it is
the same in simulation and deployment. A *scenario* is a job plus a
`[simulation]` block that says how to fake the consortium on one machine (how
many nodes, which bundled data, how it is split). Every model forbids unknown
keys: a typo in a privacy setting must never be silently ignored.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from consortia.common.secagg.graph import default_degree, effective_degree


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


class StatisticsConfig(StrictModel):
    """A federated statistics query (`consortia job stats`): what each node releases, how noisy.

    Each node releases its label counts, per-feature histograms over `bins`
    equal bins of each feature's public range, the clipped sums and sums of
    squares behind means and variances, its missing-value counts and, with
    `model`, per-class (and per-`group_column`) counts of correct
    predictions: every block under the Gaussian mechanism with noise std
    σ × the block's L2 sensitivity. Give `noise_multiplier` (σ) or
    `target_epsilon` (ε of the whole query at the node's δ; the node derives
    σ). Ranges come from `ranges`, else from the node's schema (deployment)
    or the bundled source's public scale (simulation); a feature with no
    public range is not released (a range read off the data would leak it).
    """

    noise_multiplier: float | None = Field(default=None, gt=0)
    target_epsilon: float | None = Field(default=None, gt=0)
    bins: int = Field(default=10, ge=2, le=200, description="histogram bins per feature")
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="feature name -> [low, high] of its histogram"
    )
    features: tuple[str, ...] | None = Field(
        default=None, description="features to describe (default: every one with a range)"
    )
    min_count: float = Field(
        default=10.0, ge=0, description="noisy counts below this are suppressed in the report"
    )
    confidence: float = Field(default=0.99, gt=0.5, lt=1, description="level of the error bars")
    model: str | None = Field(
        default=None,
        description="a run folder whose final model's per-class and per-node accuracy the "
        "nodes release (relative: to the coordinator's runs folder, or the working folder)",
    )
    group_column: str | None = Field(
        default=None, description="category column of the schema for per-group accuracy"
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> StatisticsConfig:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("set exactly one of 'target_epsilon' or 'noise_multiplier'")
        for name, (low, high) in self.ranges.items():
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"ranges.{name}: [{low}, {high}] is not a range (low < high)")
        if self.group_column is not None and self.model is None:
            raise ValueError("'group_column' needs 'model' (it splits the model's accuracy)")
        return self


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
# Aggregators that need every update in the clear (so not secure aggregation).
ROBUST_STRATEGIES = ("trimmed_mean", "median", "krum", "multikrum")


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


# ----------------------------------------------------------- secure aggregation


class SecureAggregationConfig(StrictModel):
    """`[secure_aggregation]`: SecAgg+ in every training round (docs/secure-aggregation.md).

    `neighbours` (k): each node shares its secrets with, and masks against, k
    others of the round's cohort (a circulant graph over a random order);
    default 2·⌈log2 n⌉, at most n − 1 (then every pair masks: the original
    SecAgg). An odd k is rounded up to even (the graph joins each node to k/2
    on either side). `threshold` (t): shares needed to rebuild a node's
    secret; a round survives up to k − t dropped neighbours per node.
    Default ⌊k/2⌋ + 1; it must exceed k/2, so that no coordinator can collect
    t shares of a node's seed *and* t of its key from disjoint neighbours. `bits`: word size of the
    fixed-point sum (32: half the traffic; 64: a step 2^32 times finer).
    `on_failure`: a round whose masks cannot be removed (too many dropouts)
    either stops the run or leaves the model unchanged and goes on.
    """

    neighbours: int | None = Field(default=None, ge=1, description="k, per node")
    threshold: int | None = Field(default=None, ge=1, description="t, shares to rebuild a secret")
    bits: Literal[32, 64] = 32
    on_failure: Literal["stop", "skip-round"] = "stop"

    def graph_for(self, cohort: int) -> tuple[int, int]:
        """(k, t) of a round of `cohort` nodes; ValueError if the set t cannot work there."""
        degree = effective_degree(self.neighbours or default_degree(cohort), cohort)
        return degree, self.threshold_for(degree)

    def threshold_for(self, degree: int) -> int:
        """t for a round whose graph has `degree` (raises if the set t cannot work with it)."""
        if self.threshold is None:
            return degree // 2 + 1
        if not degree / 2 < self.threshold <= degree:
            raise ValueError(
                f"secure_aggregation.threshold = {self.threshold} does not fit a round with "
                f"{degree} neighbours per node: it must be above {degree / 2:g} and at most "
                f"{degree}"
            )
        return self.threshold


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


def check_secure_cohort(settings: SecureAggregationConfig, cohort: int, source: str) -> None:
    """Raise ValueError if a secure round of `cohort` nodes cannot be set up as configured."""
    if cohort < 2:
        raise ValueError(
            f"secure aggregation needs at least 2 nodes per round ({source}: {cohort})"
        )
    try:
        settings.graph_for(cohort)
    except ValueError as exc:
        raise ValueError(
            f"{exc} ({source}: {cohort} nodes; an odd `neighbours` is rounded up to even)"
        ) from None


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


# Data sources that ship with scikit-learn: nothing to point at, so no `path`.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class ImageNormalization(StrictModel):
    """Public per-channel constants that image pixels are standardised with.

    A model sees (pixel on [0, 1] − mean) / std per channel: `mean` and `std`
    are on the [0, 1] pixel scale (uint8 pixels / 255). They must be public,
    published with the dataset (MNIST's 0.1307 / 0.3081) or agreed by the
    consortium, never computed from one node's records: then every node
    scales alike and nothing of its data is spent on it. One value stands
    for every channel.
    """

    mean: tuple[FiniteFloat, ...] = Field(min_length=1)
    std: tuple[Annotated[FiniteFloat, Field(gt=0)], ...] = Field(min_length=1)

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_value_for_all(cls, value: object) -> object:
        return (value,) if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _same_length(self) -> ImageNormalization:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"'mean' gives {len(self.mean)} values and 'std' {len(self.std)}; give one "
                "value for every channel, or one for all"
            )
        return self

    def per_channel(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) for images of `channels` channels; ValueError if the counts differ."""
        if len(self.mean) == 1:
            return self.mean * channels, self.std * channels
        if len(self.mean) != channels:
            raise ValueError(
                f"'mean' and 'std' give {len(self.mean)} values for images of {channels} "
                f"channel{'' if channels == 1 else 's'}; give one per channel, or one for all"
            )
        return self.mean, self.std


BUNDLED_SOURCES = ("breast_cancer", "digits")
DEFAULT_TEST_FRACTION = 0.2


class DataConfig(StrictModel):
    """Where the simulated consortium's data comes from.

    - 'breast_cancer', 'digits': scikit-learn's bundled sets;
    - 'idx': an MNIST-style folder of IDX files at `path` (its t10k files, when
      present, are the coordinator's centralized test set);
    - 'files': one CSV or Parquet file per node (`files`, in node order), read
      with the node onboarding's schema (`schema_file`, a dataset.toml): a
      *natural* partition, as a real consortium has it, so no
      `[simulation.partition]` applies and each node's train/test split is the
      schema's `[split]`.

    `path` may stay unset in the file for 'idx' and 'files' (`consortia
    simulate --data PATH` fills it): a scenario can ship without the location
    of data that lives elsewhere on every machine. For 'files' it is the
    folder the files are read from (default: the scenario file's folder).
    Relative paths in a scenario file are resolved from the file's folder.
    """

    source: Literal["breast_cancer", "digits", "idx", "files"] = "breast_cancer"
    path: str | None = Field(
        default=None,
        description="'idx': the folder with the IDX files; 'files': the folder holding `files`",
    )
    files: tuple[str, ...] | None = Field(
        default=None, description="'files': one CSV or Parquet file per node, in node order"
    )
    schema_file: str | None = Field(
        default=None, description="'files': the dataset.toml (node onboarding schema) they follow"
    )
    test_fraction: float = Field(default=DEFAULT_TEST_FRACTION, gt=0, lt=1)
    max_records: int | None = Field(
        default=None,
        ge=1,
        description="partition a seeded random subset of this many pool records (faster runs)",
    )
    normalize: ImageNormalization | None = Field(
        default=None,
        description="'idx': public mean and std of the pixels on [0, 1]; unset, the pixels "
        "are used on their fixed [0, 1] scale",
    )

    @model_validator(mode="after")
    def _keys_fit_source(self) -> DataConfig:
        where = f"source = '{self.source}'"
        if self.normalize is not None and self.source != "idx":
            raise ValueError(
                f"{where} takes no [simulation.data.normalize] (public pixel constants for "
                "source = 'idx'); remove it"
            )
        if self.normalize is not None:
            try:
                self.normalize.per_channel(1)
            except ValueError as exc:
                raise ValueError(
                    f"[simulation.data.normalize]: IDX images are grayscale; {exc}"
                ) from None
        if self.source in BUNDLED_SOURCES and self.path is not None:
            raise ValueError(
                f"{where} is bundled with scikit-learn and takes no 'path' "
                "('path' is for the 'idx' and 'files' sources); remove it"
            )
        if self.source != "files":
            extra = [key for key in ("files", "schema_file") if getattr(self, key) is not None]
            if extra:
                raise ValueError(
                    f"{where} takes no {' or '.join(repr(k) for k in extra)} "
                    "(they are for source = 'files'); remove them"
                )
            return self
        if not self.files:
            raise ValueError(f"{where} needs 'files': one CSV or Parquet file per node")
        if len(set(self.files)) != len(self.files):
            raise ValueError("'files' lists a file twice: every node needs its own file")
        if self.schema_file is None:
            raise ValueError(
                f"{where} needs 'schema_file': the dataset.toml (columns, label, split) "
                "every node's file follows, as in `consortia node data add`"
            )
        if self.test_fraction != DEFAULT_TEST_FRACTION:
            raise ValueError(
                f"{where} splits each node's file with the schema's [split]; "
                "remove 'test_fraction' (set [split] test_fraction in the schema file)"
            )
        if self.max_records is not None:
            raise ValueError(f"{where} uses each node's whole file; remove 'max_records'")
        return self


PartitionMethod = Literal["iid", "dirichlet", "pathological", "quantity", "column"]

DEFAULT_ALPHA = 0.5
_OPTIONAL_PARTITION_KEYS = ("alpha", "classes_per_node", "column", "column_values")

# The keys each partition method reads (besides 'method' and 'min_records').
# 'alpha' is tolerated with 'iid' (ignored): scenarios and tests written before
# this check switch between 'dirichlet' and 'iid' without removing it.
_PARTITION_KEYS: dict[str, frozenset[str]] = {
    "iid": frozenset({"alpha"}),
    "dirichlet": frozenset({"alpha"}),
    "pathological": frozenset({"classes_per_node"}),
    "quantity": frozenset({"alpha"}),
    "column": frozenset({"column", "column_values"}),
}


class PartitionConfig(StrictModel):
    """How one dataset is split across the simulated nodes (see common/partition.py).

    - 'iid': a seeded shuffle cut into equal parts;
    - 'dirichlet': label skew, each class shared by proportions ~ Dirichlet(`alpha`);
    - 'pathological': each node holds exactly `classes_per_node` classes
      (the shard scheme of McMahan et al., 2017);
    - 'quantity': quantity skew, node sizes ∝ Dirichlet(`alpha`), labels IID;
    - 'column': the value of the feature `column` decides the node (tabular
      sources): values round-robin in sorted order, or `column_values[i]`
      lists the values of node i.

    A key that the chosen method does not read is an error, not ignored.
    """

    method: PartitionMethod = "dirichlet"
    alpha: float | None = Field(
        default=None,
        gt=0,
        description=f"Dirichlet concentration ('dirichlet', 'quantity'; default {DEFAULT_ALPHA})",
    )
    min_records: int = Field(default=10, ge=1, description="fewest records a node may get")
    classes_per_node: int | None = Field(
        default=None, ge=1, description="'pathological': classes each node holds"
    )
    column: str | None = Field(
        default=None, min_length=1, description="'column': the feature whose value picks the node"
    )
    column_values: tuple[tuple[float | int | str, ...], ...] | None = Field(
        default=None, description="'column': the column values of each node, in node order"
    )

    @model_validator(mode="after")
    def _keys_fit_method(self) -> PartitionConfig:
        given = [key for key in _OPTIONAL_PARTITION_KEYS if getattr(self, key) is not None]
        unused = [key for key in given if key not in _PARTITION_KEYS[self.method]]
        if unused:
            raise ValueError(
                f"method = '{self.method}' does not use {', '.join(repr(k) for k in unused)}; "
                "remove it or choose the method that reads it"
            )
        if self.method == "pathological" and self.classes_per_node is None:
            raise ValueError(
                "method = 'pathological' needs 'classes_per_node' (the classes each node holds)"
            )
        if self.method == "column" and self.column is None:
            raise ValueError(
                "method = 'column' needs 'column' (the feature whose value picks the node)"
            )
        if self.column_values is not None:
            empty = [i for i, values in enumerate(self.column_values) if not values]
            if empty:
                raise ValueError(
                    f"'column_values[{empty[0]}]' is empty; every node needs at least one value"
                )
            flat = [v for values in self.column_values for v in values]
            if len(set(flat)) != len(flat):
                raise ValueError("'column_values' lists a value for two nodes (or twice)")
        return self

    @property
    def concentration(self) -> float:
        """The Dirichlet concentration in effect ('dirichlet', 'quantity')."""
        return DEFAULT_ALPHA if self.alpha is None else self.alpha


class BackendConfig(StrictModel):
    """Resources of Flower's simulation engine (Ray)."""

    cpus_per_node: float = Field(default=1.0, gt=0)
    gpus_per_node: float | None = Field(
        default=None, ge=0, description="GPU share per virtual node; auto when unset"
    )
    ray_address: str | None = Field(default=None, description="join an existing Ray cluster")


class StragglersConfig(StrictModel):
    """`[simulation.faults.stragglers]`: a fixed share of slow nodes and their delay per round.

    The straggling nodes are `fraction` of the consortium (at least one),
    chosen from the scenario seed. Each round a straggler's extra delay is
    drawn from `delay` ('exponential' with `mean_s`, 'uniform' on
    [`low_s`, `high_s`]); one whose delay exceeds the job's `round_timeout_s`
    (the round deadline) trains, spends its privacy, and is reported as late:
    its update is not aggregated. Delays are simulated, not slept (see
    docs/simulation-lab.md).
    """

    fraction: float = Field(gt=0, le=1, description="share of the nodes that straggle")
    delay: Literal["exponential", "uniform"] = Field(
        description="distribution of a straggler's extra delay per round"
    )
    mean_s: float | None = Field(default=None, gt=0, description="'exponential': mean delay (s)")
    low_s: float | None = Field(default=None, ge=0, description="'uniform': shortest delay (s)")
    high_s: float | None = Field(default=None, gt=0, description="'uniform': longest delay (s)")

    @model_validator(mode="after")
    def _parameters_fit_the_delay(self) -> StragglersConfig:
        if self.delay == "exponential":
            _only_with(self, "exponential", needed=("mean_s",), unused=("low_s", "high_s"))
        else:
            _only_with(self, "uniform", needed=("low_s", "high_s"), unused=("mean_s",))
            assert self.low_s is not None and self.high_s is not None
            if self.low_s > self.high_s:
                raise ValueError(f"low_s ({self.low_s:g}) exceeds high_s ({self.high_s:g})")
        return self


class FaultsConfig(StrictModel):
    """`[simulation.faults]`: nodes that drop out, straggle or crash (simulation only).

    Every draw derives from (scenario seed, node, round), so a scenario
    replays the same faults. `dropout`: a node is offline for the round (no
    training, no privacy spent, no reply). `crash`: a node that trained
    crashes after recording its privacy spend and before its update leaves:
    it has spent that ε and contributes nothing.
    """

    dropout: float = Field(
        default=0.0, ge=0, lt=1, description="probability per node and round of not answering"
    )
    crash: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="probability per node and round of crashing after its spend is recorded",
    )
    stragglers: StragglersConfig | None = None


class AdversariesConfig(StrictModel):
    """`[simulation.adversaries]`: Byzantine nodes and their attack (simulation only).

    `fraction` of the nodes (round(fraction × nodes), at least one) are
    chosen from the scenario seed. Each trains honestly with DP-SGD and
    records its honest privacy spend; then 'sign_flip' sends
    global − (local − global), 'scale' sends global + factor·(local − global),
    'noise' adds N(0, std²) to every weight; 'label_flip' instead trains on
    its labels flipped (class c → C − 1 − c).
    """

    fraction: float = Field(gt=0, lt=1, description="share of the nodes that are Byzantine")
    attack: Literal["sign_flip", "scale", "noise", "label_flip"]
    factor: float | None = Field(default=None, description="'scale': factor s on local − global")
    std: float | None = Field(default=None, gt=0, description="'noise': std of the added noise")

    @model_validator(mode="after")
    def _parameters_fit_the_attack(self) -> AdversariesConfig:
        needed = {"scale": ("factor",), "noise": ("std",)}.get(self.attack, ())
        unused = tuple(name for name in ("factor", "std") if name not in needed)
        _only_with(self, self.attack, needed=needed, unused=unused)
        if self.factor is not None and (not math.isfinite(self.factor) or self.factor == 1):
            raise ValueError(
                f"factor must be a finite number other than 1 (1 is the honest update), "
                f"got {self.factor:g}"
            )
        return self


def _only_with(
    model: BaseModel, kind: str, needed: tuple[str, ...], unused: tuple[str, ...]
) -> None:
    """ValueError naming the parameters `kind` needs but lacks, or has but does not use."""
    missing = [f"'{name}'" for name in needed if getattr(model, name) is None]
    if missing:
        raise ValueError(f"'{kind}' needs {' and '.join(missing)}")
    extra = [f"'{name}'" for name in unused if getattr(model, name) is not None]
    if extra:
        raise ValueError(f"'{kind}' takes no {' or '.join(extra)}")


class CanaryConfig(StrictModel):
    """`[simulation.canaries]`: crafted records for a canary audit (docs/privacy-audit.md).

    `count` canaries are drawn from the scenario seed: features uniform over
    each feature's range in the data, labels uniform over the classes, so
    only memorisation can fit them. Each goes into node `node`'s training
    data with probability 1/2 (a seeded coin); `consortia audit privacy`
    then tests which ones the model saw.
    """

    count: int = Field(ge=2, le=100_000, description="canaries drawn; about half are trained on")
    node: int = Field(default=1, ge=1, description="1-based index of the node that holds them")


class SimulationConfig(StrictModel):
    """The `[simulation]` block: a consortium faked on one machine."""

    nodes: int = Field(default=5, ge=2, le=100_000)
    node_names: tuple[str, ...] | None = None
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    backend: BackendConfig = BackendConfig()
    faults: FaultsConfig | None = None
    adversaries: AdversariesConfig | None = None
    canaries: CanaryConfig | None = None

    @model_validator(mode="after")
    def _canary_node_exists(self) -> SimulationConfig:
        if self.canaries is not None and self.canaries.node > self.nodes:
            raise ValueError(
                f"'canaries.node' is {self.canaries.node} but there are {self.nodes} nodes"
            )
        return self

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

    def unused_settings(self) -> tuple[tuple[str, ...], ...]:
        """Paths (under `simulation`) of settings that hold a default but that the run never reads.

        A 'files' source is partitioned by its files (one per node) and split
        by its schema's `[split]`, so the default `[simulation.partition]`
        (method 'dirichlet') and `test_fraction` (0.2) describe nothing it
        does: a manifest must not record them as if they applied.
        """
        if self.data.source == "files":
            return (("partition",), ("data", "test_fraction"), ("data", "max_records"))
        return ()

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

    @model_validator(mode="after")
    def _attacks_need_clear_updates(self) -> ScenarioConfig:
        if self.secure_aggregation is not None and self.simulation.adversaries is not None:
            raise ValueError(
                "'[simulation.adversaries]' alter updates in the clear, and "
                "'[secure_aggregation]' hides them (and rules out the robust aggregators "
                "that resist attacks): use one or the other"
            )
        return self

    def job(self) -> JobConfig:
        """The deployable part of the scenario (everything but `[simulation]`)."""
        return JobConfig.model_validate(self.model_dump(exclude={"simulation"}))
