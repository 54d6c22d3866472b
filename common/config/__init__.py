"""Typed configuration of a federated job and of a simulation scenario: the one import point.

A *job* says what the federation trains and under which privacy rules; it is
the same in simulation and deployment. A *scenario* is a job plus a
`[simulation]` block that says how to fake the consortium on one machine (how
many nodes, which bundled data, how it is split). Every model forbids unknown
keys: a typo in a privacy setting must never be silently ignored.

Import from here (`consortia.common.config`), not from the modules, which hold
one concern each and import one another, never this package:
- `strict`: `StrictModel`, the base of every model;
- `privacy`: `[privacy]` (DP-SGD), and the ranges of every privacy setting;
- `training`: `[model]`, `[training]`;
- `strategy`: `[strategy]` (the aggregators); `update_checks`: `[update_checks]`;
- `secure_aggregation`: `[secure_aggregation]` (SecAgg+);
- `statistics`: `[label_histogram]`, `[statistics]` (DP releases of data statistics);
- `job`: `JobConfig`, which gathers the blocks above, and `check_cohort`;
- `scaling`: public image constants (`normalize` tables);
- `simulation_data`: `[simulation.data]`, `[simulation.partition]`;
- `simulation`: the rest of `[simulation]` (backend, faults, adversaries, canaries);
- `scenario`: `ScenarioConfig`, a job plus its `[simulation]`.
"""

from consortia.common.config.job import JobConfig, check_cohort
from consortia.common.config.privacy import (
    MAX_CLIPPING_NORM,
    MAX_DELTA,
    MAX_EPSILON,
    MAX_NOISE_MULTIPLIER,
    MIN_DELTA,
    ClippingNorm,
    Delta,
    Epsilon,
    NoiseMultiplier,
    PrivacyConfig,
)
from consortia.common.config.scaling import ImageNormalization
from consortia.common.config.scenario import ScenarioConfig
from consortia.common.config.secure_aggregation import SecureAggregationConfig, check_secure_cohort
from consortia.common.config.simulation import (
    AdversariesConfig,
    BackendConfig,
    CanaryConfig,
    FaultsConfig,
    SimulationConfig,
    StragglersConfig,
)
from consortia.common.config.simulation_data import (
    BUNDLED_SOURCES,
    DEFAULT_ALPHA,
    DEFAULT_TEST_FRACTION,
    DataConfig,
    PartitionConfig,
    PartitionMethod,
)
from consortia.common.config.statistics import LabelHistogramConfig, StatisticsConfig
from consortia.common.config.strategy import (
    ROBUST_STRATEGIES,
    FedAdamConfig,
    FedAvgConfig,
    FedMedianConfig,
    FedProxConfig,
    FedTrimmedAvgConfig,
    FedYogiConfig,
    KrumConfig,
    KrumFamilyConfig,
    MultiKrumConfig,
    StrategyConfig,
)
from consortia.common.config.strict import StrictModel
from consortia.common.config.training import ModelConfig, TrainingConfig
from consortia.common.config.update_checks import UpdateChecksConfig

__all__ = [
    "BUNDLED_SOURCES",
    "DEFAULT_ALPHA",
    "DEFAULT_TEST_FRACTION",
    "MAX_CLIPPING_NORM",
    "MAX_DELTA",
    "MAX_EPSILON",
    "MAX_NOISE_MULTIPLIER",
    "MIN_DELTA",
    "ROBUST_STRATEGIES",
    "AdversariesConfig",
    "BackendConfig",
    "CanaryConfig",
    "ClippingNorm",
    "DataConfig",
    "Delta",
    "Epsilon",
    "FaultsConfig",
    "FedAdamConfig",
    "FedAvgConfig",
    "FedMedianConfig",
    "FedProxConfig",
    "FedTrimmedAvgConfig",
    "FedYogiConfig",
    "ImageNormalization",
    "JobConfig",
    "KrumConfig",
    "KrumFamilyConfig",
    "LabelHistogramConfig",
    "ModelConfig",
    "MultiKrumConfig",
    "NoiseMultiplier",
    "PartitionConfig",
    "PartitionMethod",
    "PrivacyConfig",
    "ScenarioConfig",
    "SecureAggregationConfig",
    "SimulationConfig",
    "StatisticsConfig",
    "StragglersConfig",
    "StrategyConfig",
    "StrictModel",
    "TrainingConfig",
    "UpdateChecksConfig",
    "check_cohort",
    "check_secure_cohort",
]
