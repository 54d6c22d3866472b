"""The node's noise key: DP noise the coordinator cannot predict, and that a re-run cannot split.

A deployed node seeds each release's randomness (Poisson sampling and
Gaussian noise) with HMAC-SHA256(noise key, everything the release depends
on: the job, the round, the dataset's fingerprint and the exact global model
received). The key is 32 random bytes made on the node the first time it is
needed, kept in `<state_dir>/keys/noise.key` (0600), and never sent.

Why derived rather than fresh entropy per message:
- The coordinator knows the job seed, the node's name and the model; without
  the key it cannot regenerate, and subtract, the noise.
- Asking the same question twice (a coordinator resuming a round it lost in
  a crash, or re-submitting an identical job) gets the identical answer, so
  repeated queries cannot be averaged to wash the noise out; any change in
  the question (another model, round or job) gets independent noise. The
  ledger still charges every release, so a repeat is over-counted, never
  under-counted.
- A coordinator crash followed by `consortia job resume` therefore reproduces
  the interrupted round bit for bit: the resumed run ends with the same model
  as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from consortia.common.atomic import fsync_dir
from consortia.common.errors import ConfigError

KEY_BYTES = 32
_MODE = 0o600


def noise_key_path(state_dir: Path) -> Path:
    return state_dir / "keys" / "noise.key"


def noise_key(state_dir: Path) -> bytes:
    """The node's noise key, created (exclusively, durably, 0600) on first use."""
    path = noise_key_path(state_dir)
    if not path.exists():
        _create(path)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"{path}: the node's noise key is damaged ({len(key)} bytes, expected {KEY_BYTES}); "
            "restore it from backup, or delete it to let the node make a new one"
        )
    return key


def _create(path: Path) -> None:
    """Write a fresh key to a temp file, then link it into place unless another process won."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(KEY_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # a concurrent first use made one: use it
            os.link(temp, path)
        fsync_dir(path.parent)
    finally:
        temp.unlink(missing_ok=True)


def derive_secret(key: bytes, parts: Iterable[bytes]) -> int:
    """128 bits of HMAC-SHA256(key, parts), each part length-prefixed (no ambiguity)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "big"))
        mac.update(part)
    return int.from_bytes(mac.digest()[:16], "big")
