"""Byzantine nodes of the simulation lab: honest DP-SGD, then a poisoned update.

`attack` is a ClientApp mod applied (by `consortia.simulations.lab`) to the
train handler of simulated nodes only; a deployed node never runs it. The
adversaries are `fraction` of the nodes, chosen from the scenario seed
(`adversary_names`, which the coordinator uses too: metrics.json lists the
adversaries that sent an update each round, since the simulation knows).

An adversary trains like every node (Poisson sampling, clipping, noise) and
records its honest privacy spend before it replies; the reply's metrics are
the honest ones. What it changes is the model it sends, from the honest DP
update Δ = local − global:

- 'sign_flip': global − Δ;
- 'scale': global + factor·Δ;
- 'noise': local + N(0, std²) per weight (drawn from seed, node, round);
- 'label_flip': no change after training; the node trains on its training
  labels flipped, class c → C − 1 − c (its test split stays honest).

Only floating-point arrays are attacked; integer buffers go out as trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from consortia.common import protocol as p
from consortia.common.arrays import LabeledArrays
from consortia.common.config import AdversariesConfig, SimulationConfig
from consortia.simulations.faults import (
    STREAM_ADVERSARIES,
    STREAM_ATTACK_NOISE,
    chosen_nodes,
    lab_node,
    node_rng,
)
from consortia.simulations.node_data import NodeData

LABEL_FLIP_KEY = "consortia.lab.label-flip"
"""A train message's record that tells the lab's virtual node to flip its training labels.

Only the lab's `attack` mod sets it, and only the lab's virtual node reads
it: the node code that deployments run has no poisoning path.
"""


def adversary_names(simulation: SimulationConfig, seed: int) -> frozenset[str]:
    """The scenario's Byzantine nodes (empty without `[simulation.adversaries]`)."""
    if simulation.adversaries is None:
        return frozenset()
    return chosen_nodes(simulation, seed, simulation.adversaries.fraction, STREAM_ADVERSARIES)


# ------------------------------------------------------------ the attacks


def sign_flip(global_arrays: ArrayRecord, local: ArrayRecord) -> ArrayRecord:
    """global − (local − global): the honest update, reversed."""
    return _per_float_array(global_arrays, local, lambda g, w: 2.0 * g - w)


def scale(global_arrays: ArrayRecord, local: ArrayRecord, factor: float) -> ArrayRecord:
    """global + factor·(local − global): a boosted (or, negative, reversed) update."""
    return _per_float_array(global_arrays, local, lambda g, w: g + factor * (w - g))


def add_noise(local: ArrayRecord, std: float, rng: np.random.Generator) -> ArrayRecord:
    """local + N(0, std²) on every weight, in key order from `rng`."""
    return _per_float_array(local, local, lambda _, w: w + rng.normal(0.0, std, size=w.shape))


def _per_float_array(
    global_arrays: ArrayRecord,
    local: ArrayRecord,
    attack: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> ArrayRecord:
    """`attack(global, local)` in float64 on each floating array, cast back to its dtype."""
    attacked = {}
    for key, array in local.items():
        weights = array.numpy()
        if np.issubdtype(weights.dtype, np.floating):
            base = global_arrays[key].numpy().astype(np.float64)
            weights = attack(base, weights.astype(np.float64)).astype(weights.dtype)
        attacked[key] = Array(weights)
    return ArrayRecord(attacked)


def flip_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class c → C − 1 − c (for two classes: 0 ↔ 1), in the labels' dtype."""
    return (num_classes - 1 - labels).astype(labels.dtype)


def poisoned(data: NodeData) -> NodeData:
    """`data` with its training labels flipped; the test split and the fingerprint kept."""
    train = LabeledArrays(data.train.x, flip_labels(data.train.y, data.num_classes))
    return _Poisoned(
        train=train, test=data.test, num_classes=data.num_classes, honest=data.fingerprint()
    )


@dataclasses.dataclass(frozen=True)
class _Poisoned(NodeData):
    """An adversary's data: it still names the fingerprint it enrolled with."""

    honest: str = ""

    def fingerprint(self) -> str:
        return self.honest


# ---------------------------------------------------------------- the mod


def attack(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Train honestly, then replace the update as the scenario says.

    A label flip is not an update replaced: the message is marked, and the
    virtual node trains on flipped labels (virtual_node.py).
    """
    node = lab_node(message, context)
    if node is None or node.simulation.adversaries is None:
        return call_next(message, context)
    if node.name not in adversary_names(node.simulation, node.seed):
        return call_next(message, context)
    config = node.simulation.adversaries
    if config.attack == "label_flip":
        # Marks this message for the lab's virtual node, which then loads its data
        # with flipped training labels (virtual_node.py); the update goes out as trained.
        message.content[LABEL_FLIP_KEY] = ConfigRecord({"flip": True})
        return call_next(message, context)
    reply = call_next(message, context)
    if reply.has_error() or p.ARRAYS_KEY not in reply.content.array_records:
        return reply  # a refusal or a failure carries no update to poison
    rng = node_rng(node.seed, node.name, node.server_round, STREAM_ATTACK_NOISE)
    reply.content[p.ARRAYS_KEY] = poison_update(
        config,
        message.content.array_records[p.ARRAYS_KEY],
        reply.content.array_records[p.ARRAYS_KEY],
        rng,
    )
    return reply


def poison_update(
    config: AdversariesConfig,
    global_arrays: ArrayRecord,
    local: ArrayRecord,
    rng: np.random.Generator,
) -> ArrayRecord:
    """The model an adversary sends instead of its honest `local` one."""
    if config.attack == "sign_flip":
        return sign_flip(global_arrays, local)
    if config.attack == "scale":
        assert config.factor is not None  # the config's validator guarantees it
        return scale(global_arrays, local, config.factor)
    if config.attack == "noise":
        assert config.std is not None
        return add_noise(local, config.std, rng)
    return local  # 'label_flip' poisons the data, not the update
