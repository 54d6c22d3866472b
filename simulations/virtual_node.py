"""The lab's virtual node: consortia's own ClientApp, over a simulated node's data.

Kept from the deployed node (`consortia.client.app`): every handler — roster
query, DP-SGD training, secure stages, statistics, evaluation — and its
refusals. What changes is only where a message's node comes from: its data
is built deterministically from (scenario, seed, partition id), its privacy
history lives in the Flower Context (`JobAccount`, no ledger, no policy), and
a train message the lab's label-flip attack marked trains on flipped labels. The
lab's faults and the other attacks wrap this app as Flower mods
(`consortia.simulations.lab`).
"""

from __future__ import annotations

from flwr.app import Context, Message

from consortia.client.app import NodeView, node_app
from consortia.client.spend import JobAccount
from consortia.client.statistics import DataFacts, described
from consortia.common import protocol as p
from consortia.common.arrays import LabeledArrays, concat
from consortia.common.errors import FederationError
from consortia.simulations.adversaries import LABEL_FLIP_KEY, poisoned
from consortia.simulations.node_data import simulated_node_data, source_of
from consortia.simulations.sources import SourceData

__all__ = ["simulated_facts", "simulated_view", "virtual_node_app"]


def simulated_view(message: Message, context: Context) -> NodeView:
    """Virtual node `partition-id` of the scenario the message's task carries."""
    spec = p.TaskSpec.decode(message.content[p.CONFIG_KEY].get(p.TASK_KEY))
    simulation = spec.simulation
    if simulation is None or "partition-id" not in context.node_config:
        raise FederationError(
            "a virtual node needs a simulation task and Flower's 'partition-id' node config "
            "(run the scenario with `consortia simulate`)"
        )
    partition_id = int(context.node_config["partition-id"])
    name = simulation.node_name(partition_id)
    data = simulated_node_data(simulation, spec.job.seed, partition_id)
    if LABEL_FLIP_KEY in message.content.config_records:  # set by the lab's `attack` mod
        data = poisoned(data)
    return NodeView(
        name=name,
        train=data.train,
        test=data.test,
        num_classes=data.num_classes,
        fingerprint=data.fingerprint(),
        job=spec.job,
        account=JobAccount(context, spec.job),
        facts=lambda: simulated_facts(source_of(simulation), concat([data.train, data.test])),
    )


def simulated_facts(source: SourceData, data: LabeledArrays) -> DataFacts:
    """A simulated node: the bundled source's public scale; no raw file, so no missing values."""
    features = described(data.x)
    names = source.feature_names or tuple(f"x{j}" for j in range(features.shape[1]))
    return DataFacts(features=features, names=names, ranges=source.ranges, labels=data.y)


virtual_node_app = node_app(simulated_view)
"""Every virtual node of a simulation runs this ClientApp (wrapped in the lab's mods)."""
