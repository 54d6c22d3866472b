"""`[secure_aggregation]`: the SecAgg+ settings of a job.

Also `check_secure_cohort`: whether a round of a given size can be set up
with them (the protocol itself is `consortia.common.secagg` and the server's
and client's `secure_aggregation` modules).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from consortia.common.config.strict import StrictModel
from consortia.common.secagg.graph import default_degree, effective_degree


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
