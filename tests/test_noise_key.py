"""The node's noise key: private, stable, and a PRF that separates every question."""

from __future__ import annotations

import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from consortia.client.noise_key import derive_secret, noise_key, noise_key_path
from consortia.common.errors import ConfigError


def test_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    first = noise_key(tmp_path)
    assert len(first) == 32
    assert stat.S_IMODE(noise_key_path(tmp_path).stat().st_mode) == 0o600
    assert noise_key(tmp_path) == first
    assert noise_key(tmp_path / "other") != first


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    with ProcessPoolExecutor(4) as pool:
        keys = set(pool.map(noise_key, [tmp_path] * 8))
    assert len(keys) == 1
    assert [p.name for p in noise_key_path(tmp_path).parent.iterdir()] == ["noise.key"]


def test_damaged_key_is_a_clear_error(tmp_path: Path) -> None:
    noise_key(tmp_path)
    noise_key_path(tmp_path).write_bytes(b"short")
    with pytest.raises(ConfigError, match="damaged"):
        noise_key(tmp_path)


def test_same_question_same_secret_any_change_another() -> None:
    key = bytes(range(32))
    base = [b"job", b"fingerprint", b"train", b"2", b"model"]
    secret = derive_secret(key, base)
    assert derive_secret(key, base) == secret
    assert derive_secret(bytes(32), base) != secret
    for i in range(len(base)):
        changed = [*base[:i], base[i] + b"x", *base[i + 1 :]]
        assert derive_secret(key, changed) != secret
    # Length prefixes: moving a byte across a part boundary is another question.
    assert derive_secret(key, [b"ab", b"c"]) != derive_secret(key, [b"a", b"bc"])
    assert 0 <= secret < 2**128
