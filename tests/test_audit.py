"""The tamper-evident audit log: the chain, `consortia audit verify`, and the node's events.

Real files in temporary folders throughout. Tampering is done the way a
person would do it, by editing the file's lines; the concurrent test runs
real processes appending to one file.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliRunner, flower_context, one_cli_error

from consortia.common.audit import (
    GENESIS_SHA256,
    RECOVERED_EVENT,
    AuditError,
    AuditLog,
    anchor_path,
    canonical_line,
    iter_entries,
    line_sha256,
    parse_line,
    verify,
)

NODE = "st-mary"


def _log(tmp_path: Path, entries: int = 6, name: str = "audit.jsonl") -> Path:
    path = tmp_path / name
    log = AuditLog(path, "coordinator")
    for i in range(entries):
        log.append("round.started", round=i + 1, job="cancer-1", note="é ✓")
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _problems(path: Path, **anchors: object) -> list[str]:
    return [str(problem) for problem in verify(path, **anchors).problems]  # type: ignore[arg-type]


# ------------------------------------------------------------------ format and chain


def test_append_and_verify_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"  # the folder is created
    log = AuditLog(path, NODE)
    first = log.append("data.registered", dataset="cardio", records=303, ratio=0.25, ok=True)
    second = log.append("node.refusal", code="noise-too-low", reason="σ 0.4 < 0.8\nnext line")
    assert (first.seq, second.seq) == (0, 1)
    assert first.prev_sha256 == GENESIS_SHA256
    lines = _lines(path)
    assert len(lines) == 2  # a newline inside a string is escaped: one entry, one line
    assert second.prev_sha256 == hashlib.sha256(lines[0]).hexdigest()
    # The canonical form: sorted keys, no spaces, UTF-8 as is.
    assert lines[1] == json.dumps(
        second.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    assert "σ" in lines[1].decode("utf-8")
    assert list(iter_entries(path)) == [first, second]
    assert first.details == {"dataset": "cardio", "records": 303, "ratio": 0.25, "ok": True}
    assert first.actor == NODE and first.time.utcoffset() is not None

    report = verify(path)
    assert report.ok and report.entries == 2 and report.problems == ()
    assert report.head_sha256 == line_sha256(lines[1])


def test_new_log_is_private(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=1)
    assert path.stat().st_mode & 0o777 == 0o600


def test_empty_log_verifies_with_the_genesis_head(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").touch()
    report = verify(tmp_path / "audit.jsonl")
    assert report.ok and report.entries == 0 and report.head_sha256 == GENESIS_SHA256


def test_invalid_events_and_details_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", NODE)
    with pytest.raises(AuditError, match="invalid"):
        log.append("Refused!")
    with pytest.raises(AuditError, match="not valid JSON"):
        log.append("privacy.spend", epsilon_after=float("nan"))
    assert not (tmp_path / "audit.jsonl").read_bytes()  # nothing half-written


def test_long_entries_are_found_from_the_end(tmp_path: Path) -> None:
    # The last line is read backwards in growing chunks; make it span several.
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, NODE)
    log.append("node.refusal", reason="x" * 50_000)
    log.append("node.refusal", reason="y" * 20_000)
    assert log.append("node.refusal", reason="short").seq == 2
    assert verify(path).ok


# ------------------------------------------------------------------ tampering


def _edit(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"round":3', b'"round":9')
    return lines


def _delete(lines: list[bytes]) -> list[bytes]:
    del lines[2]
    return lines


def _insert(lines: list[bytes]) -> list[bytes]:
    # A forged entry chained correctly onto line 2, taking the seq of the entry it displaces.
    forged = json.loads(lines[2])
    forged["details"] = {"round": 99}
    forged["prev_sha256"] = line_sha256(lines[1])
    text = json.dumps(forged, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    lines.insert(2, text.encode("utf-8"))
    return lines


def _swap(lines: list[bytes]) -> list[bytes]:
    lines[2], lines[3] = lines[3], lines[2]
    return lines


TAMPERING: dict[str, tuple[Callable[[list[bytes]], list[bytes]], list[str]]] = {
    "edited line": (
        _edit,
        ["line 4: prev_sha256 does not match line 3 (line 3 was edited"],
    ),
    "deleted line": (_delete, ["line 3: seq 3 where 2 expected"]),
    "inserted line": (_insert, ["line 4: seq 2 where 3 expected"]),
    "reordered pair": (
        _swap,
        [
            "line 3: seq 3 where 2 expected",
            "line 4: seq 2 where 4 expected",
            "line 5: prev_sha256 does not match line 4",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_verify_names_the_tampered_line(
    tmp_path: Path, consortia_cli: CliRunner, case: str
) -> None:
    edit, expected = TAMPERING[case]
    path = _log(tmp_path)
    _write_lines(path, edit(_lines(path)))

    problems = _problems(path)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problems

    result = consortia_cli("audit", "verify", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    printed = result.stdout.splitlines()
    for start in expected:  # one line per problem, not wrapped
        assert any(line.startswith(start) for line in printed), printed
    assert printed[-1].startswith("not ok:")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(lambda s: s[:40] + b"}", "line 2: not valid JSON", id="not JSON"),
        pytest.param(lambda s: b"[1, 2]", "line 2: not a JSON object", id="not an object"),
        pytest.param(
            lambda s: s.replace(b'"seq":1', b'"seq":"1"'),
            "line 2: not an audit entry (seq:",
            id="wrong type",
        ),
        pytest.param(
            lambda s: s.replace(b'"actor":', b'"role":"x","actor":'),
            "line 2: not an audit entry (role:",
            id="extra field",
        ),
        pytest.param(lambda s: b"", "line 2: empty line", id="blanked"),
        pytest.param(
            lambda s: json.dumps(json.loads(s), sort_keys=True).encode(),
            "line 2: not in canonical form",
            id="reformatted",
        ),
    ],
)
def test_damaged_lines(tmp_path: Path, damage: Callable[[bytes], bytes], expected: str) -> None:
    path = _log(tmp_path, entries=2)
    lines = _lines(path)
    lines[1] = damage(lines[1])
    _write_lines(path, lines)
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_first_entry_must_chain_onto_zeros(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=1)
    entry = json.loads(_lines(path)[0])
    entry["prev_sha256"] = "1" * 64
    text = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    _write_lines(path, [text.encode()])
    assert _problems(path) == ["line 1: prev_sha256 is not 64 zeros, as the first entry's must be"]


# ------------------------------------------------------------------ truncation and anchors


def test_anchors_catch_a_truncated_tail(tmp_path: Path, consortia_cli: CliRunner) -> None:
    path = _log(tmp_path, entries=5)
    ok = consortia_cli("audit", "verify", str(path), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    head = verify(path).head_sha256
    assert ok.stdout.strip() == f"ok: 5 entries, head sha256 {head}"

    _write_lines(path, _lines(path)[:3])  # the last two entries removed
    # The chain alone cannot tell; the anchor beside the log can (next tests), and so can
    # an anchor kept elsewhere. Without the one beside it, only the latter catches it.
    anchor_path(path).unlink()
    assert _problems(path) == [_MISSING_ANCHOR]
    anchored = consortia_cli(
        "audit", "verify", str(path), "--expect-head", head, "--expect-count", "5", cwd=tmp_path
    )
    assert anchored.returncode == 1, anchored.stdout + anchored.stderr
    assert "3 entries, fewer than the 5 expected" in anchored.stdout
    assert f"no entry has the expected head sha256 {head}" in anchored.stdout
    assert _problems(path, expect_count=5) and _problems(path, expect_head=head)


_MISSING_ANCHOR = (
    "its anchor audit.jsonl.anchor is missing: every append writes it, so it was deleted and "
    "entries may have been removed from the log's end (a log last written by a consortia "
    "without anchors gets one at its next append)"
)


def test_the_anchor_beside_the_log_catches_a_truncated_tail_without_flags(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    path = _log(tmp_path, entries=5)
    assert json.loads(anchor_path(path).read_bytes()) == {
        "entries": 5,
        "head_sha256": verify(path).head_sha256,
    }
    _write_lines(path, _lines(path)[:3])  # the last two entries removed: still a valid chain
    assert _problems(path) == [
        "the log holds 3 entries, fewer than the 5 its anchor audit.jsonl.anchor recorded "
        "(entries were removed from its end)"
    ]
    result = consortia_cli("audit", "verify", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fewer than the 5 its anchor" in result.stdout
    _write_lines(path, [])  # every entry removed
    assert _problems(path)[0].startswith("the log holds 0 entries, fewer than the 5")


def test_the_anchor_catches_an_edited_last_line_without_flags(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=4)
    lines = _lines(path)
    entry = parse_line(lines[-1])
    forged = entry.model_copy(update={"details": {"round": 1, "job": "other", "note": "é ✓"}})
    lines[-1] = canonical_line(forged)  # canonical, right seq, chained: only the anchor knows
    _write_lines(path, lines)
    assert _problems(path) == [
        "line 4: is not the entry its anchor audit.jsonl.anchor recorded there (the line was "
        "edited after it was written)"
    ]


def test_a_missing_or_damaged_anchor_is_a_problem(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=2)
    anchor = anchor_path(path)
    anchor.write_text('{"entries": 2}')
    assert _problems(path) == ["its anchor audit.jsonl.anchor is not an anchor (edited or damaged)"]
    anchor.unlink()
    assert _problems(path) == [_MISSING_ANCHOR]
    AuditLog(path, NODE).append("node.refusal", code="x")  # the next append writes it again
    assert verify(path).ok
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert verify(empty).ok  # nothing was ever appended: nothing to anchor


def test_anchors_accept_later_appends(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=3)
    head = verify(path).head_sha256
    AuditLog(path, NODE).append("privacy.spend", dataset="cardio")
    assert verify(path, expect_head=head.upper(), expect_count=3).ok
    assert verify(path, expect_head=GENESIS_SHA256, expect_count=0).ok


# ------------------------------------------------------------------ crashes


def test_torn_last_line_is_reported_then_recovered_on_the_record(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=3)
    head = verify(path).head_sha256
    torn = b'{"actor":"coordinator","details":{"ro'
    with path.open("ab") as handle:
        handle.write(torn)  # a crash in the middle of an append
    report = verify(path)
    assert [str(p) for p in report.problems] == [
        "line 4: torn final line (no newline: an append was interrupted); the next append "
        f"discards it and records {RECOVERED_EVENT}"
    ]
    assert report.head_sha256 == head and report.entries == 3

    entry = AuditLog(path, NODE).append("node.refusal", code="x")
    entries = list(iter_entries(path))
    assert [e.event for e in entries[3:]] == [RECOVERED_EVENT, "node.refusal"]
    recovered = entries[3]
    assert recovered.prev_sha256 == head  # chained onto the last complete line, not the garbage
    assert recovered.details == {
        "discarded_bytes": len(torn),
        "discarded_sha256": hashlib.sha256(torn).hexdigest(),
        "discarded_text": torn.decode(),
    }
    assert entry.seq == 4
    report = verify(path, expect_head=head)
    assert report.ok and report.entries == 5
    assert report.notes == (
        f"line 4: an interrupted append was discarded here ({len(torn)} bytes, {RECOVERED_EVENT})",
    )


def test_a_torn_first_line_is_recovered_too(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"act')
    AuditLog(path, NODE).append("data.registered", dataset="cardio")
    entries = list(iter_entries(path))
    assert [(e.seq, e.event) for e in entries] == [(0, RECOVERED_EVENT), (1, "data.registered")]
    assert entries[0].prev_sha256 == GENESIS_SHA256 and verify(path).ok


def test_an_edited_last_line_stops_appends(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=2)
    lines = _lines(path)
    lines[-1] = lines[-1][:30]
    _write_lines(path, lines)
    before = path.read_bytes()
    with pytest.raises(AuditError, match="last line of the audit log is not valid JSON"):
        AuditLog(path, NODE).append("node.refusal", code="x")
    assert path.read_bytes() == before


# ------------------------------------------------------------------ several writers


def _append_many(path: str, actor: str, count: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    log = AuditLog(Path(path), actor)
    for i in range(count):
        log.append("update.rejected", index=i)


def test_concurrent_appends_from_several_processes_form_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    start = context.Event()
    workers = [
        context.Process(target=_append_many, args=(str(path), f"writer-{n}", 50, start))
        for n in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    report = verify(path)
    assert report.ok, [str(p) for p in report.problems]
    assert report.entries == 200
    entries = list(iter_entries(path))
    assert [e.seq for e in entries] == list(range(200))
    for n in range(4):  # each writer's entries, in its own order
        mine = [e.details["index"] for e in entries if e.actor == f"writer-{n}"]
        assert mine == list(range(50))


# ------------------------------------------------------------------ command line


def test_cli_unreadable_inputs_are_one_error(tmp_path: Path, consortia_cli: CliRunner) -> None:
    missing = one_cli_error(
        consortia_cli("audit", "verify", str(tmp_path / "no.jsonl"), cwd=tmp_path)
    )
    assert f"{tmp_path / 'no.jsonl'}: no such audit log" in missing
    folder = one_cli_error(consortia_cli("audit", "verify", str(tmp_path), cwd=tmp_path))
    assert "is a folder" in folder
    path = _log(tmp_path, entries=1)
    bad_head = consortia_cli("audit", "verify", str(path), "--expect-head", "abc", cwd=tmp_path)
    assert "--expect-head must be a full sha256" in one_cli_error(bad_head)


def test_cli_prints_problems_escaped(tmp_path: Path, consortia_cli: CliRunner) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"[bold]not json\n")
    result = consortia_cli("audit", "verify", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "line 1: not valid JSON"


# ------------------------------------------------------------------ node events


def _node_toml(folder: Path) -> Path:
    path = folder / "node.toml"
    path.write_text(
        f'name = "{NODE}"\nstate_dir = "state"\nserve = ["cardio"]\n'
        "[policy]\nepsilon_budget = 10.0\ndelta = 1e-5\n"
    )
    return path


def test_node_data_add_records_the_registration(tmp_path: Path, consortia_cli: CliRunner) -> None:
    from test_onboarding import _csv_dataset

    from consortia.client.onboarding.registry import DatasetRegistry

    spec = _csv_dataset(tmp_path)
    node_toml = _node_toml(tmp_path)
    args = ("node", "data", "add", "cardio", "--config", str(spec), "--node", str(node_toml))
    for extra in ((), ("--replace",)):
        added = consortia_cli(*args, *extra, cwd=tmp_path)
        assert added.returncode == 0, added.stdout + added.stderr
    registration = DatasetRegistry(tmp_path / "state").get("cardio")

    path = tmp_path / "state" / "audit.jsonl"
    entries = list(iter_entries(path))
    assert [(e.event, e.actor, e.details["replaced"]) for e in entries] == [
        ("data.registered", NODE, False),
        ("data.registered", NODE, True),
    ]
    assert entries[0].details == {
        "dataset": "cardio",
        "fingerprint": registration.fingerprint,
        "records": registration.records,
        "train_records": registration.train_records,
        "test_records": registration.test_records,
        "num_classes": registration.num_classes,
        "replaced": False,
    }
    assert verify(path).ok


def test_ledger_account_records_the_spend_before_returning(tmp_path: Path) -> None:
    from consortia.client.ledger import PrivacyLedger, ledger_path
    from consortia.client.policy import NodePolicy
    from consortia.client.spend import LedgerAccount
    from consortia.common.privacy import Release

    state = tmp_path / "state"
    audit = AuditLog(state / "audit.jsonl", NODE)
    account = LedgerAccount(
        flower_context(run_id=41),
        ledger_path(state),
        "cardio",
        NodePolicy(epsilon_budget=10.0),
        audit=audit,
        job="cancer-1",
    )
    release = Release(noise_multiplier=1.1, sample_rate=0.125, steps=8)
    epsilon = account.record(release, server_round=2)
    with PrivacyLedger(ledger_path(state)) as ledger:
        (stored,) = ledger.history("cardio")
    (entry,) = iter_entries(state / "audit.jsonl")
    assert (entry.event, entry.actor) == ("privacy.spend", NODE)
    assert entry.details == {
        "dataset": "cardio",
        "job": "cancer-1",
        "run_id": "41",
        "round": 2,
        "mechanism": "dpsgd",
        "noise_multiplier": 1.1,
        "sample_rate": 0.125,
        "steps": 8,
        "epsilon_after": epsilon,
        "delta": 1e-5,
        "accountant": "rdp",
        "ledger_seq": stored.seq,
    }
    assert stored.epsilon == epsilon

    # An audit log that cannot take the entry stops the update (the ledger already counts it).
    lines = _lines(state / "audit.jsonl")
    _write_lines(state / "audit.jsonl", [lines[0][:20]])
    with pytest.raises(AuditError):
        account.record(release, server_round=3)
    with PrivacyLedger(ledger_path(state)) as ledger:
        assert len(ledger.history("cardio")) == 2  # over-counts, never under-counts


def test_a_node_log_truncated_with_its_anchor_rewritten_is_caught_by_the_ledger(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    from consortia.client.ledger import ledger_path
    from consortia.client.policy import NodePolicy
    from consortia.client.spend import LedgerAccount
    from consortia.common.privacy import Release

    state = tmp_path / "state"
    path = state / "audit.jsonl"
    audit = AuditLog(path, NODE)
    audit.append("data.registered", dataset="cardio")
    account = LedgerAccount(
        flower_context(run_id=41),
        ledger_path(state),
        "cardio",
        NodePolicy(epsilon_budget=10.0),
        audit=audit,
    )
    for server_round in (1, 2):
        account.record(Release(noise_multiplier=1.1, sample_rate=0.125, steps=8), server_round)
    ok = consortia_cli("audit", "verify", str(path), cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # Someone who hides the second spend: the last entry cut, the anchor made to agree.
    kept = _lines(path)[:2]
    _write_lines(path, kept)
    anchor = {"entries": 2, "head_sha256": line_sha256(kept[-1])}
    anchor_path(path).write_text(json.dumps(anchor))
    assert verify(path).ok  # the log and its anchor agree ...
    result = consortia_cli("audit", "verify", str(path), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # ... the ledger does not
    assert "the ledger's newest release of 'cardio' (#2, " in result.stdout
    assert "has no privacy.spend entry" in result.stdout


@pytest.mark.usefixtures("task_identity")
def test_refusals_are_recorded_on_a_deployed_node_only(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from consortia.client.app import _answer_refusals
    from consortia.client.policy import Refusal
    from consortia.client.spend import NodeRefusedError
    from consortia.common import protocol as p
    from consortia.common.config import JobConfig

    job = JobConfig.model_validate(
        {
            "name": "greedy",
            "dataset": "cardio",
            "rounds": 1,
            "model": {"name": "logreg"},
            "privacy": {"target_epsilon": 1.0, "delta": 1e-5},
        }
    )
    config = ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode(), p.ROUND_KEY: 3})
    refusal = Refusal(code="noise-too-low", reason="σ 0.4 is below the node's 0.8")

    @_answer_refusals
    def refuse(message: Message, context: object) -> Message:
        raise NodeRefusedError(refusal)

    def ask(context: object) -> Message:
        request = Message(
            RecordDict({p.CONFIG_KEY: config}), dst_node_id=7, message_type=MessageType.TRAIN
        )
        return refuse(request, context)  # type: ignore[arg-type]

    node_toml = _node_toml(tmp_path)
    reply = ask(flower_context(node_toml=node_toml, run_id=41))
    assert p.read_refusal(reply.content) == (refusal.code, refusal.reason)
    (entry,) = iter_entries(tmp_path / "state" / "audit.jsonl")
    assert (entry.event, entry.actor) == ("node.refusal", NODE)
    assert entry.details == {
        "code": "noise-too-low",
        "reason": refusal.reason,
        "message_type": "train",
        "run_id": "41",
        "round": 3,
        "job": "greedy",
    }

    # A broken audit log costs a warning, never the refusal reply.
    _write_lines(tmp_path / "state" / "audit.jsonl", [b"garbage"])
    again = ask(flower_context(node_toml=node_toml, run_id=41))
    assert p.read_refusal(again.content) == (refusal.code, refusal.reason)

    # A simulated node writes no audit log anywhere.
    before = sorted(tmp_path.rglob("*"))
    assert p.read_refusal(ask(flower_context(run_id=41)).content) is not None
    assert sorted(tmp_path.rglob("*")) == before
    assert sorted(f.name for f in (tmp_path / "state").iterdir()) == [
        "audit.jsonl",
        "audit.jsonl.anchor",  # and no ledger: a refusal spends nothing
    ]


def test_an_unusable_audit_log_is_a_refusal() -> None:
    from consortia.client.app import _refusal_of

    assert _refusal_of(AuditError("x: no space left")) == ("audit-unusable", "x: no space left")


@pytest.mark.usefixtures("task_identity")
def test_a_deployed_node_records_its_rounds_spend_and_refusal(tmp_path: Path) -> None:
    from federation import add_site
    from sklearn.datasets import load_breast_cancer
    from test_node_policy import _job, _train

    from consortia.common import protocol as p

    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    node_toml = add_site(
        tmp_path / NODE, NODE, data.data, data.target, names, superlink_port=9091, budget=1.0
    )
    accepted = _train(node_toml, _job(), run_id=14)
    spent = float(accepted.content[p.METRICS_KEY][p.EPSILON])
    refused = _train(node_toml, _job(), run_id=15)  # the budget allows one such round
    assert p.read_refusal(refused.content) is not None

    path = node_toml.parent / "state" / "audit.jsonl"
    entries = list(iter_entries(path))
    assert [(e.event, e.actor, e.details["run_id"]) for e in entries] == [
        ("privacy.spend", NODE, "14"),
        ("node.refusal", NODE, "15"),
    ]
    spend, refusal = (e.details for e in entries)
    assert (spend["dataset"], spend["job"], spend["round"]) == ("cancer", "policy-test", 1)
    assert spend["epsilon_after"] == spent and spend["ledger_seq"] == 1
    assert refusal["code"] == "budget-exhausted"
    assert (refusal["job"], refusal["round"]) == ("policy-test", 1)
    assert verify(path).ok
