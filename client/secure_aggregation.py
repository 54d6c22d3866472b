"""The node's side of SecAgg+: keys, shares, the masked update, and what it will reveal.

One round is four messages of type `train.secagg` (common/secagg/wire.py):

1. `setup`: the node checks its policy (cohort size), plans the round's DP release
   (noise multiplier, sample rate, steps: what bounds its update), makes
   two fresh X25519 key pairs and answers with the public halves. It does
   not train yet: a node that drops before stage 3 spends nothing;
2. `share-keys`: it checks the number of summands against its policy,
   draws its self-mask seed, splits the seed and its masking private key
   t-of-k (Shamir) and seals one pair of shares to each neighbour
   (AES-GCM); it keeps the round's fixed-point range;
3. `masked-input`: it opens the shares addressed to it, then trains on the
   global model that comes with them (DP-SGD, spend recorded first, as in a
   plain round), encodes local − global in the range (a value, or an L2
   norm, beyond R is an error it reports, never a clip) and answers with the encoded
   update + its self mask ± one pairwise mask per neighbour that shared
   with it;
4. `unmask`: for each neighbour the coordinator names, the share of its
   self-mask seed (it survived) or of its masking key (it dropped) —
   never both for one neighbour, and only once per round; then it forgets
   the round's secrets.

Between messages the session lives in the node's Flower `Context.state`
(`SessionState`, a few KiB: keys and shares), which the SuperNode keeps per run;
the update exists only within stage 3 and never leaves the node unmasked.
Each step checks the stage order: a request out of order, a neighbour named
as both survivor and dropped, or a second unmask request is refused
(`SecAggRefusedError`) and logged by the ClientApp.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field

from consortia.common.errors import ConsortiaError
from consortia.common.secagg import crypto, shamir
from consortia.common.secagg.fixed_point import EncodingRangeError, FixedPoint
from consortia.common.secagg.masks import apply_masks
from consortia.common.secagg.wire import (
    MASKED_ARRAY,
    MASKED_KEY,
    SECAGG_KEY,
    MaskedInput,
    SecAggProtocolError,
    Setup,
    SetupReply,
    ShareKeys,
    ShareKeysReply,
    Unmask,
    UnmaskReply,
)

STATE_KEY = "secagg-session"
_SHARE_HEADER = struct.Struct(">II")  # owner position, recipient position
_PLAINTEXT_BYTES = _SHARE_HEADER.size + 2 * shamir.SHARE_BYTES


class SecAggRefusedError(ConsortiaError):
    """The coordinator asked for something the protocol forbids; the node answers nothing."""


# What the ClientApp answers with a `secagg-refused` refusal (and logs), never an error:
# forbidden requests, malformed payloads, shares that do not open or do not combine.
REFUSED = (SecAggRefusedError, SecAggProtocolError, crypto.SealError, shamir.ShamirError)


class SessionState(BaseModel):
    """What the node remembers of the round between stage messages (in `Context.state`)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    stage: str
    setup: Setup
    min_summands: int = 1  # the node's policy minimum (`min_cohort`)
    cipher_private: bytes
    mask_private: bytes
    seed: bytes = b""
    bound: float = 0.0  # the round's fixed-point range R and summands n (from share-keys)
    summands: int = 0
    peers: list[int] = Field(default_factory=list)
    cipher_keys: list[bytes] = Field(default_factory=list)
    mask_keys: list[bytes] = Field(default_factory=list)
    share_owners: list[int] = Field(default_factory=list)
    seed_shares: list[bytes] = Field(default_factory=list)
    key_shares: list[bytes] = Field(default_factory=list)

    def advanced(self, stage: str, **changes: object) -> SessionState:
        return self.model_copy(update={"stage": stage, **changes})


@dataclass(frozen=True)
class Step:
    """One stage's outcome: the reply payload (or masked vector) and the state to keep."""

    state: SessionState
    reply: ConfigRecord | None = None
    masked: np.ndarray | None = None


def begin(setup: Setup, min_summands: int = 1) -> Step:
    """Stage 1: fresh key pairs for this round; answer the public halves."""
    cipher_private, mask_private = crypto.new_private_key(), crypto.new_private_key()
    state = SessionState(
        stage="setup",
        setup=setup,
        min_summands=min_summands,
        cipher_private=cipher_private,
        mask_private=mask_private,
    )
    reply = SetupReply(
        cipher_key=crypto.public_key(cipher_private), mask_key=crypto.public_key(mask_private)
    )
    return Step(state=state, reply=reply.to_record())


def share_keys(state: SessionState, request: ShareKeys) -> Step:
    """Stage 2: share the self-mask seed and the masking key, seal a pair per neighbour."""
    _expect(state, "setup", "share-keys")
    setup = state.setup
    peers = request.peers
    if not set(peers) <= set(setup.neighbours) or len(set(peers)) != len(peers):
        raise SecAggProtocolError("share-keys names nodes that are not this node's neighbours")
    if len(peers) < setup.threshold:
        raise SecAggRefusedError(
            f"only {len(peers)} neighbour(s) left to hold shares, threshold {setup.threshold}: "
            "the round could not survive a dropout"
        )
    if request.summands < state.min_summands:
        raise SecAggRefusedError(
            f"only {request.summands} node(s) still in the round, fewer than this node's "
            f"policy minimum of {state.min_summands}"
        )
    try:
        FixedPoint(bits=setup.bits, bound=request.bound, summands=request.summands)
    except ValueError as exc:
        raise SecAggProtocolError(f"share-keys: unusable encoding: {exc}") from None
    seed = os.urandom(shamir.SECRET_BYTES)  # the self mask's ChaCha20 key
    points = [peer + 1 for peer in peers]
    seed_shares = shamir.split(seed, points, setup.threshold)
    key_shares = shamir.split(state.mask_private, points, setup.threshold)
    context = setup.context.encode()
    cipher = crypto.PrivateKey(state.cipher_private)
    sealed = []
    for peer, cipher_key, seed_share, key_share in zip(
        peers, request.cipher_keys, seed_shares, key_shares, strict=True
    ):
        key = cipher.agree(cipher_key, crypto.SHARE_KEY, context)
        plaintext = (
            _SHARE_HEADER.pack(setup.position, peer) + seed_share.to_bytes() + key_share.to_bytes()
        )
        sealed.append(crypto.seal(key, plaintext, context, setup.position, peer))
    kept = state.advanced(
        "share-keys",
        seed=seed,
        bound=request.bound,
        summands=request.summands,
        peers=list(peers),
        cipher_keys=list(request.cipher_keys),
        mask_keys=list(request.mask_keys),
    )
    reply = ShareKeysReply(recipients=list(peers), sealed=sealed)
    return Step(state=kept, reply=reply.to_record())


def open_shares(state: SessionState, request: MaskedInput) -> SessionState:
    """Stage 3, first half: open and check the shares sent to this node (before training).

    Shares from nodes that are not neighbours, sealed for another node, or
    too few of them are refused here, before the node spends any privacy.
    """
    _expect(state, "share-keys", "masked-input")
    setup = state.setup
    senders = request.senders
    keys = dict(zip(state.peers, state.cipher_keys, strict=True))
    if not set(senders) <= set(keys) or len(set(senders)) != len(senders):
        raise SecAggProtocolError("masked-input forwards shares from nodes that are not neighbours")
    if len(senders) < setup.threshold:
        raise SecAggRefusedError(
            f"only {len(senders)} neighbour(s) shared with this node, threshold {setup.threshold}"
        )
    context = setup.context.encode()
    cipher = crypto.PrivateKey(state.cipher_private)
    seed_shares, key_shares = [], []
    for sender, sealed in zip(senders, request.sealed, strict=True):
        key = cipher.agree(keys[sender], crypto.SHARE_KEY, context)
        plaintext = crypto.open_sealed(key, sealed, context, sender, setup.position)
        if len(plaintext) != _PLAINTEXT_BYTES or _SHARE_HEADER.unpack_from(plaintext) != (
            sender,
            setup.position,
        ):
            raise SecAggProtocolError(f"the share from position {sender} is not addressed here")
        body = plaintext[_SHARE_HEADER.size :]
        seed_shares.append(body[: shamir.SHARE_BYTES])
        key_shares.append(body[shamir.SHARE_BYTES :])
    return state.model_copy(
        update={
            "share_owners": list(senders),
            "seed_shares": seed_shares,
            "key_shares": key_shares,
        }
    )


def mask_update(state: SessionState, update: np.ndarray) -> Step:
    """Stage 3, second half: encode `update` in the round's range and mask it.

    The pairwise masks are those of the neighbours that shared with this
    node (so also received its shares): each pair adds the same keystream
    with opposite signs, the lower position +, the higher −. Raises
    `EncodingRangeError` for a value outside the range.
    """
    setup = state.setup
    encoding = FixedPoint(bits=setup.bits, bound=state.bound, summands=state.summands)
    vector = encoding.encode(update)  # every entry within R, or EncodingRangeError
    norm = float(np.linalg.norm(update))
    if not norm <= state.bound:
        raise EncodingRangeError(
            f"the update's L2 norm {norm:.6g} exceeds the secure-aggregation bound "
            f"{state.bound:.6g} (the job's derived update bound; the coordinator would have "
            "rejected it in the clear)"
        )
    masking = crypto.PrivateKey(state.mask_private)
    mask_keys = dict(zip(state.peers, state.mask_keys, strict=True))
    context = setup.context.encode()
    pairwise = [
        (masking.agree(mask_keys[sender], crypto.MASK_KEY, context), setup.position > sender)
        for sender in state.share_owners
    ]
    apply_masks(vector, [(state.seed, False), *pairwise])
    return Step(state=state.advanced("masked-input"), masked=vector)


def unmask(state: SessionState, request: Unmask) -> Step:
    """Stage 4: seed shares of survivors, key shares of the dropped; refuse anything else.

    Refused: a second unmask request in the round, a neighbour named both
    survivor and dropped (the two shares together would unmask its update),
    nodes that never shared with this node, and fewer survivors than the
    threshold (the answer could then help reconstruct too much).
    """
    if state.stage == "unmask":
        raise SecAggRefusedError("a second unmask request in one round: refused")
    _expect(state, "masked-input", "unmask")
    survivors, dropped = set(request.survivors), set(request.dropped)
    if both := survivors & dropped:
        raise SecAggRefusedError(
            f"the coordinator asked for both shares of neighbour(s) at position(s) "
            f"{sorted(both)}: that would reveal their update; refused"
        )
    owners = state.share_owners
    if not (survivors | dropped) <= set(owners):
        raise SecAggProtocolError("unmask names nodes that did not share with this node")
    if len(survivors) + 1 < state.setup.threshold:
        raise SecAggRefusedError(
            f"{len(survivors)} surviving neighbour(s) named: with this node fewer than the "
            f"threshold {state.setup.threshold}"
        )
    reply = UnmaskReply(
        seed_owners=[o for o in owners if o in survivors],
        seed_shares=[s for o, s in zip(owners, state.seed_shares, strict=True) if o in survivors],
        key_owners=[o for o in owners if o in dropped],
        key_shares=[s for o, s in zip(owners, state.key_shares, strict=True) if o in dropped],
    )
    # The round is over for this node: nothing it kept can be asked for again.
    forgotten = state.advanced(
        "unmask",
        cipher_private=b"",
        mask_private=b"",
        seed=b"",
        seed_shares=[],
        key_shares=[],
    )
    return Step(state=forgotten, reply=reply.to_record())


def begin_round(setup: Setup, store: RecordDict, min_summands: int = 1) -> ConfigRecord:
    """Stage 1: fresh keys for the round, kept in `store`; the public reply.

    `min_summands`: the node's policy minimum of nodes in a sum (`min_cohort`).
    """
    step = begin(setup, min_summands)
    save(store, step.state)
    assert step.reply is not None
    return step.reply


def answer(
    request: ShareKeys | MaskedInput | Unmask,
    store: RecordDict,
    update_of: Callable[[], np.ndarray],
) -> RecordDict:
    """Stages 2–4 against the session kept in `store` (the node's Context.state).

    `update_of` trains and returns the update (local − global); it is called
    in stage 3 only, after the request passed every check. Returns the
    reply's content. Raises `SecAggRefusedError` or `SecAggProtocolError`
    for a request the protocol forbids, and `EncodingRangeError` for an
    update outside the round's range.
    """
    state = load(store)
    if isinstance(request, ShareKeys):
        step = share_keys(state, request)
    elif isinstance(request, MaskedInput):
        step = mask_update(open_shares(state, request), update_of())
        save(store, step.state)
        assert step.masked is not None
        return RecordDict({MASKED_KEY: ArrayRecord({MASKED_ARRAY: Array(step.masked)})})
    else:
        step = unmask(state, request)
    save(store, step.state)
    assert step.reply is not None
    return RecordDict({SECAGG_KEY: step.reply})


def _expect(state: SessionState, stage: str, requested: str) -> None:
    if state.stage != stage:
        raise SecAggRefusedError(
            f"'{requested}' arrived after stage '{state.stage}' (expected after '{stage}')"
        )


# ------------------------------------------------------------------- Context.state


def save(store: RecordDict, state: SessionState) -> None:
    """Keep the session in the node's Context.state."""
    store[STATE_KEY] = ConfigRecord({"json": state.model_dump_json()})


def load(store: RecordDict) -> SessionState:
    record = store.get(STATE_KEY)
    if not isinstance(record, ConfigRecord) or not isinstance(record.get("json"), str):
        raise SecAggRefusedError("no secure-aggregation round in progress on this node")
    return SessionState.model_validate_json(str(record["json"]))
