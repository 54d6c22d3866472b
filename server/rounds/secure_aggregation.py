"""The coordinator's side of SecAgg+: it relays keys and shares and learns only the sum.

One training round under secure aggregation replaces the plain round's single
train exchange by four (common/secagg/wire.py, client/secure_aggregation.py):

    U0 --setup-->                U1 (public keys; planned DP release: the range)
       --share-keys-->           U2 (sealed shares of seed and mask key, per neighbour)
       --masked-input + model--> U3 (trained, spend recorded; encoded update + masks)
       --unmask-->               U4 (seed shares of U3 neighbours, key shares of U2 \\ U3 ones)

The coordinator sums the masked vectors of U3 mod 2^bits as they come, then
removes each survivor's self mask (its seed rebuilt from t shares) and each
dropped node's pairwise masks with the survivors (its masking key rebuilt
from t shares). What is left is the exact integer sum of U3's encoded
updates; decoded and divided by |U3| it is the FedAvg mean of their updates
(uniform weights, as in a plain round). No single update is ever visible:
each masked vector carries a self mask whose seed is rebuilt only for a
node that sent it, and pairwise masks whose keys are rebuilt only for nodes
that did not.

A round fails cleanly — no update revealed, nothing asked beyond the
protocol — when some mask cannot be removed (fewer than t neighbours
answered the unmask request of a node) or when too few updates remain; the
caller then stops the run or skips the round (`on_failure`).

Work: the coordinator regenerates |U3| self masks plus, per dropped node,
its pairwise masks with its survivors, all removed in one chunked pass of
ChaCha20 keystreams over the one running sum (common/secagg/masks.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from consortia.common import protocol as p
from consortia.common.config import SecureAggregationConfig
from consortia.common.errors import FederationError
from consortia.common.secagg import crypto, graph, shamir, wire
from consortia.common.secagg.fixed_point import Bits, FixedPoint
from consortia.common.secagg.masks import apply_masks
from consortia.server.rounds.exchange import exchange

SECAGG_MESSAGE_TYPE = f"train.{wire.MESSAGE_ACTION}"
BoundOf = Callable[[Message], "float | str"]  # a setup reply → its update's range bound, or why not
Request = TypeVar("Request", wire.ShareKeys, wire.MaskedInput, wire.Unmask)
Answer = TypeVar("Answer")


@dataclass(frozen=True)
class Plan:
    """The round's graph and parameters, fixed before anything is sent."""

    node_ids: tuple[int, ...]  # sorted: position i is node_ids[i]
    neighbours: dict[int, tuple[int, ...]]  # by position
    threshold: int
    bits: Bits
    context: str

    @classmethod
    def make(
        cls,
        node_ids: Sequence[int],
        settings: SecureAggregationConfig,
        context: str,
        rng: random.Random | None = None,
    ) -> Plan:
        ids = tuple(sorted(node_ids))
        n = len(ids)
        if n < 2:
            raise FederationError(
                f"secure aggregation needs at least 2 nodes per round, the cohort has {n}"
            )
        try:
            degree, threshold = settings.graph_for(n)
        except ValueError as exc:
            raise FederationError(f"a cohort of {n} nodes: {exc}") from None
        return cls(
            node_ids=ids,
            neighbours=graph.neighbours(range(n), degree, rng),
            threshold=threshold,
            bits=settings.bits,
            context=context,
        )

    @cached_property
    def _positions(self) -> dict[int, int]:
        return {node_id: pos for pos, node_id in enumerate(self.node_ids)}

    def position(self, node_id: int) -> int:
        return self._positions[node_id]


@dataclass
class SecureRound:
    """What one secure round produced, for the strategy and the run log."""

    # What the strategy and run log read: stage-1 refusals and errors, and every stage-3
    # reply (the nodes that trained: DP spend, loss; or their refusal).
    replies: list[Message]
    survivors: list[int] = field(default_factory=list)  # node ids whose updates are in the sum
    dropped: dict[int, str] = field(default_factory=dict)  # node id → why it left after setup
    mean_update: dict[str, np.ndarray] | None = None  # None: the round could not be unmasked
    failure: str | None = None
    mean_error_bound: float = 0.0  # fixed-point error of `mean_update`, per entry
    encoded_sum: np.ndarray | None = None  # the exact integer sum mod 2^bits, before decoding

    def aggregate(self, global_arrays: ArrayRecord) -> ArrayRecord | None:
        """Global model + mean update, in the global model's dtypes."""
        if self.mean_update is None:
            return None
        return ArrayRecord(
            {
                key: Array(_moved(array.numpy(), self.mean_update[key]))
                for key, array in global_arrays.items()
            }
        )


def _moved(weights: np.ndarray, update: np.ndarray) -> np.ndarray:
    """weights + update, computed in float64 and stored in the weights' dtype."""
    moved: np.ndarray = (weights.astype(np.float64) + update).astype(weights.dtype)
    return moved


def run_secure_round(
    grid: Grid,
    train_messages: Sequence[Message],
    global_arrays: ArrayRecord,
    settings: SecureAggregationConfig,
    *,
    context: str,
    timeout_s: float,
    bound_of: BoundOf,
    rng: random.Random | None = None,
) -> SecureRound:
    """Run the four stages for the cohort `train_messages` are addressed to."""
    plan = Plan.make([m.metadata.dst_node_id for m in train_messages], settings, context, rng)
    layout = _Layout.of(global_arrays)
    # -------- stage 1: setup (keys, planned release)
    setups = [_setup_message(m, plan) for m in train_messages]
    replies = exchange(grid, setups, timeout_s)
    outcome = SecureRound(replies=[])
    cipher_keys, mask_keys, bounds = {}, {}, {}
    for reply in replies:
        pos = plan.position(reply.metadata.src_node_id)
        if reply.has_error() or p.read_refusal(reply.content) is not None:
            outcome.replies.append(reply)  # the strategy's screening reports these
            continue
        try:
            keys = wire.read(wire.SetupReply, reply.content.get(wire.SECAGG_KEY), "setup reply")
        except wire.SecAggProtocolError as exc:
            outcome.dropped[reply.metadata.src_node_id] = exc.message
            continue
        bound = bound_of(reply)
        if isinstance(bound, str) or not 0 < bound < math.inf:
            why = bound if isinstance(bound, str) else f"its update bound is {bound}"
            outcome.dropped[reply.metadata.src_node_id] = why
            continue
        cipher_keys[pos], mask_keys[pos], bounds[pos] = keys.cipher_key, keys.mask_key, bound
    u1 = sorted(cipher_keys)
    if not u1:
        return _failed(outcome, "no node took part and sent its keys")
    encoding = FixedPoint(bits=plan.bits, bound=max(bounds.values()), summands=len(u1))
    # -------- stage 2: share keys
    requests = {
        pos: wire.ShareKeys(
            peers=(peers := [q for q in plan.neighbours[pos] if q in cipher_keys]),
            cipher_keys=[cipher_keys[q] for q in peers],
            mask_keys=[mask_keys[q] for q in peers],
            bound=encoding.bound,
            summands=encoding.summands,
        )
        for pos in u1
    }
    sealed: dict[int, dict[int, bytes]] = {pos: {} for pos in u1}  # recipient → sender → box
    u2 = []
    for pos, answer in _stage(grid, plan, requests, timeout_s, outcome, _share_keys_reply):
        for recipient, box in zip(answer.recipients, answer.sealed, strict=True):
            sealed[recipient][pos] = box
        u2.append(pos)
    # -------- stage 3: masked input (the nodes train now, with the model)
    inputs = {
        pos: wire.MaskedInput(
            senders=(senders := sorted(q for q in sealed[pos] if q in u2)),
            sealed=[sealed[pos][q] for q in senders],
        )
        for pos in u2
    }
    total = np.zeros(layout.size, dtype=encoding.dtype)
    u3 = []
    model = train_messages[0].content if train_messages else RecordDict()
    vectors = _stage(
        grid,
        plan,
        inputs,
        timeout_s,
        outcome,
        lambda reply, _: _masked_vector(reply, layout.size, encoding.dtype),
        with_content=model,
        collect=outcome.replies,
    )
    for pos, vector in vectors:
        np.add(total, vector, out=total)
        u3.append(pos)
    del sealed, inputs
    survived, left = set(u3), set(u2) - set(u3)
    if len(u3) < 1:
        return _failed(outcome, "no node sent its masked update")
    if (groups := _groups(plan, survived)) > 1:
        # Pairwise masks cancel within each group: unmasking would reveal each group's
        # sum, more than the one sum the protocol promises. An honest coordinator stops.
        return _failed(
            outcome,
            f"dropouts split the {len(u3)} remaining nodes into {groups} groups that share "
            "no masks; unmasking would reveal each group's sum",
        )
    # -------- stage 4: unmask
    # Survivors and dropped nodes all shared keys in stage 2 (both sets lie in U2).
    asks = {
        pos: wire.Unmask(
            survivors=[q for q in plan.neighbours[pos] if q in survived],
            dropped=[q for q in plan.neighbours[pos] if q in left],
        )
        for pos in u3
    }
    seed_shares: dict[int, list[shamir.Share]] = {pos: [] for pos in u3}
    # Only a dropped node masked against a survivor has masks in the sum to remove.
    key_shares: dict[int, list[shamir.Share]] = {
        pos: [] for pos in left if survived.intersection(plan.neighbours[pos])
    }
    for pos, revealed in _stage(grid, plan, asks, timeout_s, outcome, _unmask_reply):
        for owner, data in zip(revealed.seed_owners, revealed.seed_shares, strict=True):
            seed_shares[owner].append(shamir.Share.from_bytes(pos + 1, data))
        for owner, data in zip(revealed.key_owners, revealed.key_shares, strict=True):
            if owner in key_shares:
                key_shares[owner].append(shamir.Share.from_bytes(pos + 1, data))
    problem = _unmask(total, plan, seed_shares, key_shares, mask_keys, survived)
    if problem is not None:
        return _failed(outcome, problem)
    outcome.survivors = [plan.node_ids[pos] for pos in sorted(u3)]
    outcome.encoded_sum = total
    mean = encoding.decode_sum(total) / len(u3)
    outcome.mean_update = layout.split(mean)
    outcome.mean_error_bound = encoding.mean_error_bound
    return outcome


def _groups(plan: Plan, survived: set[int]) -> int:
    """How many connected groups the survivors form in the graph (edges between survivors)."""
    unseen, groups = set(survived), 0
    while unseen:
        groups += 1
        frontier = [unseen.pop()]
        while frontier:
            for q in plan.neighbours[frontier.pop()]:
                if q in unseen:
                    unseen.discard(q)
                    frontier.append(q)
    return groups


def _unmask(
    total: np.ndarray,
    plan: Plan,
    seed_shares: dict[int, list[shamir.Share]],
    key_shares: dict[int, list[shamir.Share]],
    mask_keys: dict[int, bytes],
    survived: set[int],
) -> str | None:
    """Remove every mask from `total` in place; or say which node's secret cannot be rebuilt."""
    t, context = plan.threshold, plan.context.encode()
    short = [
        (pos, len(shares), kind)
        for kind, table in (("self-mask seed", seed_shares), ("masking key", key_shares))
        for pos, shares in sorted(table.items())
        if len(shares) < t
    ]
    if short:
        pos, count, kind = short[0]
        return (
            f"the {kind} of node {plan.node_ids[pos]} has {count} share(s), {t} needed "
            f"({len(short)} secret(s) short): too many nodes dropped during unmasking"
        )
    masks: list[tuple[bytes, bool]] = []  # (seed, subtract), removed in one pass
    try:
        masks += [(shamir.combine(shares, t), True) for shares in seed_shares.values()]
        for pos, shares in key_shares.items():
            private = shamir.combine(shares, t)
            if crypto.public_key(private) != mask_keys[pos]:
                return f"the masking key rebuilt for node {plan.node_ids[pos]} does not match it"
            key = crypto.PrivateKey(private)
            masks += [
                (key.agree(mask_keys[q], crypto.MASK_KEY, context), q < pos)  # undo q's ±mask
                for q in plan.neighbours[pos]
                if q in survived
            ]
    except (shamir.ShamirError, crypto.SealError) as exc:
        return f"a secret could not be rebuilt from its shares: {exc}"
    apply_masks(total, masks)
    return None


def _failed(outcome: SecureRound, reason: str) -> SecureRound:
    outcome.failure = reason
    outcome.mean_update = None
    return outcome


def _setup_message(train: Message, plan: Plan) -> Message:
    """Stage 1: the strategy's train config (the task) without the model, and the setup.

    The model goes out with stage 3, when the node trains: a node that
    drops before then neither downloads it nor spends privacy on it.
    """
    pos = plan.position(train.metadata.dst_node_id)
    setup = wire.Setup(
        context=plan.context,
        position=pos,
        cohort_size=len(plan.node_ids),
        neighbours=list(plan.neighbours[pos]),
        threshold=plan.threshold,
        bits=plan.bits,
    )
    content = RecordDict(dict(train.content.config_records.items()))
    content[wire.SECAGG_KEY] = setup.to_record()
    return Message(
        content, dst_node_id=train.metadata.dst_node_id, message_type=SECAGG_MESSAGE_TYPE
    )


def _stage(
    grid: Grid,
    plan: Plan,
    requests: dict[int, Request],
    timeout_s: float,
    outcome: SecureRound,
    read: Callable[[Message, Request], Answer],
    *,
    with_content: RecordDict | None = None,
    collect: list[Message] | None = None,
) -> list[tuple[int, Answer]]:
    """Send one stage's requests; each usable reply `read`, by position; the rest dropped.

    A node that does not answer, answers with an error or a refusal, or
    whose reply `read` rejects (`SecAggProtocolError`) is noted in
    `outcome.dropped` with the stage and why. `with_content`: records every
    request also carries (stage 3: the model and the round's config, one
    shared record, as the strategy sends them). `collect`: where every reply
    that came back goes, refusals and errors too.
    """
    shared = dict(with_content.items()) if with_content is not None else {}
    messages = [
        Message(
            RecordDict({**shared, wire.SECAGG_KEY: request.to_record()}),
            dst_node_id=plan.node_ids[pos],
            message_type=SECAGG_MESSAGE_TYPE,
        )
        for pos, request in requests.items()
    ]
    stage = next(iter(requests.values())).stage if requests else ""
    replies = {r.metadata.src_node_id: r for r in exchange(grid, messages, timeout_s)}
    if collect is not None:
        collect.extend(replies.values())
    usable = []
    for pos in sorted(requests):
        node = plan.node_ids[pos]
        reply = replies.get(node)
        if reply is None:
            outcome.dropped[node] = f"no {stage} reply within {timeout_s:g} s"
        elif reply.has_error():
            outcome.dropped[node] = f"{stage}: node error: {reply.error.reason}"
        elif (refusal := p.read_refusal(reply.content)) is not None:
            outcome.dropped[node] = f"{stage}: refused [{refusal[0]}]: {refusal[1]}"
        else:
            try:
                usable.append((pos, read(reply, requests[pos])))
            except wire.SecAggProtocolError as exc:
                outcome.dropped[node] = exc.message
    return usable


def _share_keys_reply(reply: Message, request: wire.ShareKeys) -> wire.ShareKeysReply:
    answer = wire.read(wire.ShareKeysReply, reply.content.get(wire.SECAGG_KEY), "share-keys")
    if answer.recipients != request.peers:
        raise wire.SecAggProtocolError("share-keys reply addressed to other nodes than asked")
    return answer


def _unmask_reply(reply: Message, request: wire.Unmask) -> wire.UnmaskReply:
    answer = wire.read(wire.UnmaskReply, reply.content.get(wire.SECAGG_KEY), "unmask reply")
    if set(answer.seed_owners) - set(request.survivors) or set(answer.key_owners) - set(
        request.dropped
    ):
        raise wire.SecAggProtocolError("unmask reply holds shares that were not asked for")
    return answer


def _masked_vector(reply: Message, size: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    record = reply.content.array_records.get(wire.MASKED_KEY)
    if record is None or wire.MASKED_ARRAY not in record:
        raise wire.SecAggProtocolError("masked-input reply without its vector")
    vector = record[wire.MASKED_ARRAY].numpy()
    if vector.dtype != dtype or vector.shape != (size,):
        raise wire.SecAggProtocolError(
            f"masked vector of {vector.dtype}{list(vector.shape)}, "
            f"expected {np.dtype(dtype)}[{size}]"
        )
    return vector


@dataclass(frozen=True)
class _Layout:
    """How the model's float arrays flatten into the one vector that is masked."""

    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, arrays: ArrayRecord) -> _Layout:
        shapes = {}
        for key, array in arrays.items():
            if not np.issubdtype(np.dtype(array.dtype), np.floating):
                raise FederationError(
                    f"secure aggregation sums float parameters; array '{key}' is {array.dtype}"
                )
            shapes[key] = tuple(array.shape)
        return cls(shapes)

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes.values())

    def split(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        parts, start = {}, 0
        for key, shape in self.shapes.items():
            stop = start + int(np.prod(shape))
            parts[key] = vector[start:stop].reshape(shape)
            start = stop
        return parts
