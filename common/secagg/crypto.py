"""Key agreement and sealed shares for SecAgg+, all from `cryptography`.

Each node makes two fresh X25519 key pairs per round: `c` to agree the keys
that seal the shares it sends through the coordinator (AES-GCM), `s` to
agree the pairwise mask seeds with its neighbours. The raw Diffie–Hellman
output is never used as a key: HKDF-SHA256 derives one key per purpose,
bound to the round's context (run, round), so keys of two rounds or two
purposes never coincide.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_BYTES = 32
NONCE_BYTES = 12
SHARE_KEY = b"consortia secagg+ share key"
MASK_KEY = b"consortia secagg+ pairwise mask"


class SealError(ValueError):
    """A sealed share that does not open: wrong key, wrong addressee, or tampered with."""


def new_private_key() -> bytes:
    """A fresh X25519 private key, raw 32 bytes."""
    return X25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )


def public_key(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


class PrivateKey:
    """One X25519 private key, loaded once for the several agreements of a stage."""

    def __init__(self, private: bytes) -> None:
        self._key = X25519PrivateKey.from_private_bytes(private)

    def agree(self, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
        """The 32-byte key both ends derive: HKDF(X25519(self, peer), info = purpose ‖ context)."""
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # wrong length, or a low-order point (all-zero secret)
            raise SealError(f"unusable public key: {exc}") from None
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose + context)
        return hkdf.derive(shared)


def _associated(context: bytes, src: int, dst: int) -> bytes:
    return context + struct.pack(">QQ", src, dst)


def seal(key: bytes, plaintext: bytes, context: bytes, src: int, dst: int) -> bytes:
    """AES-GCM under `key`; sender, addressee and round are authenticated, not just encrypted."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _associated(context, src, dst))


def open_sealed(key: bytes, sealed: bytes, context: bytes, src: int, dst: int) -> bytes:
    if len(sealed) <= NONCE_BYTES:
        raise SealError("sealed share too short")
    try:
        return AESGCM(key).decrypt(
            sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _associated(context, src, dst)
        )
    except InvalidTag:
        raise SealError(f"sealed share from node {src} to {dst} does not open") from None
