"""Faults of the simulation lab: virtual nodes that drop out, straggle past the deadline, or crash.

A ClientApp mod (`train_faults`, `evaluate_faults`) applied around the
ClientApp by `consortia.simulations.lab`, in simulations only: a deployed
node never runs this code. Every draw derives from (scenario seed, node
name, round) and one independent stream per fault kind, so a scenario
replays the same faults, and raising one probability never moves another
fault's draws.

How each fault reaches the coordinator. A node that does not answer would
cost the round its whole `round_timeout_s` of waiting, and on the Ray
backend a sleeping virtual node also holds one of the few actors that serve
every node, so other nodes would miss the deadline too. The mod therefore
answers at once with a reply shaped like a refusal (`protocol.refusal_record`:
no update, a code and a reason): the strategy screens it out like any
declined round, nothing is aggregated from the node, and the coordinator
gives the failure the kind its code stands for (`protocol.FAULT_KINDS`:
dropout, late, crash), which the run log files under `dropouts`,
`stragglers`, `crashes` in metrics.json, not as a refusal, a crash of
Flower or a timeout. The coordinator needs nothing of this module for it.
The replies carry what the node would have been seen to do:

- dropout (`simulated-dropout`): the node is offline for the round (its
  train and its evaluate message); it trains nothing and spends nothing.
- straggler past the deadline (`simulated-straggler`): the node trained,
  recorded its spend, and its update would arrive after the deadline. Its
  delay is simulated, not slept. The late reply still tells the coordinator
  the spend (as a late reply would once it arrives): ε in metrics.json is the
  node's true spend.
- crash (`simulated-crash`): the node crashes after recording its privacy
  spend and before its update leaves. That spend is real: the ledger (here
  the node's Context) keeps it, and metrics.json counts it. The crash is not
  raised as an exception: Flower's simulation drops a raising ClientApp's
  Context, so the virtual node would forget a spend a real node's durable
  ledger keeps. A crash *before* the spend is recorded releases nothing
  (the partly trained model never leaves the node), which for accounting
  and aggregation is a dropout.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from consortia.common import protocol as p
from consortia.common.config import FaultsConfig, SimulationConfig, StragglersConfig
from consortia.common.secagg.wire import SECAGG_KEY

# The codes of the fault replies; the coordinator files them by `protocol.FAULT_KINDS`.
DROPOUT = p.RefusalCode.SIMULATED_DROPOUT
LATE = p.RefusalCode.SIMULATED_STRAGGLER
CRASH = p.RefusalCode.SIMULATED_CRASH

# Random streams. Per (seed, node, round): one per fault kind, and the adversaries'
# noise. Per scenario (seed only): which nodes straggle, which are adversaries.
STREAM_DROPOUT = 1
STREAM_CRASH = 2
STREAM_DELAY = 3
STREAM_ATTACK_NOISE = 4
STREAM_STRAGGLERS = 11
STREAM_ADVERSARIES = 12

# What a fault reply keeps of the node's train metrics: its privacy accounting only.
_SPEND_KEYS = (p.EPSILON, p.DELTA, p.NOISE_MULTIPLIER, p.SAMPLE_RATE, p.STEPS)


# ------------------------------------------------------------------ draws


def node_rng(seed: int, node: str, server_round: int, stream: int) -> np.random.Generator:
    """The generator of one (node, round, stream): independent of every other triple."""
    words = [seed, zlib.crc32(node.encode()), server_round, stream]
    return np.random.default_rng(np.random.SeedSequence(words))


def node_count(fraction: float, nodes: int) -> int:
    """round(fraction × nodes), at least one: a configured share never rounds to no node."""
    return max(1, math.floor(fraction * nodes + 0.5))


@lru_cache(maxsize=16)
def chosen_nodes(
    simulation: SimulationConfig, seed: int, fraction: float, stream: int
) -> frozenset[str]:
    """The names of `fraction` of the nodes, drawn once per scenario from (seed, stream).

    Cached: every message of a run asks again, and a permutation of a large
    consortium's nodes is not free.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
    order = rng.permutation(simulation.nodes)[: node_count(fraction, simulation.nodes)]
    return frozenset(simulation.node_name(int(index)) for index in order)


@dataclass(frozen=True)
class Fate:
    """What happens to one node in one round."""

    dropout: bool
    crash: bool
    delay_s: float  # simulated extra delay; 0 for a node that does not straggle
    deadline_s: float

    @property
    def late(self) -> bool:
        return self.delay_s > self.deadline_s


def fate_of(
    faults: FaultsConfig,
    simulation: SimulationConfig,
    seed: int,
    node: str,
    server_round: int,
    deadline_s: float,
) -> Fate:
    """The node's faults in `server_round`; a pure function of its arguments."""
    dropout = node_rng(seed, node, server_round, STREAM_DROPOUT).random() < faults.dropout
    crash = node_rng(seed, node, server_round, STREAM_CRASH).random() < faults.crash
    delay = 0.0
    stragglers = faults.stragglers
    if stragglers is not None and node in chosen_nodes(
        simulation, seed, stragglers.fraction, STREAM_STRAGGLERS
    ):
        delay = draw_delay(stragglers, node_rng(seed, node, server_round, STREAM_DELAY))
    return Fate(dropout=dropout, crash=crash, delay_s=delay, deadline_s=deadline_s)


def draw_delay(stragglers: StragglersConfig, rng: np.random.Generator) -> float:
    """One straggler's extra delay in seconds, from the configured distribution."""
    if stragglers.delay == "exponential":
        assert stragglers.mean_s is not None  # the config's validator guarantees it
        return float(rng.exponential(stragglers.mean_s))
    assert stragglers.low_s is not None and stragglers.high_s is not None
    return float(rng.uniform(stragglers.low_s, stragglers.high_s))


# ------------------------------------------------------------ the node


@dataclass(frozen=True)
class LabNode:
    """A virtual node's view of one message: who it is, which round, the scenario."""

    name: str
    seed: int
    server_round: int
    deadline_s: float
    simulation: SimulationConfig


def lab_node(message: Message, context: Context) -> LabNode | None:
    """The virtual node and round a train/evaluate `message` is for; None outside a simulation."""
    config = message.content.config_records.get(p.CONFIG_KEY)
    if config is None or "partition-id" not in context.node_config:
        return None
    server_round = config.get(p.ROUND_KEY)
    if not isinstance(server_round, int):
        return None
    spec = p.TaskSpec.decode(config.get(p.TASK_KEY))
    if spec.simulation is None:
        return None
    return LabNode(
        name=spec.simulation.node_name(int(context.node_config["partition-id"])),
        seed=spec.job.seed,
        server_round=server_round,
        deadline_s=spec.job.round_timeout_s,
        simulation=spec.simulation,
    )


# -------------------------------------------------------------- the mods


def node_fate(faults: FaultsConfig, node: LabNode) -> Fate:
    """`fate_of` for the node and round a message is for."""
    return fate_of(
        faults, node.simulation, node.seed, node.name, node.server_round, node.deadline_s
    )


def train_faults(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Dropout before training; crash or a missed deadline after the spend is recorded."""
    drawn = _drawn_fate(message, context)
    if drawn is None:
        return call_next(message, context)
    node, fate = drawn
    if fate.dropout:
        return _dropout_reply(message, node, "train")
    reply = call_next(message, context)
    if reply.has_error() or p.read_refusal(reply.content) is not None:
        return reply  # the node declined or failed on its own: nothing left to fault
    if fate.crash:
        reason = (
            f"simulated crash in round {node.server_round} after the node recorded its "
            "privacy spend; its update never left"
        )
        return _fault_reply(message, CRASH, reason, _spend_of(reply))
    if fate.late:
        reason = (
            f"simulated straggler: {fate.delay_s:.1f} s late, past the round deadline "
            f"(round_timeout_s = {fate.deadline_s:g} s); it trained and spent its privacy"
        )
        return _fault_reply(message, LATE, reason, _spend_of(reply))
    return reply


def secure_train_faults(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """The same fates in a secure-aggregation round (`train.secagg`).

    A node offline for the round misses its setup message (it is not in the
    round's sum and spends nothing); a crash or a missed deadline strikes in
    stage 3, after the node trained and recorded its spend, before its
    masked update leaves (the coordinator then removes its pairwise masks
    from the sum). The key-sharing and unmasking stages pass untouched.
    """
    record = message.content.config_records.get(SECAGG_KEY)
    stage = record.get("stage") if record is not None else None
    if stage == "setup":
        drawn = _drawn_fate(message, context)
        if drawn is not None and drawn[1].dropout:
            return _dropout_reply(message, drawn[0], "train")
    elif stage == "masked-input":
        return train_faults(message, context, call_next)
    return call_next(message, context)


def evaluate_faults(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A node offline for the round misses its evaluation too (the same draw as for training)."""
    drawn = _drawn_fate(message, context)
    if drawn is not None and drawn[1].dropout:
        return _dropout_reply(message, drawn[0], "evaluate")
    return call_next(message, context)


def _drawn_fate(message: Message, context: Context) -> tuple[LabNode, Fate] | None:
    """The node and its fate this round; None outside the lab or without `[simulation.faults]`."""
    node = lab_node(message, context)
    if node is None or node.simulation.faults is None:
        return None
    return node, node_fate(node.simulation.faults, node)


def _dropout_reply(message: Message, node: LabNode, purpose: str) -> Message:
    reason = f"simulated dropout: offline in round {node.server_round}, no {purpose} reply"
    return _fault_reply(message, DROPOUT, reason, None)


def _fault_reply(
    message: Message, code: p.RefusalCode, reason: str, spend: MetricRecord | None
) -> Message:
    """A refusal-shaped reply (no update) with the fault's code, and the node's spend if any."""
    content: RecordDict = p.refusal_record(code, reason)
    if spend is not None:
        content[p.METRICS_KEY] = spend
    return Message(content, reply_to=message)


def _spend_of(reply: Message) -> MetricRecord | None:
    """The privacy accounting of a train reply (ε, δ, σ, q, steps); None without DP."""
    metrics = reply.content.metric_records.get(p.METRICS_KEY)
    if metrics is None or p.EPSILON not in metrics:
        return None
    return MetricRecord({key: metrics[key] for key in _SPEND_KEYS if key in metrics})
