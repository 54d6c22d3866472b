"""The simulation lab's ClientApp: consortia's node with the scenario's faults and adversaries.

Applied by `consortia.server.simulation` only; deployed nodes run
`consortia.client.app` as it is. The mods read the scenario from each
message's task (as the node reads its data description), so they run in
Ray's actors with nothing but the message and the node's Context.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from consortia.common.config import SimulationConfig
from consortia.common.secagg.wire import MESSAGE_ACTION
from consortia.common.statistics import MESSAGE_ACTION as STATISTICS_ACTION
from consortia.simulations.adversaries import attack
from consortia.simulations.faults import evaluate_faults, secure_train_faults, train_faults


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
