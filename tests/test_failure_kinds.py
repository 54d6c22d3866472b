"""Refusal codes and failure kinds: one vocabulary from the node's reply to metrics.json.

Every code a node sends is a `RefusalCode` and travels as the same text as
before the enum; every failure the coordinator records carries the kind it
was given where it was found, and a run's metrics.json holds it. The run
below is a real coordinator (`run_federation`) over the real ClientApp with
the simulation lab's faults, in process: the grid hands each message, through
Flower's wire serialisation, to the virtual node it is addressed to.
"""

from __future__ import annotations

import ast
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO_ROOT
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from consortia.client.app import _answer_refusals
from consortia.client.policy import NodePolicy, Refusal, check_budget
from consortia.client.spend import JobAccount, NodeRefusedError
from consortia.common import protocol as p
from consortia.common.config import JobConfig, ScenarioConfig
from consortia.common.config_io import load_scenario
from consortia.common.protocol import FailureKind, RefusalCode
from consortia.server.federation import run_federation
from consortia.server.outputs.report import failure_kind
from consortia.server.outputs.run_outputs import MetricsFile
from consortia.server.rounds import legacy_failures
from consortia.server.rounds.run_log import NodeFailure, RoundRecord
from consortia.simulations.faults import fate_of
from consortia.simulations.lab import LAB, lab_client_app
from consortia.simulations.virtual_node import virtual_node_app

needs_task = pytest.mark.usefixtures("task_identity")  # Messages are built in a Flower task


def _wire(message: Message) -> Message:
    """`message` as the other side receives it: through Flower's protobuf serialisation."""
    data = message_to_proto(message).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(data))


def _request(message_type: str = MessageType.TRAIN) -> Message:
    request = Message(RecordDict(), dst_node_id=7, message_type=message_type)
    request.metadata.__dict__["_message_id"] = "m1"
    return request


# ------------------------------------------------------------------ codes


@needs_task
@pytest.mark.parametrize("code", list(RefusalCode))
def test_every_refusal_code_round_trips_through_a_node_reply(code: RefusalCode) -> None:
    """The node's refusal path (`_answer_refusals`), the wire, and back: the same code."""

    def refuses(message: Message, context: Context) -> Message:
        raise NodeRefusedError(Refusal(code=code, reason=f"because {code.name}"))

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = _wire(_answer_refusals(refuses)(_request(), context))
    sent = p.read_refusal(reply.content)
    assert sent == (code.value, f"because {code.name}")
    assert sent is not None and RefusalCode(sent[0]) is code
    # The bytes are those of the record as nodes built it before codes were an enum.
    before = RecordDict(
        {"refusal": ConfigRecord({"code": code.value, "reason": f"because {code.name}"})}
    )
    assert (
        message_to_proto(
            Message(p.refusal_record(code, f"because {code.name}"), reply_to=reply)
        ).content.SerializeToString()
        == message_to_proto(Message(before, reply_to=reply)).content.SerializeToString()
    )


def test_a_code_maps_to_its_kind_and_an_unknown_code_is_a_refusal() -> None:
    assert p.kind_of_code(RefusalCode.SIMULATED_DROPOUT) == FailureKind.DROPOUT
    assert p.kind_of_code("simulated-straggler") == FailureKind.LATE
    assert p.kind_of_code("simulated-crash") == FailureKind.CRASH
    assert p.kind_of_code(RefusalCode.BUDGET_EXHAUSTED) == FailureKind.REFUSED
    assert p.kind_of_code("a-code-of-a-newer-node") == FailureKind.REFUSED
    assert p.kind_of_code("node-error") == FailureKind.ERROR_REPLY
    assert p.kind_of_code("malformed-release") == FailureKind.MALFORMED
    assert p.kind_of_code("no-reply") == FailureKind.NO_REPLY


def _string_constants(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_no_refusal_code_is_spelled_out_beside_the_enum() -> None:
    """Producers and consumers name codes through `RefusalCode`, never as string literals."""
    codes = {code.value for code in RefusalCode}
    home = REPO_ROOT / "common" / "protocol.py"
    found = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {value!r}"
        for folder in ("client", "server", "common", "simulations", "cli")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        if path != home
        for line, value in _string_constants(path)
        if value in codes
    ]
    assert found == []


def test_old_failure_records_load_with_the_kind_they_had() -> None:
    """metrics.json written before failures had a kind: derived once, on reading."""

    def old(reason: str, refusal: str | None = None) -> FailureKind:
        record = {"node": "n", "reason": reason, **({"refusal": refusal} if refusal else {})}
        return NodeFailure.model_validate_json(json.dumps(record)).kind

    assert old("offline", "simulated-dropout") == FailureKind.DROPOUT
    assert old("over budget", "budget-exhausted") == FailureKind.REFUSED
    assert old("no evaluate reply within 60 s") == FailureKind.NO_REPLY
    assert old("node error: <class 'RuntimeError'>") == FailureKind.ERROR_REPLY
    assert old("not selected by Krum (f = 1): ...") == FailureKind.KRUM_EXCLUDED
    assert old("not selected by Multi-Krum (f = 1): ...") == FailureKind.MULTIKRUM_EXCLUDED
    assert old("secure aggregation: no unmask reply within 5 s") == FailureKind.SECAGG_DROPOUT
    assert old("reply lacks the 'arrays' record") == FailureKind.MALFORMED
    assert old("update norm 41.2 exceeds the bound 3.1") == FailureKind.SCREENED_OUT
    # A record that has its kind keeps it, whatever its reason says.
    kept = NodeFailure.model_validate({"node": "n", "reason": "node error: x", "kind": "crash"})
    assert kept.kind == FailureKind.CRASH
    assert NodeFailure(node="n", reason="r", kind=FailureKind.LATE).model_dump() == {
        "node": "n",
        "reason": "r",
        "refusal": None,
        "kind": "late",
    }


def test_the_report_names_every_kind() -> None:
    for kind in FailureKind:
        assert failure_kind(NodeFailure(node="n", reason="r", kind=kind))


# ------------------------------------------------------- a run with faults

# Seed 42, four rounds: every fault kind occurs, and each round keeps a usable update.
FAULTS = {
    "dropout": 0.25,
    "crash": 0.25,
    "stragglers": {"fraction": 0.2, "delay": "uniform", "low_s": 10.0, "high_s": 20.0},
}
TIMEOUT_S = 0.5  # every straggler is late; a silent node costs the round this much
REFUSER = "lakeview"  # its policy refuses every round (its dataset's budget is spent)
SILENT = ("st-mary", 2)  # (node, round) whose train reply never arrives
FAILING = ("northgate", 4)  # (node, round) whose ClientApp fails: Flower's error reply


class LabGrid:
    """Every virtual node in process, behind Flower's wire serialisation."""

    def __init__(self, config: ScenarioConfig) -> None:
        simulation = config.simulation
        self.app = lab_client_app(virtual_node_app, simulation)
        self.names = {100 + i: simulation.node_name(i) for i in range(simulation.nodes)}
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config={"partition-id": node_id - 100, "num-partitions": simulation.nodes},
                state=RecordDict(),
                run_config={},
            )
            for node_id in self.names
        }
        self.run = SimpleNamespace(run_id=1)
        self.sent: list[tuple[str, int, str]] = []  # (node, round, message type)
        self._pending: dict[str, Message] = {}
        self._ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.names)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            mid = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = mid
            node_id = message.metadata.dst_node_id
            config = message.content.config_records.get(p.CONFIG_KEY)
            server_round = config.get(p.ROUND_KEY) if config is not None else None
            key = (self.names[node_id], server_round if isinstance(server_round, int) else 0)
            if isinstance(server_round, int):  # a round's message (not the roster's query)
                self.sent.append((*key, message.metadata.message_type))
            reply = self.app(_wire(message), self.contexts[node_id])
            if message.metadata.message_type == MessageType.TRAIN and key == FAILING:
                reply = Message(Error(code=0, reason="the ClientApp raised"), reply_to=message)
            if not (message.metadata.message_type == MessageType.TRAIN and key == SILENT):
                self._pending[mid] = _wire(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self._pending.pop(mid) for mid in message_ids if mid in self._pending]


class _Quiet:
    def on_start(self, total_rounds: int, roster: object, skew: object) -> None: ...
    def on_round_started(self, server_round: int) -> None: ...
    def on_round(self, record: object) -> None: ...


def _expected_kind(
    config: ScenarioConfig, node: str, server_round: int, message_type: str
) -> FailureKind | None:
    """What the node's part in the round should be filed as (None: no failure), from the lab's
    draws and the test's own silent, failing and refusing nodes."""
    assert config.simulation.faults is not None
    fate = fate_of(
        config.simulation.faults, config.simulation, config.seed, node, server_round, TIMEOUT_S
    )
    if message_type == MessageType.EVALUATE:
        return FailureKind.DROPOUT if fate.dropout else None
    if (node, server_round) == SILENT:
        return FailureKind.NO_REPLY
    if (node, server_round) == FAILING:
        return FailureKind.ERROR_REPLY
    if fate.dropout:
        return FailureKind.DROPOUT  # offline before any policy is asked
    if node == REFUSER:
        return FailureKind.REFUSED  # a refused round trains nothing: nothing left to crash
    if fate.crash:
        return FailureKind.CRASH
    return FailureKind.LATE if fate.late else None


@pytest.fixture
def refusing_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """REFUSER's admission refuses as a node over its budget does (the real policy check)."""
    admit = JobAccount.admit

    def admit_unless_spent(
        self: JobAccount, job: JobConfig, num_records: int, architecture: str
    ) -> object:
        if self.context.node_config["partition-id"] == 3:  # lakeview
            refusal = check_budget(2.9, 3.2, NodePolicy(), "cancer-registry")
            assert refusal is not None
            raise NodeRefusedError(refusal)
        return admit(self, job, num_records, architecture)

    monkeypatch.setattr(JobAccount, "admit", admit_unless_spent)


@needs_task
@pytest.mark.usefixtures("refusing_node")
def test_every_failure_of_a_run_with_faults_carries_its_kind_in_metrics_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_guessing(refusal: str | None, reason: str) -> FailureKind:
        raise AssertionError(f"a failure was recorded without its kind: {reason!r}")

    # Every failure of the run is created with its kind: none is read back from its reason.
    monkeypatch.setattr(legacy_failures, "legacy_kind", no_guessing)
    data = load_scenario(None).config.model_dump(mode="json")
    data.update(rounds=4, seed=42, round_timeout_s=TIMEOUT_S)
    data["privacy"] = {"noise_multiplier": 1.0}  # no calibration: fast fresh nodes
    data["simulation"]["faults"] = FAULTS
    config = ScenarioConfig.model_validate(data)
    assert config.simulation.node_name(3) == REFUSER
    grid = LabGrid(config)
    loaded = load_scenario(None).model_copy(update={"config": config})
    summary = run_federation(grid, loaded, tmp_path / "run", _Quiet(), lab=LAB)

    metrics = json.loads((summary.out_dir / "metrics.json").read_text())
    recorded: dict[tuple[str, int], list[str]] = {}
    for record in metrics["rounds"]:
        for failure in record["failures"]:
            recorded.setdefault((failure["node"], record["round"]), []).append(failure["kind"])
    expected: dict[tuple[str, int], list[str]] = {}
    for node, server_round, message_type in grid.sent:
        kind = _expected_kind(config, node, server_round, message_type)
        if kind is not None:
            expected.setdefault((node, server_round), []).append(kind)
    assert {k: sorted(v) for k, v in recorded.items()} == {
        k: sorted(v) for k, v in expected.items()
    }
    kinds = {kind for found in recorded.values() for kind in found}
    assert kinds == {"dropout", "late", "crash", "refused", "no-reply", "error-reply"}
    # The refusal keeps its code; the lab's faults keep theirs, and are listed by kind.
    rounds = MetricsFile.model_validate(metrics).rounds
    for record in rounds:
        for failure in record.failures:
            if failure.kind == FailureKind.REFUSED:
                assert failure.refusal == RefusalCode.BUDGET_EXHAUSTED
        assert record.dropouts == _nodes(record, FailureKind.DROPOUT)
        assert record.stragglers == _nodes(record, FailureKind.LATE)
        assert record.crashes == _nodes(record, FailureKind.CRASH)
        assert record.rejected == {}  # no defence left an update out


def _nodes(record: RoundRecord, kind: FailureKind) -> list[str]:
    return sorted({f.node for f in record.failures if f.kind == kind})
