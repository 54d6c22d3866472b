"""Deterministic choice of the nodes that take part in a round."""

from __future__ import annotations

import numpy as np

from consortia.server.rounds.roster import Roster

_PURPOSE = {"train": 1, "evaluate": 2}


class Cohort:
    """Samples `per_round` nodes per round from the roster with a seeded generator.

    The draw depends only on (seed, round, purpose) and the sorted names, never
    on Flower's random node ids, so the same seed picks the same nodes.
    """

    def __init__(self, roster: Roster, per_round: int | None, seed: int) -> None:
        self.roster = roster
        self.per_round = min(per_round or len(roster.nodes), len(roster.nodes))
        self.seed = seed

    def sample(self, server_round: int, purpose: str) -> list[int]:
        """Node ids of the round's cohort, in name order."""
        nodes = self.roster.nodes
        if self.per_round == len(nodes):
            return [n.node_id for n in nodes]
        rng = np.random.default_rng([self.seed, server_round, _PURPOSE[purpose]])
        chosen = np.sort(rng.choice(len(nodes), size=self.per_round, replace=False))
        return [nodes[i].node_id for i in chosen]
