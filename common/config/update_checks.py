"""The `[update_checks]` block: what an update must satisfy to be aggregated.

The checks themselves are `consortia.server.rounds.update_checks`.
"""

from __future__ import annotations

from pydantic import Field

from consortia.common.config.strict import StrictModel


class UpdateChecksConfig(StrictModel):
    """The `[update_checks]` block: what a node's update must satisfy to be aggregated.

    Every update is checked before aggregation (array names, shapes, dtypes,
    finite values, and the L2 norm of local − global against a bound); a
    failing one is dropped with a reason, and the round goes on while at
    least `min_updates` remain. With DP (or the Adam optimiser) the norm bound
    is derived per reply from the job's training and privacy settings and
    the node's reported steps and noise (`consortia.server.rounds.update_checks`),
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
