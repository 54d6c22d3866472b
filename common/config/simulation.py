"""The `[simulation]` block: a consortium faked on one machine (simulation only).

Its node count and names, its data (`simulation_data`), the resources of
Flower's simulation engine, and what the lab injects: faults (dropouts,
stragglers, crashes), Byzantine adversaries, canaries for a privacy audit.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from consortia.common.config.simulation_data import DataConfig, PartitionConfig
from consortia.common.config.strict import StrictModel


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
