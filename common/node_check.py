"""A node asks its coordinator: is my key enrolled, what time is it there, what runs there?

`consortia node doctor` sends `GET /consortia/v1/node-check` to the
coordinator's SuperLink address, signed exactly as Flower's SuperNode signs
every Fleet API request (its public key, the current time, and its signature
over that time, in Flower's headers). The coordinator's gatekeeper
(server/coordinator/gatekeeper.py) answers it itself, before Flower sees it,
and changes nothing: unlike an activation, a check neither registers nor
activates the node. Like the Fleet API it is open to any address; what it
tells depends on the signature:

- 200: the key is enrolled: the node's enrolled name, the coordinator's
  clock and its consortia, Flower and torch versions;
- 403: a valid signature by a key the coordinator has not enrolled;
- 401: no valid signature, or a signing time outside Flower's window (the
  window the Fleet API applies: a node whose clock is off fails there too).

Every answer carries the coordinator's clock (a node far off learns by how
much); versions go to enrolled nodes only.
"""

from __future__ import annotations

import binascii
import datetime as dt
from base64 import b64decode, b64encode
from collections.abc import Mapping

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    public_key_to_bytes,
    sign_message,
    verify_signature,
)
from pydantic import BaseModel

from consortia.common.versions import SoftwareVersions

NODE_CHECK_PATH = "/consortia/v1/node-check"
PUBLIC_KEY_HEADER = FLEET_HTTP_PUBLIC_KEY_HEADER
# A node's clock may run this far ahead of the coordinator's (Flower refuses a signature
# made further in the future), and this far behind (an older signature is a replay).
AHEAD_TOLERANCE_S = float(SYSTEM_TIME_TOLERANCE)
BEHIND_TOLERANCE_S = float(TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE)


class NodeCheckAnswer(BaseModel):
    """The coordinator's answer (every status)."""

    enrolled: bool
    time_utc: dt.datetime  # the coordinator's clock when it answered
    node: str | None = None  # the name the key is enrolled under
    versions: SoftwareVersions | None = None  # enrolled nodes only
    detail: str = ""


def signed_headers(private_key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """Flower's SuperNode authentication headers: the key, the time, the signature over it."""
    timestamp = dt.datetime.now(dt.UTC).isoformat()
    signature = sign_message(private_key, timestamp.encode("ascii"))
    return {
        FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(
            public_key_to_bytes(private_key.public_key())
        ).decode("ascii"),
        TIMESTAMP_HEADER: timestamp,
        FLEET_HTTP_SIGNATURE_HEADER: b64encode(signature).decode("ascii"),
    }


def signing_key(headers: Mapping[str, str], now: dt.datetime) -> bytes | str:
    """The public key (as Flower stores it) whose signature the headers carry, or why none.

    The checks of Flower's Fleet API (flwr/superlink/routers/fleet/node_auth.py):
    the signature over the timestamp, and the timestamp within the window.
    """
    try:
        public_key = b64decode(headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
        signature = b64decode(headers[FLEET_HTTP_SIGNATURE_HEADER], validate=True)
        timestamp = headers[TIMESTAMP_HEADER]
        signed_at = dt.datetime.fromisoformat(timestamp)
        valid = verify_signature(
            bytes_to_public_key(public_key), timestamp.encode("ascii"), signature
        )
    except KeyError as exc:
        return f"no {exc.args[0]} header: not a signed request"
    except (ValueError, TypeError, UnicodeError, binascii.Error, UnsupportedAlgorithm):
        return "the key, time or signature is malformed"
    if not valid:
        return "the signature does not verify with the key sent"
    if signed_at.tzinfo is None:
        return "the signing time has no time zone"
    age = (now - signed_at).total_seconds()
    if not -AHEAD_TOLERANCE_S < age < BEHIND_TOLERANCE_S:
        return (
            f"signed at {timestamp}, {abs(age):.0f} s {'ahead of' if age < 0 else 'behind'} "
            "the coordinator's clock, outside the window it accepts"
        )
    return public_key
