"""The node's privacy history for one job, kept in the node's Flower `Context`.

The history is never reset between rounds: ε after round r is the
composition of every release of rounds 1..r. It is written into the context
before the reply (and its update) is returned to Flower.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context
from pydantic import BaseModel

from consortia.common.privacy import Release

_STATE_KEY = "consortia-privacy"
_DOC_KEY = "state"


class JobPrivacyState(BaseModel):
    """Noise multiplier chosen for the job and every release made under it."""

    noise_multiplier: float | None = None
    history: list[Release] = []


def load_state(context: Context) -> JobPrivacyState:
    record = context.state.get(_STATE_KEY)
    if record is None:
        return JobPrivacyState()
    return JobPrivacyState.model_validate_json(str(record[_DOC_KEY]))


def save_state(context: Context, state: JobPrivacyState) -> None:
    context.state[_STATE_KEY] = ConfigRecord({_DOC_KEY: state.model_dump_json()})
