"""The simulation lab: ClientApp mods (faults, adversaries), and what only it knows of a scenario.

Applied by `consortia.simulations.engine` only; deployed nodes run
`consortia.client.app` as it is. The mods read the scenario from each
message's task (as the node reads its data description), so they run in
Ray's actors with nothing but the message and the node's Context.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from consortia.common.arrays import LabeledArrays
from consortia.common.config import ScenarioConfig, SimulationConfig
from consortia.common.scaling import FeatureScaling
from consortia.common.secagg.wire import MESSAGE_ACTION
from consortia.common.statistics import MESSAGE_ACTION as STATISTICS_ACTION
from consortia.simulations.adversaries import adversary_names, attack
from consortia.simulations.faults import evaluate_faults, secure_train_faults, train_faults
from consortia.simulations.node_data import centralized_test_data, partition_label_counts
from consortia.simulations.sources import source_scaling


def lab_client_app(inner: ClientApp, simulation: SimulationConfig) -> ClientApp:
    """`inner` wrapped in the fault and attack mods; `inner` itself when the scenario has neither.

    Order on a train message: faults outermost (a dropped node never reaches
    training; a crash or a missed deadline replaces the reply, attacked or
    not), then the attack, then the node. A secure-aggregation round's
    messages get the faults at their stages (`secure_train_faults`); attacks
    need updates in the clear and are refused with secure aggregation (config).
    Queries (the roster, a statistics query) pass untouched.
    """
    if simulation.faults is None and simulation.adversaries is None:
        return inner
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return inner(message, context)

    @app.query(STATISTICS_ACTION)
    def statistics(message: Message, context: Context) -> Message:
        return inner(message, context)

    @app.train(mods=[train_faults, attack])
    def train(message: Message, context: Context) -> Message:
        return inner(message, context)

    @app.train(MESSAGE_ACTION, mods=[secure_train_faults])
    def train_secure(message: Message, context: Context) -> Message:
        return inner(message, context)

    @app.evaluate(mods=[evaluate_faults])
    def evaluate(message: Message, context: Context) -> Message:
        return inner(message, context)

    return app


class SimulationLab:
    """The coordinator's view of a scenario's lab side (`consortia.server.federation.ScenarioLab`).

    Handed to `run_federation` by the engine, so that the coordinator's code
    never imports the lab: the test set of centralised evaluation, the
    adversaries metrics.json names, the true label mix the report draws, the
    input scaling the manifest records.
    """

    def centralized_test_data(self, config: ScenarioConfig) -> LabeledArrays:
        return centralized_test_data(config.simulation, config.seed)

    def adversary_names(self, config: ScenarioConfig) -> frozenset[str]:
        return adversary_names(config.simulation, config.seed)

    def label_counts(self, config: ScenarioConfig) -> dict[str, tuple[int, ...]] | None:
        return partition_label_counts(config)

    def feature_scaling(self, config: ScenarioConfig) -> FeatureScaling:
        return source_scaling(config.simulation.data)


LAB = SimulationLab()
