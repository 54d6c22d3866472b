"""A resumed simulation gives its virtual nodes back their privacy history.

A simulated node keeps the job's DP releases in its Flower `Context`
(client/privacy_state.py), which lives only as long as the simulation
process. After a resume every virtual node would start with an empty
history and report ε for the rounds after the checkpoint alone. The
coordinator saw every release (each train reply carries its noise
multiplier, sample rate and steps; a shared label histogram is one Gaussian
release), and checkpoints keep them: this ClientApp wrapper writes a node's
releases into its fresh Context before the node handles its first message.
A deployed node needs none of this: its ledger is durable.
"""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from consortia.client.privacy_state import JobPrivacyState, load_state, save_state
from consortia.common import protocol as p
from consortia.common.privacy import Release
from consortia.simulations.virtual_node import virtual_node_app as client_app


def resumed_client_app(releases: dict[str, list[Release]]) -> ClientApp:
    """consortia's ClientApp, with each virtual node's `releases` restored into its Context."""
    app = ClientApp(mods=[functools.partial(_restore_history, releases)])

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return client_app(message, context)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return client_app(message, context)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return client_app(message, context)

    return app


def _restore_history(
    releases: dict[str, list[Release]],
    message: Message,
    context: Context,
    call_next: ClientAppCallable,
) -> Message:
    state = load_state(context)
    if state.noise_multiplier is None and not state.history:
        name = _node_name(message, context)
        history = releases.get(name, []) if name is not None else []
        if history:
            # The noise multiplier is left to the node: it calibrates it from the job as before.
            save_state(context, JobPrivacyState(history=list(history)))
    return call_next(message, context)


def _node_name(message: Message, context: Context) -> str | None:
    """The virtual node's name, as virtual_node.py derives it (partition id + scenario)."""
    config = message.content.get(p.CONFIG_KEY)
    if config is None or "partition-id" not in context.node_config:
        return None
    spec = p.TaskSpec.decode(config.get(p.TASK_KEY))
    if spec.simulation is None:
        return None
    return spec.simulation.node_name(int(context.node_config["partition-id"]))
