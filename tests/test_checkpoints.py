"""Round checkpoints, resume points, the model registry and the exchange loop, without Ray.

The end-to-end test (a simulation SIGKILLed mid-round, then resumed) is in
tests/test_resume.py.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import flower_context
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from consortia.cli.main import app as cli_app
from consortia.client.privacy_state import JobPrivacyState, load_state
from consortia.common import protocol as p
from consortia.common.config import FedAdamConfig, ScenarioConfig
from consortia.common.errors import ConsortiaError, FederationError
from consortia.common.models import architecture_hash, build_model
from consortia.common.privacy import Release
from consortia.common.weights import model_to_arrays
from consortia.server.outputs.checkpoint import (
    CheckpointDoc,
    CheckpointError,
    RoundCheckpoint,
    checkpoint_file,
    read_checkpoint,
)
from consortia.server.outputs.manifest import Manifest, config_sha256
from consortia.server.outputs.model_files import file_sha256, model_file_bytes, model_path
from consortia.server.outputs.model_registry import export_state_dict, list_checkpoints
from consortia.server.outputs.resume import load_resume_point, run_config
from consortia.server.outputs.run_outputs import RunOutputs
from consortia.server.rounds.exchange import exchange
from consortia.server.rounds.rng_state import capture_rng, restore_rng
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.server.rounds.run_log import NodeFailure, RoundRecord
from consortia.server.rounds.strategies import build_strategy
from consortia.server.rounds.strategy_state import capture_strategy_state, restore_strategy_state
from consortia.simulations.node_privacy import _restore_history

NAMES = ["lakeview", "st-mary"]
FEATURES = (30,)
CONFIG = ScenarioConfig.model_validate(
    {
        "name": "ckpt",
        "seed": 7,
        "rounds": 4,
        "model": {"name": "logreg"},
        "strategy": {"name": "fedadam"},
        "simulation": {"nodes": 2, "node_names": NAMES},
    }
)


def _model() -> torch.nn.Module:
    return build_model(CONFIG.model, FEATURES, 2, CONFIG.seed)


def _manifest() -> Manifest:
    return Manifest(
        run_name="run",
        created_utc="2025-01-01T00:00:00+00:00",
        scenario_source="<test>",
        scenario_source_sha256="0" * 64,
        config=CONFIG.model_dump(mode="json"),
        config_sha256=config_sha256(CONFIG),
        seed=CONFIG.seed,
        packages={},
        python="3",
        git_commit=None,
        data_fingerprints={name: name[0] * 64 for name in NAMES},
        model_architecture=architecture_hash(_model()),
    )


def _records(rounds: int) -> list[RoundRecord]:
    return [
        RoundRecord(
            round=r,
            accuracy=0.5 + r / 100,
            loss=1.0 / r,
            epsilon={n: 0.1 * r for n in NAMES},
            participants=NAMES,
            failures=[NodeFailure(node="st-mary", reason="late")] if r == 2 else [],
            seconds=1.5,
        )
        for r in range(1, rounds + 1)
    ]


def _checkpoint(server_round: int, manifest_sha: str, shift: float = 0.0) -> RoundCheckpoint:
    model = {k: a.numpy() + np.float32(shift) for k, a in model_to_arrays(_model()).items()}
    rng = capture_rng()
    moments = {k: np.full(a.shape, 0.25 + shift, np.float64) for k, a in model.items()}
    return RoundCheckpoint(
        doc=CheckpointDoc(
            round=server_round,
            rounds_planned=CONFIG.rounds,
            config_sha256=config_sha256(CONFIG),
            manifest_sha256=manifest_sha,
            manifest=_manifest(),
            model_keys=list(model),
            model_sha256=hashlib.sha256(model_file_bytes(model)).hexdigest(),
            feature_shape=FEATURES,
            num_classes=2,
            epsilon={n: 0.1 * server_round for n in NAMES},
            releases={
                n: [Release(noise_multiplier=1.1, sample_rate=0.2, steps=4)] * server_round
                for n in NAMES
            },
            records=_records(server_round),
            rng=rng.scalars,
        ),
        model=model,
        strategy={"m_t": moments, "v_t": {k: v * 2 for k, v in moments.items()}},
        rng=rng,
    )


def _run_dir(tmp_path: Path, rounds: int) -> Path:
    """A run folder as a run killed after `rounds` rounds leaves it."""
    run = tmp_path / "run"
    outputs = RunOutputs(run)
    manifest_sha = outputs.write_manifest(_manifest())
    for r in range(1, rounds + 1):
        checkpoint = _checkpoint(r, manifest_sha, shift=r)
        record = checkpoint.doc.records[-1]
        outputs.add_round(record, checkpoint, model_file_bytes(checkpoint.model))
    return run


# ----------------------------------------------------------------- checkpoint


def test_checkpoint_round_trip_restores_model_strategy_and_generators(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.rand(5)  # move the generators off their seeds
    run = _run_dir(tmp_path, 1)
    # What each generator draws next, right after the checkpoint was taken:
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    written = _checkpoint(1, "x")  # for comparison: same model/state values as the file
    loaded = read_checkpoint(checkpoint_file(run, 1))

    assert loaded.doc.records == written.doc.records
    assert loaded.doc.releases == written.doc.releases
    assert list(loaded.arrays().keys()) == list(model_to_arrays(_model()).keys())
    for key, array in loaded.model.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, written.model[key] + np.float32(1.0))
    strategy = build_strategy(CONFIG.job())
    restore_strategy_state(strategy, loaded.strategy, loaded.doc.model_keys)
    state = capture_strategy_state(strategy)
    assert set(state) == {"m_t", "v_t"}
    for key in loaded.doc.model_keys:
        assert state["v_t"][key].dtype == np.float64
        np.testing.assert_array_equal(state["v_t"][key], 2 * state["m_t"][key])
        np.testing.assert_array_equal(state["m_t"][key], np.full_like(state["m_t"][key], 1.25))

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(loaded.rng)
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def test_the_files_of_a_round_agree(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 2)
    checkpoint = read_checkpoint(checkpoint_file(run, 2))
    assert checkpoint.doc.model_sha256 == file_sha256(model_path(run / "model", 2))
    assert checkpoint.doc.manifest_sha256 == file_sha256(run / "manifest.json")
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert not list(run.rglob("*.tmp"))


def test_a_strategy_without_that_state_refuses_it() -> None:
    adam = build_strategy(CONFIG.model_copy(update={"strategy": FedAdamConfig()}).job())
    restore_strategy_state(adam, {"m_t": {"w": np.zeros(2)}})  # FedAdam keeps m_t
    plain = build_strategy(ScenarioConfig().job())
    with pytest.raises(FederationError, match="does not keep"):
        restore_strategy_state(plain, {"m_t": {"w": np.zeros(2)}})


# -------------------------------------------------------------------- resume


def test_a_torn_newest_checkpoint_is_passed_over_for_the_previous_one(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 3)
    newest = checkpoint_file(run, 3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    point = load_resume_point(run, CONFIG)
    assert point.checkpoint.doc.round == 2 and point.next_round == 3
    assert len(point.skipped) == 1 and "round-003" in point.skipped[0]
    assert "damaged or incomplete" in point.skipped[0]
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        load_resume_point(run, CONFIG, server_round=3)

    # Restoring the folder to round 2 drops round 3's files and rebuilds metrics.json.
    RunOutputs(run).restore(point.checkpoint)
    assert not newest.exists() and not model_path(run / "model", 3).exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and metrics["final"] is None


def test_damage_inside_the_arrays_is_caught(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 2)
    newest = checkpoint_file(run, 2)
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the last tensor's bytes: the header still parses
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match their recorded sha256"):
        read_checkpoint(newest)
    assert load_resume_point(run, CONFIG).checkpoint.doc.round == 1


def test_no_readable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 1)
    checkpoint_file(run, 1).write_bytes(b"\x08\x00")
    with pytest.raises(FederationError, match="no readable checkpoint"):
        load_resume_point(run, CONFIG)
    with pytest.raises(FederationError, match="no such run folder"):
        load_resume_point(tmp_path / "missing", CONFIG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FederationError, match="no checkpoint to resume from"):
        load_resume_point(tmp_path / "empty", CONFIG)


def test_another_job_is_refused(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 2)
    changed = CONFIG.model_copy(update={"seed": 8})
    with pytest.raises(FederationError, match="resuming would mix two jobs"):
        load_resume_point(run, changed)


def test_a_finished_run_is_refused(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 4)
    assert load_resume_point(run, CONFIG).next_round == 5  # final not written: finish it
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["final"] = {"done": True}
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(FederationError, match="run run already finished"):
        load_resume_point(run, CONFIG)


def test_the_run_s_own_config_resumes_it(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 2)
    loaded = run_config(run)
    assert loaded.config == CONFIG
    assert config_sha256(loaded.config) == config_sha256(CONFIG)


def test_manifest_rewritten_from_the_checkpoint_has_the_same_bytes(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 2)
    original = (run / "manifest.json").read_bytes()
    (run / "manifest.json").unlink()
    model_path(run / "model", 2).unlink()
    checkpoint = load_resume_point(run, CONFIG).checkpoint
    RunOutputs(run).restore(checkpoint)
    assert (run / "manifest.json").read_bytes() == original
    assert file_sha256(model_path(run / "model", 2)) == checkpoint.doc.model_sha256


def test_the_roster_must_be_the_run_s_own(tmp_path: Path) -> None:
    point = load_resume_point(_run_dir(tmp_path, 1), CONFIG)
    architecture = architecture_hash(_model())

    def roster(fingerprints: dict[str, str]) -> Roster:
        return Roster(
            nodes=tuple(
                NodeEntry(
                    node_id=i, name=n, data_fingerprint=f, feature_shape=FEATURES, num_classes=2
                )
                for i, (n, f) in enumerate(sorted(fingerprints.items()))
            )
        )

    same = {name: name[0] * 64 for name in NAMES}
    point.check_federation(roster(same), FEATURES, 2, architecture)
    with pytest.raises(FederationError, match="st-mary holds other data"):
        point.check_federation(roster({**same, "st-mary": "9" * 64}), FEATURES, 2, architecture)
    with pytest.raises(FederationError, match="lakeview is missing; northgate is new"):
        renamed = {"northgate": "n" * 64, "st-mary": same["st-mary"]}
        point.check_federation(roster(renamed), FEATURES, 2, architecture)
    with pytest.raises(FederationError, match="architecture hash changed"):
        point.check_federation(roster(same), FEATURES, 2, "0" * 64)


@pytest.mark.usefixtures("task_identity")
def test_resumed_virtual_nodes_get_their_history_back() -> None:
    history = [Release(noise_multiplier=1.1, sample_rate=0.2, steps=4)] * 2
    simulation = CONFIG.simulation
    task = p.TaskSpec(job=CONFIG.job(), simulation=simulation).encode()
    message = Message(
        RecordDict({p.CONFIG_KEY: ConfigRecord({p.TASK_KEY: task})}),
        dst_node_id=1,
        message_type="train",
    )
    context = flower_context(partition_id=1, num_partitions=simulation.nodes, node_id=1)
    seen: list[JobPrivacyState] = []

    def handler(message: Message, context: Context) -> Message:
        seen.append(load_state(context))
        return message

    _restore_history({"st-mary": history, "lakeview": []}, message, context, handler)
    assert seen[-1].history == history  # partition 1 is the second name: st-mary
    # A node that already has a history (a later message) keeps its own.
    context.state["consortia-privacy"] = ConfigRecord(
        {"state": JobPrivacyState(history=history[:1]).model_dump_json()}
    )
    _restore_history({"st-mary": history}, message, context, handler)
    assert seen[-1].history == history[:1]


# ------------------------------------------------------------------ registry


def test_export_writes_a_state_dict_the_run_s_model_loads(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 2)
    out = tmp_path / "model.pt"
    exported = export_state_dict(run, 1, out)
    assert exported.architecture_matches and exported.tensors == 2
    model = _model()
    model.load_state_dict(torch.load(out))
    expected = read_checkpoint(checkpoint_file(run, 1)).model
    for key, tensor in model.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), expected[key])
    with pytest.raises(ConsortiaError, match="no checkpoint of round 7"):
        export_state_dict(run, 7, out)


def test_models_commands(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, 3)
    checkpoint_file(run, 3).write_bytes(b"torn")
    runner = CliRunner()
    listed = runner.invoke(cli_app, ["models", "list", str(tmp_path)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    assert "1/4" in listed.output and "2/4" in listed.output and "3/4" not in listed.output
    assert "skipped:" in listed.output and "round-003" in listed.output
    assert len(list_checkpoints(tmp_path).checkpoints) == 2
    shown = runner.invoke(cli_app, ["models", "show", str(run)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "2 of 4" in shown.output and "m_t, v_t" in shown.output
    missing = runner.invoke(cli_app, ["models", "show", str(run), "--round", "9"])
    assert isinstance(missing.exception, ConsortiaError)
    exported = runner.invoke(
        cli_app, ["models", "export", str(run), "--out", str(tmp_path / "m.pt")]
    )
    assert exported.exit_code == 0, exported.output
    assert set(torch.load(tmp_path / "m.pt")) == set(_model().state_dict())


# ------------------------------------------------------------------ exchange


class _SlowGrid:
    """A grid whose replies become available `delays` seconds after the push."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.pulls = 0
        self.pushed_at = 0.0

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pushed_at = time.monotonic()
        self.ids = [f"m{i}" for i in range(len(messages))]
        return self.ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        ready = []
        for mid, delay in zip(self.ids, self.delays, strict=True):
            if mid in message_ids and delay <= now:
                reply = Message(RecordDict(), dst_node_id=1, message_type="train")
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                ready.append(reply)
        return ready


def _messages(count: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(count)]


@pytest.mark.usefixtures("task_identity")
def test_exchange_returns_soon_after_the_last_reply() -> None:
    grid = _SlowGrid([0.05, 0.1, 0.3])
    started = time.monotonic()
    replies = exchange(grid, _messages(3), timeout_s=10)  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert len(replies) == 3
    assert elapsed < 0.3 + 0.5  # about one back-off interval (0.2 s) late, with slack for load
    assert grid.pulls < 0.3 / 0.02 + 3  # backs off: not a busy loop


@pytest.mark.usefixtures("task_identity")
def test_exchange_stops_at_the_timeout_with_what_arrived() -> None:
    grid = _SlowGrid([0.0, 5.0])
    started = time.monotonic()
    replies = exchange(grid, _messages(2), timeout_s=0.5)  # type: ignore[arg-type]
    assert len(replies) == 1
    assert 0.5 <= time.monotonic() - started < 1.5
    assert exchange(grid, [], timeout_s=1) == []  # type: ignore[arg-type]


def test_the_config_hash_leaves_out_unset_blocks_and_accepts_the_one_runs_carried_before() -> None:
    """Adding an optional block to the schema changes no hash of a config that leaves it
    unset; runs checkpointed when every None was hashed stay resumable (legacy hash)."""
    import hashlib
    import json

    from consortia.common.config import SecureAggregationConfig
    from consortia.server.outputs.manifest import legacy_config_sha256

    assert CONFIG.secure_aggregation is None
    before = {k: v for k, v in CONFIG.model_dump(mode="json").items() if k != "secure_aggregation"}
    del before["simulation"]["data"]["normalize"]  # added later still, like secure_aggregation
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":")).encode()
    assert legacy_config_sha256(CONFIG) == hashlib.sha256(canonical).hexdigest()
    assert config_sha256(CONFIG) != legacy_config_sha256(CONFIG)
    secure = CONFIG.model_copy(update={"secure_aggregation": SecureAggregationConfig()})
    assert config_sha256(secure) != config_sha256(CONFIG)
    secure_dump = secure.model_dump(mode="json")
    del secure_dump["simulation"]["data"]["normalize"]
    assert (
        legacy_config_sha256(secure)
        == hashlib.sha256(
            json.dumps(secure_dump, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
    )
