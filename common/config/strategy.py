"""The `[strategy]` block: how the coordinator aggregates a round's updates.

One model per aggregator, told apart by `name` (`StrategyConfig` is their
discriminated union); `ROBUST_STRATEGIES` are those that need every update
in the clear.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from consortia.common.config.strict import StrictModel


class _Strategy(StrictModel):
    """What every aggregator's settings have: the `name` that tells them apart.

    Each concrete model narrows `name` to its own literal (the discriminator);
    none derives from another concrete one, whose literal it could not narrow.
    """

    name: str


class FedAvgConfig(_Strategy):
    """Federated averaging (McMahan et al., 2017)."""

    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(_Strategy):
    """FedAvg plus a proximal term that keeps local models near the global one."""

    name: Literal["fedprox"] = "fedprox"
    proximal_mu: float = Field(default=0.01, ge=0)


class _FedOptConfig(_Strategy):
    """Settings shared by Flower's server-side adaptive optimisers (FedOpt family).

    The node's learning rate (Flower's `eta_l`) is `training.learning_rate`.
    """

    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, description="adaptivity: added to the √v denominator")


class FedAdamConfig(_FedOptConfig):
    """Server-side Adam on the averaged update (Reddi et al., 2021)."""

    name: Literal["fedadam"] = "fedadam"
    eta: float = Field(default=0.05, gt=0, description="server learning rate")


class FedYogiConfig(_FedOptConfig):
    """Server-side Yogi on the averaged update (Reddi et al., 2021): Adam with additive v."""

    name: Literal["fedyogi"] = "fedyogi"
    eta: float = Field(default=0.01, gt=0, description="server learning rate")


class FedTrimmedAvgConfig(_Strategy):
    """Coordinate-wise trimmed mean (Yin et al., 2018): drops each coordinate's extremes.

    `beta` of the updates is cut from each end of every coordinate (int(beta·n)
    updates per end), so up to that many arbitrary updates cannot drag the mean
    outside the range of the honest ones.
    """

    name: Literal["trimmed_mean"] = "trimmed_mean"
    beta: float = Field(
        default=0.2, gt=0, lt=0.5, description="fraction of updates trimmed from each end"
    )


class FedMedianConfig(_Strategy):
    """Coordinate-wise median (Yin et al., 2018): robust while fewer than half are Byzantine."""

    name: Literal["median"] = "median"


class KrumFamilyConfig(_Strategy):
    """What Krum and Multi-Krum share: f and the round size their guarantee needs."""

    num_malicious_nodes: int = Field(default=1, ge=0, description="f: Byzantine nodes tolerated")

    def fewest_nodes(self) -> int:
        """The smallest round Krum's guarantee holds for: n > 2f + 2."""
        return 2 * self.num_malicious_nodes + 3


class KrumConfig(KrumFamilyConfig):
    """Krum (Blanchard et al., 2017): the one update closest to its n − f − 2 neighbours.

    Its guarantee needs n > 2f + 2 updates in a round, f = `num_malicious_nodes`.
    """

    name: Literal["krum"] = "krum"


class MultiKrumConfig(KrumFamilyConfig):
    """Multi-Krum: the mean of the `num_nodes_to_select` updates with the best Krum scores."""

    name: Literal["multikrum"] = "multikrum"
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
