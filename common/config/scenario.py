"""`ScenarioConfig`: a job plus the `[simulation]` block that says how to fake its consortium.

What `consortia simulate` runs. It checks what spans the two: the job's
cohort against the simulated node count, attacks against secure aggregation.
"""

from __future__ import annotations

from pydantic import model_validator

from consortia.common.config.job import JobConfig, check_cohort
from consortia.common.config.simulation import SimulationConfig


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
