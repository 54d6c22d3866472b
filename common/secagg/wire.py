"""The SecAgg+ stage payloads, as pydantic models read from and written to Flower records.

Every stage travels as one `ConfigRecord` under `SECAGG_KEY` in a message of
type `train.secagg`; the masked vector of the third stage as an `ArrayRecord`
under `MASKED_KEY`. Nodes are named by their position in the round's cohort
(0..n−1, the cohort sorted by Flower node id), which is also their Shamir
point (position + 1) and fixes the sign of each pairwise mask. Each side
validates what it receives: a malformed payload is a `SecAggProtocolError`
with what was wrong, never an index error deep in the protocol.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Self, TypeVar

from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from consortia.common.errors import FederationError

MESSAGE_ACTION = "secagg"  # Flower message type "train.secagg"
SECAGG_KEY = "secagg"
MASKED_KEY = "masked"
MASKED_ARRAY = "vector"


class SecAggProtocolError(FederationError):
    """A SecAgg+ message that breaks the protocol (malformed, out of order, or a forbidden ask)."""


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Groups of fields that are columns of one table: each group's lists have one length.
    parallel: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @model_validator(mode="after")
    def _columns(self) -> Self:
        for group in self.parallel:
            if len({len(getattr(self, name)) for name in group}) > 1:
                raise ValueError(f"{', '.join(group)} differ in length")
        return self

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(self.model_dump())


Model = TypeVar("Model", bound=_Payload)


def read(model: type[Model], record: object, what: str) -> Model:
    """`record` as `model`, or a `SecAggProtocolError` naming the stage and the problem."""
    if not isinstance(record, ConfigRecord):
        raise SecAggProtocolError(f"{what}: no '{SECAGG_KEY}' record in the message")
    try:
        return model.model_validate(dict(record))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}" for e in exc.errors()
        )
        raise SecAggProtocolError(f"{what}: malformed payload ({problems})") from None


# ------------------------------------------------------------------ stage 1: setup


class Setup(_Payload):
    """Coordinator → node: the round's graph and parameters; make this round's keys."""

    stage: Literal["setup"] = "setup"
    context: str = Field(min_length=1, description="run and round; bound into every derived key")
    position: int = Field(ge=0)
    cohort_size: int = Field(ge=1)
    neighbours: list[int] = Field(description="positions of this node's neighbours")
    threshold: int = Field(ge=1)
    bits: Literal[32, 64]

    @model_validator(mode="after")
    def _consistent(self) -> Setup:
        peers = set(self.neighbours)
        if len(peers) != len(self.neighbours) or self.position in peers:
            raise ValueError("neighbours must be distinct and exclude the node itself")
        if any(not 0 <= q < self.cohort_size for q in peers) or self.position >= self.cohort_size:
            raise ValueError("positions outside the cohort")
        k = len(self.neighbours)
        # t > k/2: otherwise a coordinator could collect t seed shares of a node from
        # some neighbours and t key shares from the others, and unmask its update.
        if not k / 2 < self.threshold <= k:
            raise ValueError(
                f"threshold {self.threshold} must be above half of the {k} neighbours and at "
                "most their number"
            )
        return self


class SetupReply(_Payload):
    """Node → coordinator: this round's two public keys (sealing, masking)."""

    cipher_key: bytes
    mask_key: bytes


# --------------------------------------------------------------- stage 2: share keys


class ShareKeys(_Payload):
    """Coordinator → node: the neighbours still in the round, their keys, the encoding."""

    stage: Literal["share-keys"] = "share-keys"
    peers: list[int]
    cipher_keys: list[bytes]
    mask_keys: list[bytes]
    bound: float = Field(
        gt=0, allow_inf_nan=False, description="range R of the fixed-point encoding"
    )
    summands: int = Field(ge=1, description="most updates the sum can hold")
    parallel = (("peers", "cipher_keys", "mask_keys"),)


class ShareKeysReply(_Payload):
    """Node → coordinator: one sealed pair of shares per neighbour, for forwarding."""

    recipients: list[int]
    sealed: list[bytes]
    parallel = (("recipients", "sealed"),)


# ------------------------------------------------------------ stage 3: masked input


class MaskedInput(_Payload):
    """Coordinator → node: the sealed shares its neighbours addressed to it."""

    stage: Literal["masked-input"] = "masked-input"
    senders: list[int]
    sealed: list[bytes]
    parallel = (("senders", "sealed"),)


# ------------------------------------------------------------------ stage 4: unmask


class Unmask(_Payload):
    """Coordinator → node: which neighbours sent a masked vector, which dropped after sharing."""

    stage: Literal["unmask"] = "unmask"
    survivors: list[int]
    dropped: list[int]


class UnmaskReply(_Payload):
    """Node → coordinator: self-mask seed shares of survivors, mask-key shares of the dropped."""

    seed_owners: list[int]
    seed_shares: list[bytes]
    key_owners: list[int]
    key_shares: list[bytes]
    parallel = (("seed_owners", "seed_shares"), ("key_owners", "key_shares"))


# A coordinator → node request, one model per stage.
StageRequest = Setup | ShareKeys | MaskedInput | Unmask

STAGES: dict[str, type[StageRequest]] = {
    "setup": Setup,
    "share-keys": ShareKeys,
    "masked-input": MaskedInput,
    "unmask": Unmask,
}


def read_stage(record: object) -> StageRequest:
    """The coordinator's request, whichever stage it is."""
    stage = record.get("stage") if isinstance(record, ConfigRecord) else None
    if not isinstance(stage, str) or stage not in STAGES:
        raise SecAggProtocolError(
            f"secure aggregation request names no known stage (got {stage!r}; "
            f"known: {', '.join(STAGES)})"
        )
    return read(STAGES[stage], record, f"stage '{stage}'")
