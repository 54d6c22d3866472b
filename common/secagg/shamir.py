"""Shamir secret sharing over GF(p), p = 2^521 − 1, for 32-byte secrets.

SecAgg+ shares two secrets per node and round with its k neighbours: the seed
of its self mask and its masking private key. The field is larger than any
32-byte value, so a secret is one field element and a share one more
(66 bytes). Polynomial coefficients come from `secrets` (the OS CSPRNG):
any t − 1 shares are then independent of the secret, which is the whole
point, and would not be with a seeded generator.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = 2**521 - 1  # a Mersenne prime
SHARE_BYTES = 66  # ⌈521 / 8⌉
SECRET_BYTES = 32


class ShamirError(ValueError):
    """Shares that cannot reconstruct a secret (too few, duplicated, malformed)."""


@dataclass(frozen=True)
class Share:
    """The polynomial's value `y` at the point `x` (1 ≤ x < p; x = 0 is the secret)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, x: int, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        y = int.from_bytes(data, "big")
        if not 0 <= y < PRIME or not 0 < x < PRIME:
            raise ShamirError("share outside the field")
        return cls(x=x, y=y)


def split(secret: bytes, points: Sequence[int], threshold: int) -> list[Share]:
    """Shares of `secret` at `points` (distinct, non-zero); any `threshold` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(points):
        raise ShamirError(f"threshold {threshold} needs 1..{len(points)} shares")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ShamirError("share points must be distinct and non-zero")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x=x, y=_evaluate(coefficients, x)) for x in points]


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The secret from at least `threshold` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} share(s), {threshold} needed")
    chosen = list(shares)[:threshold]
    xs = [share.x for share in chosen]
    if len(set(xs)) != len(xs):
        raise ShamirError("two shares at the same point")
    secret = 0
    for i, share in enumerate(chosen):
        numerator, denominator = 1, 1
        for j, x in enumerate(xs):
            if j != i:
                numerator = numerator * x % PRIME
                denominator = denominator * (x - share.x) % PRIME
        secret = (secret + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("the shares do not belong to one 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    """Horner's rule mod p."""
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value
