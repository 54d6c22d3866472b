"""Atomic writes and the permissions of what they write (issue 18: run files were always 0600)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from consortia.common.atomic import FileAccess, write_bytes_atomic, write_json_atomic


@pytest.fixture
def umask() -> Iterator[None]:
    """Each test sets the umask it needs; the process gets its own back."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_shared_file_gets_what_the_umask_allows(tmp_path: Path, mask: int, expected: int) -> None:
    os.umask(mask)
    write_json_atomic(tmp_path / "metrics.json", {"a": 1}, FileAccess.UMASK)
    write_bytes_atomic(tmp_path / "report.html", b"<html>", FileAccess.UMASK)
    assert _mode(tmp_path / "metrics.json") == _mode(tmp_path / "report.html") == expected


@pytest.mark.usefixtures("umask")
def test_anything_else_stays_owner_only_or_exactly_as_asked(tmp_path: Path) -> None:
    """The default is 0600 whatever the umask (a node's registry, the enrollment list);
    an exact mode (a private key 0600, a certificate 0644) ignores the umask too."""
    os.umask(0o000)
    write_bytes_atomic(tmp_path / "registration.json", b"{}")
    write_bytes_atomic(tmp_path / "node.key", b"secret", mode=0o600)
    write_bytes_atomic(tmp_path / "ca.pem", b"cert", mode=0o644)
    assert _mode(tmp_path / "registration.json") == 0o600
    assert _mode(tmp_path / "node.key") == 0o600
    assert _mode(tmp_path / "ca.pem") == 0o644


def test_a_rewrite_replaces_the_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out" / "metrics.json"
    write_json_atomic(path, {"round": 1}, FileAccess.UMASK)
    write_json_atomic(path, {"round": 2}, FileAccess.UMASK)
    assert path.read_text() == '{\n  "round": 2\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
