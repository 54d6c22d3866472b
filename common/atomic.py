"""Crash-safe file writes: temp file in the same folder, fsync, rename.

A reader (or a restarted process) sees either the old file or the whole new
one, never half of it.

Permissions: a file is 0600 (its owner only) unless its writer says
otherwise: an exact mode (0o644 for a certificate), or `FileAccess.UMASK`
for what is meant to be shared, a run's outputs (metrics.json,
report.html, plots, models, checkpoints, sweeps): 0666 less the process
umask, as `open()` would create it (0644 under the usual umask 022, 0640
under 027). Private keys, node-side files and the coordinator's registries
keep the 0600 default.
"""

from __future__ import annotations

import enum
import json
import os
import secrets
from pathlib import Path
from typing import Any


class FileAccess(enum.Enum):
    """Who may read a file written without an exact numeric mode."""

    OWNER_ONLY = "owner-only"  # 0600, whatever the umask
    UMASK = "umask"  # 0666 less the process umask: a run output an operator may pass on


def write_bytes_atomic(
    path: Path, data: bytes, mode: int | FileAccess = FileAccess.OWNER_ONLY
) -> None:
    """Write `data` to `path` atomically and durably.

    `mode` (e.g. 0o600 for a private key, 0o644 for a certificate, or a
    `FileAccess`) is set on the temporary file before any byte is written,
    so the content is never readable with looser permissions, not even for
    an instant.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600, or 0666 for the kernel to take the umask off (as open() does).
    fd, tmp_name = _new_temp(path, 0o666 if mode is FileAccess.UMASK else 0o600)
    try:
        if isinstance(mode, int):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp_name).replace(path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(
    path: Path, payload: Any, mode: int | FileAccess = FileAccess.OWNER_ONLY
) -> None:
    """Write `payload` as indented, key-sorted JSON (stable bytes for diffing)."""
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), mode)


# As mkstemp opens: never an existing file (nor a link planted there), binary, not inherited.
_CREATE = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_BINARY", 0)
)


def _new_temp(path: Path, mode: int) -> tuple[int, str]:
    """A new empty `.<name>.<random>.tmp` beside `path`, created with `mode` less the umask.

    `tempfile.mkstemp` would always create 0600; the name pattern is the one
    a resumed run's cleanup removes (`.*.tmp`).
    """
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(name, _CREATE, mode), name
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary name for {path.name}")


def fsync_dir(directory: Path) -> None:
    """Persist a rename or a new file's entry (POSIX needs the directory synced too)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
