"""A tamper-evident, append-only audit log: one JSON line per event, each chained to the last.

Why a hash chain: the privacy ledger is the source of truth for ε, but an
operator (or an auditor after an incident) also needs to know *what
happened*: which data was registered, which update left with what noise,
which job was refused and why. A plain log can be edited silently; here
every entry carries the sha256 of the line before it, so editing, deleting,
inserting or reordering an entry breaks the chain at a line `verify` names.

Format (one file, UTF-8, one entry per line, each line ends with "\\n")::

    {"actor":"st-mary","details":{...},"event":"data.registered",
     "prev_sha256":"<64 hex>","seq":0,"time_utc":"2025-01-31T12:00:00.123Z"}

- **Canonical serialisation.** A line is exactly
  `json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
  allow_nan=False)` encoded as UTF-8 (`canonical_line`), so one entry has one
  byte form; `verify` flags a line in any other form (rewritten by a tool).
  JSON escapes every newline inside strings, so lines split on b"\\n" only.
- **The chain.** `prev_sha256` is the hex sha256 of the previous line's exact
  bytes without its "\\n" (`line_sha256`); the first entry uses 64 zeros
  (`GENESIS_SHA256`). `seq` counts from 0 without gaps. The *head* is the
  sha256 of the last line: the value an operator keeps to detect truncation.
- **Several writers.** The coordinator's supervisor and its ServerApp (or a
  node's CLI and its ClientApp) may append to one file: every append takes
  an exclusive `fcntl.flock` on the log file itself, reads the last line
  (seeking from the end, so the cost does not grow with the file), appends
  one line, and `os.fsync`s before releasing the lock. An append returns
  only once its line is on disk. (flock is per open file, on local disks;
  keep the log off network shares, like the ledger.)
- **A torn tail.** A crash in the middle of an append can leave a last line
  without its "\\n". It never was an acknowledged entry (its append had not
  returned), so the next append cuts it off and first records
  `audit.recovered` with the discarded bytes' length, sha256 and text
  (decoded with replacement, at most `MAX_DISCARDED_TEXT` characters), then
  chains its own entry onto the last complete line: the chain never rests on
  garbage, a crash never stops later appends, and the repair is itself on
  the record. A last *complete* line that is not a valid entry (an edit, not
  a crash) makes `append` refuse with `AuditError`.

- **The anchor.** The chain alone cannot show that entries were removed from
  the end (the shorter file is a valid chain), nor that the last line was
  edited (nothing chains onto it). So every append, still under the lock and
  after the log's fsync, also rewrites `<log>.anchor` atomically (temporary
  file, fsync, rename): `{"entries":N,"head_sha256":"<sha256 of line N>"}`.
  `verify` reads the anchor *before* the log (an append in between only adds
  lines) and, when every line is intact, requires line N to be there with
  that hash. A missing anchor beside a non-empty log is a problem too.

What `verify` proves, and what it cannot: every line from the first to the
last is an unmodified entry in its original order, with no entry removed or
added between two others, and (through the anchor) nothing removed from or
edited at the end by someone who left the anchor alone. It **cannot** see a
log and anchor rewritten together, by someone who recomputes every hash
(there is no secret key): an anchor on the same disk raises the bar, it is
not a witness. The witness is a head kept elsewhere: `verify(path,
expect_head=..., expect_count=...)` (`consortia audit verify --expect-head
SHA --expect-count N`) checks that the entry whose sha256 an operator wrote
down earlier is still in the chain, and that the log holds at least that
many entries. Appends after an anchor are expected and pass.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from consortia.common.atomic import fsync_dir, write_bytes_atomic
from consortia.common.errors import ConsortiaError

GENESIS_SHA256 = "0" * 64
"""`prev_sha256` of the first entry: there is no previous line."""
FILE_MODE = 0o600  # the log names nodes, datasets and jobs
LOCK_TIMEOUT_S = 30.0  # how long an append waits for another writer's lock
MAX_DISCARDED_TEXT = 4096  # characters of a torn tail kept in its `audit.recovered` entry
RECOVERED_EVENT = "audit.recovered"
ANCHOR_SUFFIX = ".anchor"  # audit.jsonl -> audit.jsonl.anchor
EVENT_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"
_TIME_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{3})?Z$"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIRST_CHUNK = 8192


class AuditError(ConsortiaError):
    """The audit log cannot be read or appended to (missing, unwritable, edited, locked)."""


class AuditEntry(BaseModel):
    """One event: who (`actor`) did what (`event`, `details`), when, chained to the entry before."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    seq: int = Field(ge=0, description="0 for the first entry, then +1 per entry")
    time_utc: str = Field(pattern=_TIME_PATTERN, description="ISO 8601 UTC, ms, 'Z'")
    actor: str = Field(min_length=1, max_length=200, description="'coordinator' or a node name")
    event: str = Field(pattern=EVENT_PATTERN, description="dotted name, e.g. 'node.enrolled'")
    details: dict[str, JsonValue]
    prev_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @property
    def time(self) -> datetime:
        """`time_utc` as an aware datetime."""
        return datetime.fromisoformat(self.time_utc)


class AuditProblem(BaseModel):
    """One thing `verify` found wrong; `line` is 1-based (None: the log as a whole)."""

    model_config = ConfigDict(frozen=True)

    line: int | None
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


class AuditAnchor(BaseModel):
    """`<log>.anchor`: how many entries the log held after the last append, and its head."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    entries: int = Field(ge=0)
    head_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def anchor_path(path: Path) -> Path:
    """Where the anchor of the audit log at `path` is kept: beside it."""
    path = Path(path)
    return path.with_name(path.name + ANCHOR_SUFFIX)


class VerifyReport(BaseModel):
    """What `verify` read: complete lines, the head hash, problems, and notes that are not."""

    model_config = ConfigDict(frozen=True)

    path: Path
    entries: int = Field(description="complete lines (each should be one entry)")
    head_sha256: str = Field(description="sha256 of the last complete line; zeros when empty")
    problems: tuple[AuditProblem, ...] = ()
    notes: tuple[str, ...] = Field(default=(), description="recorded recoveries of torn tails")

    @property
    def ok(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------ format


def json_list(values: Iterable[JsonValue]) -> list[JsonValue]:
    """`values` as a detail: a `list[str]` is JSON, but not a `list[JsonValue]` to mypy (lists
    are invariant), and `append` checks details against pydantic's JsonValue."""
    return list(values)


def json_object(values: Mapping[str, JsonValue]) -> dict[str, JsonValue]:
    """`values` as a detail (a `dict[str, float]` is JSON; see `json_list`)."""
    return dict(values)


def canonical_line(entry: AuditEntry) -> bytes:
    """The one byte form of `entry` (no trailing newline): what is written and hashed."""
    try:
        return _canonical(entry.model_dump(mode="json"))
    except ValueError as exc:  # NaN or ∞ in the details: not JSON
        raise AuditError(
            f"audit event {entry.event!r}: its details are not valid JSON ({exc})"
        ) from None


def line_sha256(line: bytes) -> str:
    """Hex sha256 of one line's exact bytes, without its newline: the next entry's prev_sha256."""
    return hashlib.sha256(line).hexdigest()


def _canonical(payload: Any) -> bytes:
    text = json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_line(line: bytes) -> AuditEntry:
    """An entry from one line's bytes; `ValueError` (with a short reason) if it is not one."""
    try:
        payload = json.loads(line, parse_constant=_reject_constant)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise ValueError("not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError("not a JSON object")
    try:
        return AuditEntry.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "entry"
        raise ValueError(f"not an audit entry ({where}: {error['msg']})") from None


def _now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------ appending


class AuditLog:
    """Appends `actor`'s events to the JSONL audit log at `path` (created 0600 when missing)."""

    def __init__(self, path: Path, actor: str) -> None:
        self.path = Path(path)
        self.actor = actor

    def append(self, event: str, /, **details: JsonValue) -> AuditEntry:
        """Append one entry, durably (fsync'd before this returns), under the file's lock.

        Raises `AuditError` if the log cannot be opened, locked or written, if
        `event` or `details` are invalid, or if its last complete line is not
        a valid entry (the log was edited: run `consortia audit verify`).
        """
        fd, created = self._open()
        wrote = False
        try:
            _lock(fd, self.path)
            tail = _read_tail(fd, os.fstat(fd).st_size)
            previous = _last_entry(tail.last_line, self.path)
            seq = 0 if previous is None else previous.seq + 1
            prev_sha = GENESIS_SHA256 if tail.last_line is None else line_sha256(tail.last_line)
            lines: list[bytes] = []
            if tail.torn:  # a crashed append: cut it off, and say so in the chain
                recovered = self._entry(seq, prev_sha, RECOVERED_EVENT, _recovery(tail.torn))
                lines.append(canonical_line(recovered))
                seq, prev_sha = seq + 1, line_sha256(lines[-1])
            entry = self._entry(seq, prev_sha, event, details)
            lines.append(canonical_line(entry))
            if tail.torn:
                os.ftruncate(fd, tail.complete_end)
            _write_all(fd, b"".join(line + b"\n" for line in lines), self.path)
            os.fsync(fd)
            wrote = True
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot append to the audit log ({exc})") from None
        finally:
            if not wrote:
                os.close(fd)  # also releases the lock
        try:  # still under the lock, so anchors are written in the order of their lines
            head = AuditAnchor(entries=entry.seq + 1, head_sha256=line_sha256(lines[-1]))
            _write_anchor(self.path, head)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        return entry

    def _entry(self, seq: int, prev_sha: str, event: str, details: dict[str, Any]) -> AuditEntry:
        try:
            return AuditEntry(
                seq=seq,
                time_utc=_now_utc(),
                actor=self.actor,
                event=event,
                details=details,
                prev_sha256=prev_sha,
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise AuditError(
                f"audit event {event!r} of {self.actor!r} is invalid ({where}: {error['msg']}); "
                "events are dotted lowercase words (e.g. 'node.enrolled'), details JSON values"
            ) from None

    def _open(self) -> tuple[int, bool]:
        """A read/append descriptor, and whether this call created the file (mode 0600)."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE), True
            except FileExistsError:
                return os.open(self.path, flags), False
        except OSError as exc:
            raise AuditError(f"{self.path}: cannot open the audit log ({exc})") from None


def _write_anchor(path: Path, anchor: AuditAnchor) -> None:
    """Replace the log's anchor atomically and durably (after the log's own fsync)."""
    target = anchor_path(path)
    try:
        write_bytes_atomic(target, _canonical(anchor.model_dump()) + b"\n", mode=FILE_MODE)
    except OSError as exc:
        raise AuditError(
            f"{target}: the entry is in the audit log, but its anchor cannot be written ({exc}); "
            "make the log's folder writable: without the anchor a truncated log goes unnoticed"
        ) from None


def read_anchor(path: Path) -> AuditAnchor | None:
    """The anchor of the log at `path`; None if there is none; `ValueError` if it is damaged."""
    target = anchor_path(path)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    try:
        return AuditAnchor.model_validate_json(raw)
    except ValidationError:
        raise ValueError("is not an anchor (edited or damaged)") from None


def _lock(fd: int, path: Path) -> None:
    """Exclusive flock, polling so that a writer stuck elsewhere gives an error, not a hang."""
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        if time.monotonic() > deadline:
            raise AuditError(
                f"{path}: another process has held the audit log's lock for over "
                f"{LOCK_TIMEOUT_S:g} s; check for a hung consortia process"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class _Tail:
    """The end of the file: the last complete line, and bytes after it without a newline."""

    def __init__(self, last_line: bytes | None, complete_end: int, torn: bytes) -> None:
        self.last_line = last_line
        self.complete_end = complete_end
        self.torn = torn


def _read_tail(fd: int, size: int) -> _Tail:
    """Read backwards (chunks doubling) until the last complete line is whole in the buffer."""
    buffer, start, chunk = b"", size, _FIRST_CHUNK
    while True:
        last_newline = buffer.rfind(b"\n")
        if last_newline >= 0 and (start == 0 or buffer.rfind(b"\n", 0, last_newline) >= 0):
            break
        if start == 0:
            break
        begin = max(0, start - chunk)
        buffer = os.pread(fd, start - begin, begin) + buffer
        start, chunk = begin, chunk * 2
    last_newline = buffer.rfind(b"\n")
    if last_newline < 0:
        return _Tail(None, 0, buffer)
    line_start = buffer.rfind(b"\n", 0, last_newline) + 1
    complete_end = start + last_newline + 1
    return _Tail(buffer[line_start:last_newline], complete_end, buffer[last_newline + 1 :])


def _last_entry(line: bytes | None, path: Path) -> AuditEntry | None:
    """The entry the next one chains onto; `AuditError` if the last line is not one."""
    if line is None:
        return None
    try:
        return parse_line(line)
    except ValueError as exc:
        raise AuditError(
            f"{path}: the last line of the audit log is {exc}, so nothing can be chained onto "
            f"it; the log was edited. Run `consortia audit verify {path}`, keep the file as "
            "evidence, and start a new log"
        ) from None


def _recovery(torn: bytes) -> dict[str, Any]:
    return {
        "discarded_bytes": len(torn),
        "discarded_sha256": line_sha256(torn),
        "discarded_text": torn.decode("utf-8", errors="replace")[:MAX_DISCARDED_TEXT],
    }


def _write_all(fd: int, data: bytes, path: Path) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - a regular file writes or raises
            raise AuditError(f"{path}: the audit log accepted no bytes")
        view = view[written:]


# ------------------------------------------------------------------ reading


def iter_entries(path: Path) -> Iterator[AuditEntry]:
    """The log's entries in order; `AuditError` at the first line that is not one.

    Reads entries only: it does not check the chain (that is `verify`).
    """
    with _open_for_reading(Path(path)) as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                raise AuditError(f"{path}: line {number} is torn (no newline)")
            try:
                yield parse_line(raw[:-1])
            except ValueError as exc:
                raise AuditError(f"{path}: line {number} is {exc}") from None


@contextlib.contextmanager
def _open_for_reading(path: Path) -> Iterator[Any]:
    if path.is_dir():
        raise AuditError(f"{path}: is a folder, not an audit log file")
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise AuditError(f"{path}: no such audit log") from None
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit log ({exc.strerror or exc})") from None
    with handle:
        yield handle


def verify(
    path: Path, *, expect_head: str | None = None, expect_count: int | None = None
) -> VerifyReport:
    """Check every line, the seq numbers and the chain; optionally an anchor kept elsewhere.

    Streams the file (memory does not grow with it). At most one problem per
    line, the most specific: not JSON / not an entry, then seq, then chain,
    then canonical form. When every line is intact, the log's anchor
    (`<log>.anchor`, written by every append) must be there and name line N
    with its hash: this catches a truncated tail or an edited last line,
    which the chain alone cannot. With a damaged line the log fails anyway
    and the anchor's line numbers may have shifted, so it is not compared.
    `expect_head`: the sha256 of an entry recorded earlier, elsewhere (e.g.
    the head an earlier `verify` printed), which must still be in the chain;
    `expect_count`: the log must hold at least that many entries. Raises
    `AuditError` if the file cannot be read or `expect_head` is not a sha256.
    """
    path = Path(path)
    if expect_head is not None:
        expect_head = expect_head.strip().lower()
        if not _HEX64.fullmatch(expect_head):
            raise AuditError(
                f"--expect-head must be a full sha256 (64 hex digits), got {expect_head!r}"
            )
    if expect_count is not None and expect_count < 0:
        raise AuditError(f"--expect-count must be ≥ 0, got {expect_count}")
    problems: list[AuditProblem] = []
    notes: list[str] = []
    head, entries, expected_seq, head_found = GENESIS_SHA256, 0, 0, expect_head == GENESIS_SHA256
    anchor = _anchor_or_problem(path)  # before the log: a concurrent append only adds lines
    empty_anchor = isinstance(anchor, AuditAnchor) and not anchor.entries
    anchored_sha = GENESIS_SHA256 if empty_anchor else None
    with _open_for_reading(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                problems.append(AuditProblem(line=number, message=_TORN))
                break
            line = raw[:-1]
            problem, entry = _check_line(line, number, head, expected_seq)
            if problem is not None:
                problems.append(AuditProblem(line=number, message=problem))
            if entry is not None:
                expected_seq = max(expected_seq, entry.seq + 1)
                if entry.event == RECOVERED_EVENT and problem is None:
                    notes.append(
                        f"line {number}: an interrupted append was discarded here "
                        f"({entry.details.get('discarded_bytes')} bytes, {RECOVERED_EVENT})"
                    )
            else:
                expected_seq += 1
            head, entries = line_sha256(line), entries + 1
            head_found = head_found or head == expect_head
            if isinstance(anchor, AuditAnchor) and entries == anchor.entries:
                anchored_sha = head
    if not problems:
        problems += _anchor_file_problems(path, anchor, anchored_sha, entries)
    problems += _anchor_problems(expect_head, head_found, expect_count, entries)
    return VerifyReport(
        path=path, entries=entries, head_sha256=head, problems=tuple(problems), notes=tuple(notes)
    )


_TORN = (
    "torn final line (no newline: an append was interrupted); the next append discards it "
    f"and records {RECOVERED_EVENT}"
)


def _check_line(
    line: bytes, number: int, previous_sha: str, expected_seq: int
) -> tuple[str | None, AuditEntry | None]:
    """(problem or None, the entry if the line is one) for one complete line."""
    if not line:
        return "empty line (an entry was blanked out)", None
    try:
        entry = parse_line(line)
    except ValueError as exc:
        return str(exc), None
    if entry.seq != expected_seq:
        return (
            f"seq {entry.seq} where {expected_seq} expected "
            "(entries were deleted, inserted or reordered)",
            entry,
        )
    if entry.prev_sha256 != previous_sha:
        if number == 1:
            return "prev_sha256 is not 64 zeros, as the first entry's must be", entry
        return (
            f"prev_sha256 does not match line {number - 1} (line {number - 1} was edited, or "
            "entries were deleted, inserted or reordered)",
            entry,
        )
    if _canonical(json.loads(line)) != line:
        return "not in canonical form (the line was rewritten by another tool)", entry
    return None, entry


def _anchor_or_problem(path: Path) -> AuditAnchor | str | None:
    """The log's anchor, or what is wrong with its file (None: there is none)."""
    try:
        return read_anchor(path)
    except ValueError as exc:
        return f"its anchor {anchor_path(path).name} {exc}"


def _anchor_file_problems(
    path: Path, anchor: AuditAnchor | str | None, anchored_sha: str | None, entries: int
) -> list[AuditProblem]:
    """What the anchor beside an intact chain says is missing or changed at its end."""
    name = anchor_path(path).name
    if isinstance(anchor, str):
        return [AuditProblem(line=None, message=anchor)]
    if anchor is None:
        if not entries:
            return []
        return [
            AuditProblem(
                line=None,
                message=f"its anchor {name} is missing: every append writes it, so it was "
                "deleted and entries may have been removed from the log's end (a log last "
                "written by a consortia without anchors gets one at its next append)",
            )
        ]
    if entries < anchor.entries:
        return [
            AuditProblem(
                line=None,
                message=f"the log holds {entries} entries, fewer than the {anchor.entries} its "
                f"anchor {name} recorded (entries were removed from its end)",
            )
        ]
    if anchored_sha != anchor.head_sha256:
        return [
            AuditProblem(
                line=anchor.entries,
                message=f"is not the entry its anchor {name} recorded there (the line was "
                "edited after it was written)",
            )
        ]
    return []


def _anchor_problems(
    expect_head: str | None, head_found: bool, expect_count: int | None, entries: int
) -> list[AuditProblem]:
    problems = []
    if expect_count is not None and entries < expect_count:
        problems.append(
            AuditProblem(
                line=None,
                message=f"the log holds {entries} entries, fewer than the {expect_count} "
                "expected (entries were removed from its end)",
            )
        )
    if expect_head is not None and not head_found:
        problems.append(
            AuditProblem(
                line=None,
                message=f"no entry has the expected head sha256 {expect_head} (the log was "
                "truncated or rewritten after that head was recorded)",
            )
        )
    return problems
