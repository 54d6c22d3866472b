"""Label skew across the nodes, from their DP-noised label histograms.

Nodes that share a histogram send class counts plus Gaussian noise; the
coordinator only post-processes them (no further privacy cost): negative
counts are clipped to zero, each node's counts normalised to proportions,
and each node's skew stated as its total-variation distance to the pooled
distribution (0: same mix as everyone; 1: disjoint classes).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from consortia.server.rounds.roster import Roster


class NodeLabels(BaseModel):
    """One node's label mix as the coordinator may know it."""

    proportions: tuple[float, ...] | None = None
    total_variation: float | None = None
    withheld: str | None = None


class LabelSkew(BaseModel):
    """manifest.json's `label_skew`: per node, the noisy label mix or why it is missing."""

    noise_multiplier: float
    pooled: tuple[float, ...] | None
    nodes: dict[str, NodeLabels]

    def lines(self) -> list[str]:
        """One line per node, for the terminal and the coordinator log."""
        out = [f"label skew (DP label histograms, σ = {self.noise_multiplier:g})"]
        for name, node in self.nodes.items():
            if node.proportions is None:
                out.append(f"  {name}: withheld ({node.withheld})")
                continue
            mix = " ".join(f"{v:.2f}" for v in node.proportions)
            out.append(f"  {name}: classes [{mix}]  distance to pooled {node.total_variation:.3f}")
        return out


def label_skew(roster: Roster, noise_multiplier: float) -> LabelSkew:
    """Summarise the histograms the nodes shared (post-processing only)."""
    counts = {
        n.name: np.clip(np.asarray(n.label_histogram), 0.0, None)
        for n in roster.nodes
        if n.label_histogram is not None
    }
    pooled = _proportions(np.sum(list(counts.values()), axis=0)) if counts else None
    nodes: dict[str, NodeLabels] = {}
    for node in roster.nodes:
        if node.name not in counts:
            reason = node.histogram_withheld or "the node sent no label histogram"
            nodes[node.name] = NodeLabels(withheld=reason)
            continue
        mix = _proportions(counts[node.name])
        if mix is None or pooled is None:  # pooled exists whenever one node's mix does
            nodes[node.name] = NodeLabels(withheld="every noisy count was ≤ 0 (noise > counts)")
            continue
        nodes[node.name] = NodeLabels(
            proportions=tuple(float(v) for v in mix),
            total_variation=0.5 * float(np.abs(mix - pooled).sum()),
        )
    return LabelSkew(
        noise_multiplier=noise_multiplier,
        pooled=None if pooled is None else tuple(float(v) for v in pooled),
        nodes=nodes,
    )


def _proportions(counts: np.ndarray) -> np.ndarray | None:
    total = float(counts.sum())
    return counts / total if total > 0 else None
