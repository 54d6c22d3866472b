"""Fixed-point encoding of updates for a sum mod 2^bits that is exact and cannot overflow.

A node's update is a float vector with every entry in [−R, R]; the bound R
is the coordinator's L2 bound on the update, derived from the job's DP
clipping norm (server/rounds/update_checks.py; |x_i| ≤ ‖x‖). With n summands and
`bits`-bit words, each value is rounded to the nearest multiple of the step
s = R / M, M = ⌊(2^(bits−1) − 1) / n⌋, and stored as a two's-complement
integer in [−M, M]. The sum of n of them lies in [−nM, nM] ⊂ [−2^(bits−1), 2^(bits−1)),
so read back as a signed integer it is the exact integer sum: no overflow
is possible, whatever the values. A value outside [−R, R] (or not finite)
is an error the node reports (`EncodingRangeError`), never a silent clip.

Error: each value is off by at most s/2, so a decoded sum of n updates by at
most n·s/2 per entry and the mean by at most s/2 (`mean_error_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Bits = Literal[32, 64]


class EncodingRangeError(ValueError):
    """An update value outside the agreed range: the node reports it instead of clipping."""


@dataclass(frozen=True)
class FixedPoint:
    """The encoding of one round: word size, per-entry bound R, most summands n."""

    bits: Bits
    bound: float
    summands: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"the range bound must be a positive number, got {self.bound}")
        if not 1 <= self.summands <= 2 ** (self.bits - 2):
            raise ValueError(f"{self.summands} summands do not fit {self.bits}-bit words")

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return np.uint32 if self.bits == 32 else np.uint64

    @property
    def levels(self) -> int:
        """M: the largest magnitude one encoded value may have.

        At least two summands are assumed, so that M ≤ 2^62 and ±M·(1 + float
        rounding) still casts to int64 in 64-bit words.
        """
        return ((1 << (self.bits - 1)) - 1) // max(self.summands, 2)

    @property
    def step(self) -> float:
        return self.bound / self.levels

    @property
    def mean_error_bound(self) -> float:
        """Largest error of a decoded mean, per entry: half a step."""
        return self.step / 2

    def encode(self, values: np.ndarray) -> np.ndarray:
        """`values` (any float array) as a new 1-D unsigned vector; raises if out of range.

        The range check is on the values themselves (|v| ≤ R, NaN fails it).
        The scaled values are rounded in one float64 buffer and cast to int64;
        the integer clip to [−M, M] only undoes float rounding at ±R (R/s may
        round to M + 1 in float64 when M > 2^53), never an out-of-range value.
        """
        flat = np.ravel(values)
        if flat.size and not float(np.max(np.abs(flat))) <= self.bound:
            outside = np.flatnonzero(~(np.abs(flat) <= self.bound))
            first = int(outside[0])
            raise EncodingRangeError(
                f"{outside.size} update value(s) outside the secure-aggregation range "
                f"[−{self.bound:.6g}, {self.bound:.6g}] (first: entry {first} = "
                f"{float(flat[first])!r}); the range is the job's derived update bound: check "
                "the learning rate, clipping norm and steps, or set update_checks.max_update_norm"
            )
        scaled = np.multiply(flat, 1.0 / self.step, dtype=np.float64)
        np.rint(scaled, out=scaled)
        integers = scaled.astype(np.int64)
        np.clip(integers, -self.levels, self.levels, out=integers)
        words: np.ndarray = integers.astype(self.dtype)
        return words

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """The float64 sum of the encoded vectors whose mod-2^bits sum is `total`."""
        signed = np.int32 if self.bits == 32 else np.int64
        return total.astype(self.dtype).view(signed).astype(np.float64) * self.step
