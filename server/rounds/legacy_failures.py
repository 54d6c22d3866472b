"""The kind of a failure recorded before failures carried one (old metrics.json, checkpoints).

Runs written before `NodeFailure.kind` existed hold a reason, and a refusal
code where the node answered with one. Their kind is recovered here, once,
when such a record is read: from the code where there is one, else from how
the coordinator of that time worded the reason. Nothing recorded since needs
this: every failure carries the kind it was given where it was found.
"""

from __future__ import annotations

import re

from consortia.common.protocol import FailureKind, kind_of_code

# How the coordinator worded the failures that had no code, first match wins.
_NO_REPLY = re.compile(r"no \S+ reply within ")  # the round loop's timeout
_PREFIXES = (
    ("node error:", FailureKind.ERROR_REPLY),  # Flower's error reply
    ("not selected by Krum", FailureKind.KRUM_EXCLUDED),
    ("not selected by Multi-Krum", FailureKind.MULTIKRUM_EXCLUDED),
    ("secure aggregation:", FailureKind.SECAGG_DROPOUT),
    ("reply lacks ", FailureKind.MALFORMED),  # screening: records, weight, layout
    ("aggregation weight must be", FailureKind.MALFORMED),
    ("update arrays ", FailureKind.MALFORMED),
    ("array '", FailureKind.MALFORMED),
)


def legacy_kind(refusal: str | None, reason: str) -> FailureKind:
    """The kind of an old failure record with this refusal code (or none) and reason."""
    if refusal is not None:
        return kind_of_code(refusal)
    if _NO_REPLY.match(reason):
        return FailureKind.NO_REPLY
    for prefix, kind in _PREFIXES:
        if reason.startswith(prefix):
            return kind
    return FailureKind.SCREENED_OUT  # every other reason was an update check's


def with_kind(data: object) -> object:
    """A failure record's fields (`NodeFailure`'s, as stored) with the kind they tell, if
    they carry none; anything else unchanged (a model validator's `mode="before"` step)."""
    if isinstance(data, dict) and "kind" not in data:
        refusal, reason = data.get("refusal"), data.get("reason")
        if isinstance(reason, str) and (refusal is None or isinstance(refusal, str)):
            return {**data, "kind": legacy_kind(refusal, reason)}
    return data
