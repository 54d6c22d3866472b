"""A deployed node's policy through its ClientApp: what it refuses; a refusal costs nothing.

The node is real (node.toml, a registered CSV dataset, a SQLite ledger in a
temporary folder); the ClientApp is called in-process with real Flower
messages, as `flower-supernode` would call it, with `context.node_config`
naming node.toml. Only the public message protocol (`common/protocol.py`)
is read back: a refusal is a reply holding the machine-readable code and a
reason, never an update, and it leaves no release in the ledger.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CliRunner, flower_context
from federation import add_site, write_job
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from sklearn.datasets import load_breast_cancer

from consortia.client.app import app
from consortia.client.ledger import PrivacyLedger, ledger_path
from consortia.client.onboarding.registry import DatasetRegistry
from consortia.common import protocol as p
from consortia.common.config import JobConfig
from consortia.common.models import architecture_hash, build_model
from consortia.common.privacy import histogram_release
from consortia.common.secagg import crypto, wire
from consortia.common.weights import model_to_arrays

DATASET = "cancer"
MIN_NOISE = 0.8  # the node's floor; each refused job stays far within the other limits
Node = Callable[..., Path]


pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def deployed_node(tmp_path: Path) -> Node:
    """A node serving 'cancer' under a policy: `deployed_node(budget=..., policy='...')`."""

    def make(budget: float = 100.0, policy: str = "") -> Path:
        data = load_breast_cancer()
        names = [f"f{i:02d}" for i in range(data.data.shape[1])]
        return add_site(
            tmp_path / "st-mary",
            "st-mary",
            data.data,
            data.target,
            names,
            superlink_port=9091,  # never contacted: the ClientApp is called in-process
            budget=budget,
            policy=f"min_noise_multiplier = {MIN_NOISE}\n{policy}",
        )

    return make


def _job(**overrides: Any) -> JobConfig:
    settings: dict[str, Any] = {
        "name": "policy-test",
        "dataset": DATASET,
        "min_nodes": 1,
        "rounds": 1,
        "seed": 3,
        "model": {"name": "logreg"},
        "training": {"batch_size": 64, "learning_rate": 1.0},
        "privacy": {"target_epsilon": 0.8, "delta": 1e-5, "max_grad_norm": 1.0},
    }
    return JobConfig.model_validate({**settings, **overrides})


def _train(node_toml: Path, job: JobConfig, run_id: int) -> Message:
    """Round 1 of `job` as the node's SuperNode would deliver it; the ClientApp's reply."""
    registration = DatasetRegistry(node_toml.parent / "state").get(DATASET)
    model = build_model(job.model, registration.feature_shape, registration.num_classes, job.seed)
    config = ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode(), p.ROUND_KEY: 1})
    request = Message(
        RecordDict({p.ARRAYS_KEY: model_to_arrays(model), p.CONFIG_KEY: config}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    return app(request, flower_context(node_toml=node_toml, run_id=run_id))


def _releases_of(node_toml: Path, run_id: int) -> list[object]:
    """The run's releases of the dataset (none if the node never opened its budget)."""
    if not ledger_path(node_toml.parent / "state").exists():  # not opened: it would create it
        return []
    with PrivacyLedger(ledger_path(node_toml.parent / "state")) as ledger:
        if DATASET not in [budget.name for budget in ledger.datasets()]:
            return []
        ledger.verify(DATASET)
        return [e for e in ledger.history(DATASET) if e.run_id == str(run_id)]


def _assert_refused(node_toml: Path, reply: Message, run_id: int, code: str) -> str:
    """The reply is a refusal with `code`, carries no update, and nothing was spent."""
    assert not reply.has_error(), reply.error.reason
    refusal = p.read_refusal(reply.content)
    assert refusal is not None, f"not a refusal: {list(reply.content.keys())}"
    assert refusal[0] == code, refusal
    assert refusal[1].strip()  # a reason a person can read
    assert p.ARRAYS_KEY not in reply.content  # no update leaves the node
    assert p.METRICS_KEY not in reply.content  # no ε is claimed either
    assert _releases_of(node_toml, run_id) == []
    return refusal[1]


def test_explicit_noise_below_the_node_minimum_is_refused(deployed_node: Node) -> None:
    node_toml = deployed_node()
    job = _job(privacy={"noise_multiplier": MIN_NOISE / 2, "delta": 1e-5, "max_grad_norm": 1.0})
    reason = _assert_refused(node_toml, _train(node_toml, job, run_id=11), 11, "noise-too-low")
    assert str(MIN_NOISE) in reason


def test_a_refused_round_on_a_fresh_node_leaves_no_ledger(deployed_node: Node) -> None:
    node_toml = deployed_node(budget=0.5)
    ledger = ledger_path(node_toml.parent / "state")
    quiet = _job(privacy={"noise_multiplier": MIN_NOISE / 2, "delta": 1e-5, "max_grad_norm": 1.0})
    _assert_refused(node_toml, _train(node_toml, quiet, run_id=12), 12, "noise-too-low")
    assert not ledger.exists()
    greedy = _job(privacy={"target_epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0})
    _assert_refused(node_toml, _train(node_toml, greedy, run_id=13), 13, "budget-exhausted")
    assert not ledger.exists()  # the budget was checked against the ledger it would start


def test_a_first_release_over_budget_is_refused_before_the_ledger_exists(tmp_path: Path) -> None:
    from consortia.client.ledger import BudgetExceededError
    from consortia.client.policy import NodePolicy
    from consortia.client.spend import LedgerAccount

    ledger = ledger_path(tmp_path / "state")
    account = LedgerAccount(flower_context(), ledger, DATASET, NodePolicy(epsilon_budget=0.5))
    with pytest.raises(BudgetExceededError, match="Nothing was recorded"):  # the ledger's words
        account.record(histogram_release(1.0), server_round=0, mechanism="gaussian")
    assert not ledger.exists()  # e.g. a statistics query costlier than the whole budget
    account.record(histogram_release(20.0), server_round=0, mechanism="gaussian")
    assert len(_releases_of(tmp_path / "node.toml", run_id=1)) == 1  # one release, not two


def test_model_not_in_the_node_list_is_refused(deployed_node: Node) -> None:
    node_toml = deployed_node(policy='models = ["logreg"]\n')
    job = _job(model={"name": "mlp"})
    reason = _assert_refused(node_toml, _train(node_toml, job, run_id=12), 12, "model-not-allowed")
    assert "mlp" in reason


def test_target_epsilon_whose_calibrated_noise_is_below_the_floor_is_refused(
    deployed_node: Node,
) -> None:
    # One round of 8 Poisson steps at q = 1/8: reaching ε = 20 needs σ ≈ 0.43 < 0.8.
    node_toml = deployed_node(budget=100.0)
    job = _job(privacy={"target_epsilon": 20.0, "delta": 1e-5, "max_grad_norm": 1.0})
    _assert_refused(node_toml, _train(node_toml, job, run_id=13), 13, "noise-too-low")


def test_job_past_the_remaining_budget_is_refused_after_one_that_fits(
    deployed_node: Node,
) -> None:
    node_toml = deployed_node(budget=1.0)
    accepted = _train(node_toml, _job(), run_id=14)
    assert not accepted.has_error() and p.read_refusal(accepted.content) is None
    assert p.ARRAYS_KEY in accepted.content  # the same node trains a job within its policy
    spent = float(accepted.content[p.METRICS_KEY][p.EPSILON])
    assert 0.5 < spent <= 0.8
    assert len(_releases_of(node_toml, 14)) == 1

    reason = _assert_refused(
        node_toml, _train(node_toml, _job(), run_id=15), 15, "budget-exhausted"
    )
    assert DATASET in reason
    with PrivacyLedger(ledger_path(node_toml.parent / "state")) as ledger:
        assert ledger.spent(DATASET) == pytest.approx(spent)
        assert len(ledger.history(DATASET)) == 1


def _architecture_of(node_toml: Path, job: JobConfig) -> str:
    registration = DatasetRegistry(node_toml.parent / "state").get(DATASET)
    model = build_model(job.model, registration.feature_shape, registration.num_classes, 0)
    return architecture_hash(model)


def test_pinned_architectures_admit_exactly_the_reviewed_model(deployed_node: Node) -> None:
    reviewed = _job(model={"name": "mlp", "hidden": [16]})
    node_toml = deployed_node(policy=f'architectures = ["{_architecture_of_job(reviewed)}"]\n')
    assert _architecture_of(node_toml, reviewed) == _architecture_of_job(reviewed)
    wider = _job(model={"name": "mlp", "hidden": [32]})  # same name, another architecture
    reason = _assert_refused(
        node_toml, _train(node_toml, wider, run_id=16), 16, "architecture-not-allowed"
    )
    assert _architecture_of(node_toml, wider) in reason
    accepted = _train(node_toml, reviewed, run_id=17)
    assert p.read_refusal(accepted.content) is None and p.ARRAYS_KEY in accepted.content


def _architecture_of_job(job: JobConfig) -> str:
    # 30 breast-cancer features, 2 classes: what the registered CSV holds.
    return architecture_hash(build_model(job.model, (30,), 2, 0))


def _query(node_toml: Path, job: JobConfig, run_id: int) -> Message:
    config = ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode()})
    request = Message(
        RecordDict({p.CONFIG_KEY: config}), dst_node_id=7, message_type=MessageType.QUERY
    )
    return app(request, flower_context(node_toml=node_toml, run_id=run_id))


@pytest.mark.parametrize("shares", [True, False])
def test_label_histogram_only_under_the_policy_and_spent_before_it_leaves(
    deployed_node: Node, shares: bool
) -> None:
    node_toml = deployed_node(policy=f"share_label_histogram = {str(shares).lower()}\n")
    job = _job(label_histogram={"noise_multiplier": 20.0})
    identity = _query(node_toml, job, run_id=18).content[p.NODE_KEY]
    releases = _releases_of(node_toml, 18)
    if shares:
        counts = identity[p.NODE_LABEL_HISTOGRAM]
        assert isinstance(counts, list) and len(counts) == 2
        assert abs(sum(counts) - 455) < 200  # 80 % of 569 records, plus noise of σ = 20
        (release,) = releases
        assert (release.mechanism, release.server_round) == ("gaussian", 0)  # type: ignore[attr-defined]
        assert release.release == histogram_release(20.0)  # type: ignore[attr-defined]
    else:
        assert p.NODE_LABEL_HISTOGRAM not in identity
        assert "policy" in str(identity[p.NODE_HISTOGRAM_WITHHELD])
        assert releases == []


def test_check_job_previews_the_decision(
    deployed_node: Node, tmp_path: Path, consortia_cli: CliRunner
) -> None:
    node_toml = deployed_node(budget=1.0)
    job_toml = write_job(tmp_path / "job.toml", 0.8, min_nodes=1, rounds=1, batch_size=64)
    preview = consortia_cli(
        "node", "check-job", str(job_toml), "--node", str(node_toml), cwd=tmp_path
    )
    assert preview.returncode == 0, preview.stdout + preview.stderr
    assert _architecture_of_job(_job()) in preview.stdout
    assert "would take part" in preview.stdout
    greedy = write_job(tmp_path / "greedy.toml", 3.0, min_nodes=1, rounds=1, batch_size=64)
    refused = consortia_cli(
        "node", "check-job", str(greedy), "--node", str(node_toml), cwd=tmp_path
    )
    assert refused.returncode == 1 and "budget-exhausted" in refused.stdout
    assert not ledger_path(node_toml.parent / "state").exists()  # a preview writes nothing


def test_a_job_without_dp_is_always_refused(deployed_node: Node) -> None:
    # One non-private round would leave the dataset's ε unbounded from then on.
    node_toml = deployed_node()
    job = _job(privacy={"enabled": False})
    _assert_refused(node_toml, _train(node_toml, job, run_id=19), 19, "dp-required")


def test_no_histogram_and_no_evaluation_for_a_job_the_node_refuses(deployed_node: Node) -> None:
    node_toml = deployed_node(policy='models = ["logreg"]\nshare_label_histogram = true\n')
    job = _job(model={"name": "mlp"}, label_histogram={"noise_multiplier": 20.0})
    identity = _query(node_toml, job, run_id=20).content[p.NODE_KEY]
    assert p.NODE_LABEL_HISTOGRAM not in identity
    assert "model-not-allowed" in str(identity[p.NODE_HISTOGRAM_WITHHELD])
    assert _releases_of(node_toml, 20) == []
    registration = DatasetRegistry(node_toml.parent / "state").get(DATASET)
    model = build_model(job.model, registration.feature_shape, registration.num_classes, 0)
    config = ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode(), p.ROUND_KEY: 1})
    request = Message(
        RecordDict({p.ARRAYS_KEY: model_to_arrays(model), p.CONFIG_KEY: config}),
        dst_node_id=7,
        message_type=MessageType.EVALUATE,
    )
    reply = app(request, flower_context(node_toml=node_toml, run_id=20))
    assert p.read_refusal(reply.content) is not None
    assert p.METRICS_KEY not in reply.content  # no loss or accuracy of a refused model


def test_calibration_uses_the_ledger_accountant_not_the_jobs(deployed_node: Node) -> None:
    # The job asks for PRV; the ledger states ε with RDP. Calibrating with the
    # job's accountant would overshoot the target as the ledger counts it.
    node_toml = deployed_node()
    target = 0.8
    job = _job(
        rounds=3,
        privacy={
            "target_epsilon": target,
            "delta": 1e-5,
            "max_grad_norm": 1.0,
            "accountant": "prv",
        },
    )
    for _ in range(3):
        reply = _train(node_toml, job, run_id=21)
        assert p.read_refusal(reply.content) is None
    with PrivacyLedger(ledger_path(node_toml.parent / "state")) as ledger:
        assert ledger.budget(DATASET).accountant == "rdp"
        assert 0.7 < ledger.spent(DATASET) <= target


def test_a_node_that_requires_secure_aggregation_refuses_a_plain_job(
    deployed_node: Node,
) -> None:
    node_toml = deployed_node(policy="require_secure_aggregation = true\n")
    reason = _assert_refused(
        node_toml, _train(node_toml, _job(), run_id=30), 30, "secure-aggregation-required"
    )
    assert "[secure_aggregation]" in reason


def _secure_setup(node_toml: Path, job: JobConfig, run_id: int, cohort: int) -> Message:
    """Stage 1 of a SecAgg+ round as the node's SuperNode would deliver it (no model)."""
    config = ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode(), p.ROUND_KEY: 1})
    setup = wire.Setup(
        context="run round 1",
        position=0,
        cohort_size=cohort,
        neighbours=list(range(1, cohort)),
        threshold=cohort // 2 + 1 if cohort > 2 else 1,
        bits=32,
    )
    request = Message(
        RecordDict({p.CONFIG_KEY: config, wire.SECAGG_KEY: setup.to_record()}),
        dst_node_id=7,
        message_type=f"{MessageType.TRAIN}.{wire.MESSAGE_ACTION}",
    )
    return app(request, flower_context(node_toml=node_toml, run_id=run_id))


def test_a_secure_round_below_the_node_minimum_cohort_is_refused_and_setup_spends_nothing(
    deployed_node: Node,
) -> None:
    node_toml = deployed_node(policy="min_cohort = 4\nrequire_secure_aggregation = true\n")
    job = _job(secure_aggregation={})
    reason = _assert_refused(
        node_toml, _secure_setup(node_toml, job, run_id=31, cohort=3), 31, "cohort-too-small"
    )
    assert "3 node(s)" in reason and "minimum of 4" in reason
    # A cohort that meets the minimum: the node answers its public keys and the
    # release it plans (what bounds its update); it trains and spends only in stage 3.
    reply = _secure_setup(node_toml, job, run_id=32, cohort=4)
    assert p.read_refusal(reply.content) is None, reply.content
    assert not reply.content.array_records
    keys = wire.read(wire.SetupReply, reply.content[wire.SECAGG_KEY], "setup reply")
    assert len(keys.cipher_key) == len(keys.mask_key) == 32
    planned = reply.content[p.METRICS_KEY]
    assert planned[p.NOISE_MULTIPLIER] >= MIN_NOISE and planned[p.STEPS] > 0
    assert p.EPSILON not in planned
    assert _releases_of(node_toml, 32) == []


def test_a_plain_train_message_of_a_secure_job_is_refused(deployed_node: Node) -> None:
    """A coordinator that asks for a plain round of a secure job gets no update."""
    node_toml = deployed_node()
    _assert_refused(
        node_toml,
        _train(node_toml, _job(secure_aggregation={}), run_id=33),
        33,
        "secure-aggregation-required",
    )


def test_an_unmask_request_outside_a_round_is_refused_and_audited(deployed_node: Node) -> None:
    """A coordinator asking for shares the node never agreed to hand out gets a refusal,
    and the node's audit log keeps it."""
    node_toml = deployed_node()
    request = Message(
        RecordDict({wire.SECAGG_KEY: wire.Unmask(survivors=[1], dropped=[2]).to_record()}),
        dst_node_id=7,
        message_type=f"{MessageType.TRAIN}.{wire.MESSAGE_ACTION}",
    )
    reply = app(request, flower_context(node_toml=node_toml, run_id=34))
    reason = _assert_refused(node_toml, reply, 34, "secagg-refused")
    assert "no secure-aggregation round in progress" in reason
    entries = [
        json.loads(line)
        for line in (node_toml.parent / "state" / "audit.jsonl").read_text().splitlines()
    ]
    refusals = [e for e in entries if e["event"] == "node.refusal"]
    assert refusals and refusals[-1]["details"]["code"] == "secagg-refused"


def _secure_stage_3(node_toml: Path, run_id: int, *, bound: float, tamper: bool) -> Message:
    """Drive the real ClientApp through stages 1–3 of a secure round as node 0 of 3.

    The test plays the coordinator and the two neighbours: their keys are made
    here, and their shares sealed to the node as a neighbour would seal them.
    """
    job = _job(secure_aggregation={})
    # One Context: the SuperNode keeps it per run.
    context = flower_context(node_toml=node_toml, run_id=run_id)
    task = ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode(), p.ROUND_KEY: 1})
    action = f"{MessageType.TRAIN}.{wire.MESSAGE_ACTION}"
    tag = "run round 1"
    setup = wire.Setup(
        context=tag, position=0, cohort_size=3, neighbours=[1, 2], threshold=2, bits=32
    )
    first = app(
        Message(RecordDict({p.CONFIG_KEY: task, wire.SECAGG_KEY: setup.to_record()}), 7, action),
        context,
    )
    node = wire.read(wire.SetupReply, first.content[wire.SECAGG_KEY], "setup reply")
    peers = {q: (crypto.new_private_key(), crypto.new_private_key()) for q in (1, 2)}
    share_keys = wire.ShareKeys(
        peers=[1, 2],
        cipher_keys=[crypto.public_key(c) for c, _ in peers.values()],
        mask_keys=[crypto.public_key(m) for _, m in peers.values()],
        bound=bound,
        summands=3,
    )
    second = app(Message(RecordDict({wire.SECAGG_KEY: share_keys.to_record()}), 7, action), context)
    assert p.read_refusal(second.content) is None, second.content
    sealed = []
    for q, (cipher, _) in peers.items():
        key = crypto.PrivateKey(cipher).agree(node.cipher_key, crypto.SHARE_KEY, tag.encode())
        box = crypto.seal(key, struct.pack(">II", q, 0) + bytes(132), tag.encode(), q, 0)
        sealed.append(box[:-1] + bytes([box[-1] ^ 1]) if tamper else box)
    registration = DatasetRegistry(node_toml.parent / "state").get(DATASET)
    model = build_model(job.model, registration.feature_shape, registration.num_classes, job.seed)
    masked = wire.MaskedInput(senders=[1, 2], sealed=sealed)
    content = RecordDict(
        {
            p.ARRAYS_KEY: model_to_arrays(model),
            p.CONFIG_KEY: task,
            wire.SECAGG_KEY: masked.to_record(),
        }
    )
    return app(Message(content, 7, action), context)


def test_a_tampered_share_is_refused_before_the_node_trains(deployed_node: Node) -> None:
    node_toml = deployed_node()
    reply = _secure_stage_3(node_toml, 35, bound=100.0, tamper=True)
    reason = _assert_refused(node_toml, reply, 35, "secagg-refused")  # nothing spent
    assert "does not open" in reason


def test_a_secure_round_masks_the_update_and_records_the_spend_first(deployed_node: Node) -> None:
    node_toml = deployed_node()
    reply = _secure_stage_3(node_toml, 36, bound=100.0, tamper=False)
    assert p.read_refusal(reply.content) is None, reply.content
    masked = reply.content[wire.MASKED_KEY][wire.MASKED_ARRAY].numpy()
    assert masked.dtype == np.uint32 and masked.size == 62  # logreg: 30 features x 2 classes + 2
    assert p.ARRAYS_KEY not in reply.content.array_records  # no update in the clear
    assert len(_releases_of(node_toml, 36)) == 1
    assert reply.content[p.METRICS_KEY][p.EPSILON] > 0


def test_an_update_out_of_range_is_refused_with_its_recorded_spend(deployed_node: Node) -> None:
    """Trained and recorded, then the update does not fit: no update leaves, but the ε
    of the recorded release does, so the coordinator's account does not under-count."""
    node_toml = deployed_node()
    reply = _secure_stage_3(node_toml, 37, bound=1e-9, tamper=False)
    refusal = p.read_refusal(reply.content)
    assert refusal is not None and refusal[0] == "update-out-of-range", reply.content
    assert not reply.content.array_records
    (release,) = _releases_of(node_toml, 37)
    assert reply.content[p.METRICS_KEY][p.EPSILON] == pytest.approx(release.epsilon)  # type: ignore[attr-defined]
