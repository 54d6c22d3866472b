"""Masks: ChaCha20 keystreams read as unsigned integers and added mod 2^bits.

A mask is the keystream of ChaCha20 under a 32-byte seed (a fresh key per
seed and round, so the all-zero nonce never repeats under one key), read as
uint32 or uint64 and added with wrap-around: numpy's unsigned arithmetic is
arithmetic mod 2^32 or 2^64, and 2^bits divides it, so no reduction step
is needed. The keystream is produced and added `CHUNK` values at a time:
masking a vector costs one chunk of extra memory however large the model,
never a second full-size vector per neighbour.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

CHUNK = 1 << 17  # values per keystream chunk (0.5 MiB of uint32, 1 MiB of uint64)
_NONCE = bytes(16)  # ChaCha20's 4-byte counter and 12-byte nonce, all zero: keys are never reused


def apply_mask(vector: np.ndarray, seed: bytes, *, subtract: bool = False) -> None:
    """Add (or subtract) the mask of `seed` to the unsigned 1-D `vector`, in place."""
    if vector.dtype not in (np.uint32, np.uint64) or vector.ndim != 1:
        raise TypeError(f"masks apply to 1-D uint32/uint64 vectors, not {vector.dtype}")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    itemsize = vector.dtype.itemsize
    zeros = bytes(CHUNK * itemsize)
    for start in range(0, vector.size, CHUNK):
        stop = min(start + CHUNK, vector.size)
        block = stream.update(zeros[: (stop - start) * itemsize])
        mask = np.frombuffer(block, dtype=vector.dtype)
        if subtract:
            np.subtract(vector[start:stop], mask, out=vector[start:stop])
        else:
            np.add(vector[start:stop], mask, out=vector[start:stop])


def mask_of(seed: bytes, size: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """The whole mask of `seed` (tests and small vectors; the protocol uses `apply_mask`)."""
    vector = np.zeros(size, dtype=dtype)
    apply_mask(vector, seed)
    return vector
