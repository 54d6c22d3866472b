"""The communication graph of a SecAgg+ round: a random k-regular (Harary) graph.

Each node shares its secrets with, and masks against, only its k neighbours
(Bell et al., CCS 2020), so its work grows with k, not with the cohort. The
graph is the circulant Harary graph H(k, n) over a uniformly random order
of the cohort: node at position i is joined to positions i ± 1..k/2. It is
drawn by the coordinator per round, from the OS generator by default: nodes
do not know in advance whom they will be joined to.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

_SYSTEM = random.SystemRandom()


def default_degree(nodes: int) -> int:
    """k ≈ 2·⌈log2 n⌉ (even), at most n − 1: O(log n) as in Bell et al."""
    if nodes <= 1:
        return 0
    k = 2 * math.ceil(math.log2(nodes))
    return min(nodes - 1, k)


def effective_degree(requested: int, nodes: int) -> int:
    """The degree actually used: at most n − 1 (complete graph), else rounded up to even."""
    if requested >= nodes - 1:
        return nodes - 1
    return requested + requested % 2


def neighbours(
    nodes: Sequence[int], degree: int, rng: random.Random | None = None
) -> dict[int, tuple[int, ...]]:
    """Each node's neighbours (sorted) in a random graph of `degree` (see `effective_degree`)."""
    order = sorted(set(nodes))
    if len(order) != len(nodes):
        raise ValueError("duplicate node ids in the cohort")
    n = len(order)
    k = effective_degree(degree, n)
    (rng or _SYSTEM).shuffle(order)
    if k == n - 1:
        return {node: tuple(sorted(set(order) - {node})) for node in order}
    half = k // 2
    graph: dict[int, tuple[int, ...]] = {}
    for position, node in enumerate(order):
        near = {order[(position + d) % n] for d in range(-half, half + 1) if d}
        graph[node] = tuple(sorted(near))
    return graph
