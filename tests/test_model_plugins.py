"""Model plugins: models are entry points of installed distributions, nodes refuse the rest.

Discovery is real: consortia's own models and the example plugin
(examples/plugins/consortia-example-models, installed beside consortia)
come from their installed metadata; the test plugins below are real
distributions too (a `.dist-info` folder with `entry_points.txt` and a
module beside it), put on `sys.path` (and on a subprocess' PYTHONPATH) the
way an installed distribution is found. The node is a real one (node.toml,
a registered CSV, its ledger) whose ClientApp is called in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CliRunner, flower_context, one_cli_error
from federation import add_site
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from sklearn.datasets import load_breast_cancer

from consortia.client.admission import preview_admission
from consortia.client.app import app
from consortia.client.model_admission import node_model, node_models
from consortia.client.node_config import load_node_config
from consortia.client.policy import NodePolicy
from consortia.client.spend import NodeRefusedError
from consortia.client.training import DpSettings, train_locally
from consortia.common import protocol as p
from consortia.common.arrays import LabeledArrays
from consortia.common.builtin_models import CNN, LOGREG, MLP
from consortia.common.codeguard import REFUSE_VARIABLE
from consortia.common.config import JobConfig, ModelConfig, TrainingConfig
from consortia.common.config_io import load_job_text
from consortia.common.errors import ConfigError
from consortia.common.model_plugins import (
    ModelNotInstalledError,
    ModelUnusableError,
    ModelVersionError,
    deferred_lookup,
    find_model,
    installed_models,
)
from consortia.common.models import architecture_hash, build_model
from consortia.common.protocol import RefusalCode
from consortia.common.weights import model_to_arrays
from consortia.server.outputs.manifest import config_sha256

EXAMPLE = "consortia-example-models"
EXAMPLE_VERSION = "0.1.0"
DATASET = "cancer"
CANCER = ((30,), 2)  # the registered CSV: 30 features, 2 classes

# A model Opacus cannot train (BatchNorm), and one whose settings take a key of [model].
_TEST_MODELS = """
from pydantic import BaseModel
from torch import nn

from consortia.common.model_plugins import ModelContext, ModelPlugin


class BnSettings(BaseModel):
    width: int = 8


def _bn(settings: BnSettings, context: ModelContext) -> nn.Module:
    channels, height, width = context.feature_shape
    return nn.Sequential(
        nn.Conv2d(channels, settings.width, 3, padding=1),
        nn.BatchNorm2d(settings.width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(settings.width * height * width, context.num_classes),
    )


class ClashSettings(BaseModel):
    version: int = 1


BN_NET = ModelPlugin(settings=BnSettings, build=_bn)
CLASH = ModelPlugin(settings=ClashSettings, build=_bn)
NOT_A_PLUGIN = object()
"""


def _distribution(
    root: Path, name: str, version: str, entry_points: dict[str, str], module: str = ""
) -> Path:
    """An installed distribution as pip leaves it: `<name>-<version>.dist-info` in `root`."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[consortia.models]\n{lines}")
    if module:
        (root / f"{name.replace('-', '_')}.py").write_text(module)
    return root


@pytest.fixture(scope="module")
def test_plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the distribution 'lab-models' 1.0 (bn_net, clash_net, not_a_plugin)."""
    return _distribution(
        tmp_path_factory.mktemp("site"),
        "lab-models",
        "1.0",
        {
            "bn_net": "lab_models:BN_NET",
            "clash_net": "lab_models:CLASH",
            "not_a_plugin": "lab_models:NOT_A_PLUGIN",
        },
        _TEST_MODELS,
    )


@pytest.fixture
def with_test_plugins(test_plugins: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(test_plugins))
    return test_plugins


def _cli(cwd: Path, *args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`consortia ARGS`, with `path` first on PYTHONPATH (where the test plugins are)."""
    env = {**os.environ, "COLUMNS": "200"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "consortia.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        check=False,
    )


# ------------------------------------------------------------------ discovery


def test_consortia_and_the_example_plugin_register_their_models_as_entry_points() -> None:
    found = {m.name: m for m in installed_models()}
    consortia_version = metadata.version("consortia")
    for name, plugin in (("logreg", LOGREG), ("mlp", MLP), ("cnn", CNN)):
        assert (found[name].distribution, found[name].version) == ("consortia", consortia_version)
        assert found[name].plugin() is plugin  # one mechanism: an entry point like any other
    for name in ("gn_resnet", "tabular_embeddings"):
        assert (found[name].distribution, found[name].version) == (EXAMPLE, EXAMPLE_VERSION)
        assert found[name].target.startswith("consortia_example_models.")


def test_a_distribution_on_the_path_is_a_model_and_validates_its_own_settings(
    with_test_plugins: Path,
) -> None:
    installed = find_model("bn_net")
    assert (installed.distribution, installed.version) == ("lab-models", "1.0")
    assert ModelConfig(name="bn_net").settings == {"width": 8}  # defaults filled in
    assert ModelConfig.model_validate({"name": "bn_net", "width": 4}).settings == {"width": 4}
    with pytest.raises(ValueError, match=r"width: Input should be a valid integer"):
        ModelConfig.model_validate({"name": "bn_net", "width": "wide"})


def test_a_distribution_inside_the_refused_app_bundle_folder_is_no_model(
    with_test_plugins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the coordinator ships (Flower's app folder) is never a model, even as metadata."""
    monkeypatch.setenv(REFUSE_VARIABLE, str(with_test_plugins.parent))
    assert "bn_net" not in {m.name for m in installed_models()}
    assert "mlp" in {m.name for m in installed_models()}  # installed ones stay
    with pytest.raises(ModelNotInstalledError):
        find_model("bn_net")


def test_an_entry_point_must_be_a_plugin_whose_settings_leave_consortias_keys(
    with_test_plugins: Path,
) -> None:
    with pytest.raises(ModelUnusableError, match="is a object, not a consortia"):
        find_model("not_a_plugin").plugin()
    with pytest.raises(ModelUnusableError, match=r"its settings use version, which \[model\]"):
        find_model("clash_net").plugin()


def test_two_distributions_with_one_name_need_the_job_to_choose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    twin = {"gn_resnet": "consortia_example_models.resnet:GN_RESNET"}
    monkeypatch.syspath_prepend(str(_distribution(tmp_path, "other-resnets", "2.0", twin)))
    with pytest.raises(ModelUnusableError, match=r"other-resnets 2\.0.*distribution ="):
        find_model("gn_resnet")
    assert find_model("gn_resnet", EXAMPLE).version == EXAMPLE_VERSION
    assert find_model("gn_resnet", "other_resnets").version == "2.0"  # names compare as pip's


# ------------------------------------------------------------------ jobs as they were


def _weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# Computed with the model registry before models were plugins (commit 76aa492), torch 2.13.
_BEFORE_PLUGINS = {
    ("logreg", (64,), (30,), 2): (
        "fcd5c46e5f266edcdb78f1b1420cd7531e47017085c884e4e743eb9128d7901c",
        "2a5b6c847dbf109e19600a782d2bafe0b12eeeb32192d0a188c04ba50d67d2af",
    ),
    ("mlp", (16, 8), (1, 8, 8), 10): (
        "221d5de356ac5541db5cd167f5a14c10b360ad3205b34e5d8d8b6dc79aacc6fd",
        "6501d978fa227ad0335967cc0aea105795cf8b944f634eee6a0746cf0e59320c",
    ),
    ("cnn", (64,), (1, 28, 28), 10): (
        "10c77676c088ceb89b859f1cddf5d87b46e360a1657ecd858e982606a48b1711",
        "496581a5e8a4f68f5217509ef121c134039715d1704334a5571b9c21bcb67248",
    ),
}


def test_existing_jobs_build_the_same_models_and_hash_as_before() -> None:
    for (name, hidden, shape, classes), (architecture, weights) in _BEFORE_PLUGINS.items():
        model = build_model(ModelConfig(name=name, hidden=hidden), shape, classes, 7)
        assert (architecture_hash(model), _weights_sha256(model)) == (architecture, weights)
    # A job's resolved config (what resumes recognise) is what it was: `hidden` completed.
    # (round_timeout_s as its default was then: the default now follows the local epochs.)
    job = JobConfig.model_validate(
        {"model": {"name": "mlp", "hidden": [16]}, "round_timeout_s": 3600}
    )
    assert job.model.model_dump(mode="json") == {"name": "mlp", "hidden": [16]}
    assert config_sha256(job) == "7a8ca3cbdda45856c506254182e0a141326f20bac55e29607b7c4ad950b11d31"
    assert JobConfig().model.model_dump(mode="json") == {"name": "mlp", "hidden": [64]}
    assert config_sha256(JobConfig(round_timeout_s=3600)) == (
        "42838932a29e155e9bcf9eff9df8aa285d310da97ff37f32e130802fd07cf21a"
    )


# ------------------------------------------------------------------ settings errors


def test_a_settings_error_is_one_message_naming_the_model_and_each_key() -> None:
    text = 'dataset = "cancer"\n[model]\nname = "gn_resnet"\nwidth = 2\nstage = [1]\n'
    with pytest.raises(ConfigError) as caught:
        load_job_text(text, "job.toml")
    message = caught.value.message
    assert message.startswith(
        f"job.toml: model: model 'gn_resnet' ({EXAMPLE} {EXAMPLE_VERSION}): settings: "
    )
    assert "stage: unknown key (allowed here: groups, stages, width)" in message
    assert "width: Input should be greater than or equal to 4" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="model 'resnet' is not installed here: no installed"):
        load_job_text('[model]\nname = "resnet"\n', "job.toml")


def test_models_check_refuses_bad_settings_in_one_message(tmp_path: Path) -> None:
    result = _cli(tmp_path, "models", "check", "gn_resnet", "--settings", '{"groups": 3}')
    message = one_cli_error(result, nothing_on_stdout=True)
    assert "settings: groups = 3 does not divide stage 1's 16 channels" in message


# ------------------------------------------------------------------ models check


def test_models_check_builds_the_model_and_prints_its_hash(tmp_path: Path) -> None:
    result = _cli(tmp_path, "models", "check", "gn_resnet", "--settings", '{"width": 8}')
    assert result.returncode == 0, result.stderr
    expected = build_model(ModelConfig(name="gn_resnet", width=8), (1, 28, 28), 10, 0)
    assert architecture_hash(expected) in result.stdout
    assert f"{EXAMPLE} {EXAMPLE_VERSION}" in result.stdout
    assert '{"width": 8, "stages": [1, 1], "groups": 4}' in result.stdout
    assert "Opacus can train it with DP-SGD" in result.stdout


def test_models_check_refuses_batchnorm_naming_the_layers_and_opacus_fix(
    tmp_path: Path, test_plugins: Path
) -> None:
    result = _cli(tmp_path, "models", "check", "bn_net", path=test_plugins)
    message = one_cli_error(result, nothing_on_stdout=True)
    assert "model 'bn_net' (lab-models 1.0) cannot be trained with DP-SGD (Opacus)" in message
    assert "layer '1' (BatchNorm2d(8, eps=1e-05" in message
    assert "BatchNorm cannot support training with differential privacy" in message
    assert "ModuleValidator.fix would replace it with GroupNorm(8, 8, eps=1e-05" in message


# ------------------------------------------------------------------ the node


@pytest.fixture
def node_toml(tmp_path: Path) -> Path:
    """A node serving 'cancer'; its policy allows the example's tabular model."""
    return _node(tmp_path, 'models = ["logreg", "tabular_embeddings", "bn_net"]\n')


def _node(tmp_path: Path, policy: str) -> Path:
    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    return add_site(
        tmp_path / "st-mary",
        "st-mary",
        data.data,
        data.target,
        names,
        superlink_port=9091,  # never contacted: the ClientApp is called in-process
        budget=100.0,
        policy=policy,
    )


def _job(model: dict[str, object]) -> JobConfig:
    """A job naming `model`, read as a node reads it (the model need not be installed here)."""
    settings = {
        "name": "plugin-test",
        "dataset": DATASET,
        "min_nodes": 1,
        "rounds": 1,
        "seed": 3,
        "model": model,
        "training": {"batch_size": 64, "learning_rate": 1.0},
        "privacy": {"target_epsilon": 0.8, "delta": 1e-5, "max_grad_norm": 1.0},
    }
    return JobConfig.model_validate(settings, context=deferred_lookup())


def _train(node_toml: Path, job: JobConfig, model: torch.nn.Module | None = None) -> Message:
    """Round 1 of `job` at the node; without `model`, weights a refusing node never reads."""
    weights = model_to_arrays(model or build_model(ModelConfig(name="logreg"), *CANCER, 0))
    config = ConfigRecord({p.TASK_KEY: p.TaskSpec(job=job).encode(), p.ROUND_KEY: 1})
    request = Message(
        RecordDict({p.ARRAYS_KEY: weights, p.CONFIG_KEY: config}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    return app(request, flower_context(node_toml=node_toml, run_id=21))


def _refusal(reply: Message) -> tuple[str, str]:
    assert not reply.has_error(), reply.error.reason
    refusal = p.read_refusal(reply.content)
    assert refusal is not None and p.ARRAYS_KEY not in reply.content
    return refusal


TABULAR = {"name": "tabular_embeddings", "hidden": [16]}


@pytest.mark.usefixtures("task_identity")
def test_a_node_without_the_distribution_refuses_naming_it(node_toml: Path) -> None:
    job = _job({**TABULAR, "distribution": "hospital-models", "version": "1.2"})
    code, reason = _refusal(_train(node_toml, job))
    assert code == RefusalCode.MODEL_NOT_INSTALLED
    assert "needs distribution 'hospital-models' 1.2, which is not installed" in reason
    absent = _job({"name": "absent_net"})  # a name alone: no distribution to name
    code, reason = _refusal(_train(node_toml, absent))
    assert code == RefusalCode.MODEL_NOT_INSTALLED and "'absent_net' is not installed" in reason


@pytest.mark.usefixtures("task_identity")
def test_a_node_with_another_version_refuses(tmp_path: Path, node_toml: Path) -> None:
    job = _job({**TABULAR, "distribution": EXAMPLE, "version": "0.2.0"})
    code, reason = _refusal(_train(node_toml, job))
    assert code == RefusalCode.MODEL_VERSION_MISMATCH
    assert f"{EXAMPLE} 0.2.0 in the job, but {EXAMPLE} {EXAMPLE_VERSION} is installed" in reason
    # The policy pins the version its operator reviewed: another installed one is refused.
    pinned = _node(
        tmp_path / "pinned",
        f'models = ["tabular_embeddings"]\nmodel_distributions = {{"{EXAMPLE}" = "0.0.9"}}\n',
    )
    code, reason = _refusal(_train(pinned, _job(TABULAR)))
    assert code == RefusalCode.MODEL_VERSION_MISMATCH
    assert f"pins {EXAMPLE} 0.0.9, but {EXAMPLE} {EXAMPLE_VERSION} is installed" in reason
    other = _node(
        tmp_path / "other",
        'models = ["tabular_embeddings"]\nmodel_distributions = {"hospital-models" = "1.2"}\n',
    )
    code, reason = _refusal(_train(other, _job(TABULAR)))
    assert code == RefusalCode.MODEL_NOT_ALLOWED and f"distribution '{EXAMPLE}'" in reason


@pytest.mark.usefixtures("task_identity")
def test_a_node_pinning_another_architecture_refuses_and_trains_the_pinned_one(
    tmp_path: Path,
) -> None:
    reviewed = build_model(ModelConfig.model_validate(TABULAR), *CANCER, 0)
    node = _node(
        tmp_path,
        f'models = ["tabular_embeddings"]\nmodel_distributions = {{"{EXAMPLE}" = "0.1.0"}}\n'
        f'architectures = ["{architecture_hash(reviewed)}"]\n',
    )
    wider = _job({**TABULAR, "hidden": [32]})
    code, reason = _refusal(_train(node, wider))
    assert code == RefusalCode.ARCHITECTURE_NOT_ALLOWED
    wider_model = build_model(ModelConfig.model_validate({**TABULAR, "hidden": [32]}), *CANCER, 0)
    assert architecture_hash(wider_model) in reason
    accepted = _train(node, _job(TABULAR), reviewed)
    assert p.read_refusal(accepted.content) is None and p.ARRAYS_KEY in accepted.content


def test_a_node_refuses_a_model_opacus_cannot_train(with_test_plugins: Path) -> None:
    job = _job({"name": "bn_net"})
    with pytest.raises(NodeRefusedError) as caught:
        node_model(job, (1, 8, 8), 10, NodePolicy(models=("bn_net",)))
    refusal = caught.value.refusal
    assert refusal.code == RefusalCode.MODEL_NOT_DP_TRAINABLE
    assert "layer '1' (BatchNorm2d(8" in refusal.reason and "GroupNorm(8, 8" in refusal.reason


def test_no_plugin_code_runs_for_a_model_the_policy_does_not_allow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loud = 'raise RuntimeError("the plugin was imported")\n'
    entry = {"loud_net": "loud_models:PLUGIN"}
    monkeypatch.syspath_prepend(str(_distribution(tmp_path, "loud-models", "1.0", entry, loud)))
    job = _job({"name": "loud_net"})

    def refusal(policy: NodePolicy) -> tuple[str, str]:
        with pytest.raises(NodeRefusedError) as caught:
            node_model(job, *CANCER, policy)
        return caught.value.refusal.code, caught.value.refusal.reason

    # Refused on the name, or on a distribution outside the pins: never imported.
    assert refusal(NodePolicy(models=("logreg",)))[0] == RefusalCode.MODEL_NOT_ALLOWED
    pinned = NodePolicy(models=("loud_net",), model_distributions={"consortia": "0.1.0"})
    code, reason = refusal(pinned)
    assert code == RefusalCode.MODEL_NOT_ALLOWED and "'loud-models' is not among" in reason
    # Allowed: imported, and its failing import is the node's refusal, not a crash.
    code, reason = refusal(NodePolicy(models=("loud_net",)))
    assert code == RefusalCode.MODEL_UNUSABLE
    assert "RuntimeError: the plugin was imported" in reason


def test_check_job_previews_a_missing_distribution_and_another_version(
    tmp_path: Path, node_toml: Path, consortia_cli: CliRunner
) -> None:
    job = tmp_path / "job.toml"
    base = 'name = "plug"\ndataset = "cancer"\nrounds = 1\n[model]\nname = "tabular_embeddings"\n'
    accepted = preview_admission(
        load_job_text(base, "job.toml", deferred_lookup()).config, load_node_config(node_toml)
    )
    digest = architecture_hash(build_model(ModelConfig(name="tabular_embeddings"), *CANCER, 0))
    assert accepted.refusal is None
    assert ("model distribution", f"{EXAMPLE} {EXAMPLE_VERSION}") in accepted.rows()
    assert ("architecture", digest) in accepted.rows()
    for extra, code, named in (
        ('distribution = "hospital-models"\n', RefusalCode.MODEL_NOT_INSTALLED, "hospital-models"),
        ('version = "0.2.0"\n', RefusalCode.MODEL_VERSION_MISMATCH, f"{EXAMPLE} 0.2.0"),
    ):
        job.write_text(base + extra)
        refused = consortia_cli(
            "node", "check-job", str(job), "--node", str(node_toml), cwd=tmp_path
        )
        output = " ".join(refused.stdout.split())
        assert refused.returncode == 1 and f"refused [{code}]" in output, output
        assert named in output


def test_node_models_list_shows_distribution_version_hash_and_the_policys_answer(
    tmp_path: Path, node_toml: Path
) -> None:
    result = _cli(tmp_path, "node", "models", "list", "--node", str(node_toml))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "dataset 'cancer': features (30,), 2 classes" in lines[0]
    for name, distribution, answer in (
        ("logreg", f"consortia {metadata.version('consortia')}", "accepted"),
        ("tabular_embeddings", f"{EXAMPLE} {EXAMPLE_VERSION}", "accepted"),
        ("mlp", f"consortia {metadata.version('consortia')}", "refused [model-not-allowed]"),
    ):
        digest = architecture_hash(build_model(ModelConfig(name=name), *CANCER, 0))
        assert f"{name}  {distribution}  {digest}  {answer}" in lines
    assert "gn_resnet  " + f"{EXAMPLE} {EXAMPLE_VERSION}  not buildable [model-unusable]" in (
        result.stdout
    )
    rows = {row.installed.name: row for row in node_models(NodePolicy(), None)}
    assert rows["gn_resnet"].architecture is not None  # no dataset: the plugin's example input


# ------------------------------------------------------------------ the coordinator's pin


def test_the_coordinator_pins_the_model_it_built_and_a_node_reads_any_task() -> None:
    job = JobConfig.model_validate({"model": {"name": "gn_resnet", "width": 8}})
    sent = p.TaskSpec.decode(p.TaskSpec.for_nodes(job).encode()).job.model
    assert (sent.distribution, sent.version) == (EXAMPLE, EXAMPLE_VERSION)
    assert sent.settings == {"width": 8, "stages": [1, 1], "groups": 4}
    assert config_sha256(job) == config_sha256(JobConfig.model_validate(job.model_dump()))
    foreign = '{"job": {"model": {"name": "x_net", "distribution": "x-models", "depth": 3}}}'
    model = p.TaskSpec.decode(foreign).job.model  # not installed here: kept for the refusal
    assert (model.name, model.distribution, model.settings) == ("x_net", "x-models", {"depth": 3})
    with pytest.raises(ModelVersionError, match=r"consortia 0\.0\.1 in the job"):
        find_model("mlp", version="0.0.1")
    with pytest.raises(ValueError, match=r"consortia 0\.0\.1 in the job"):  # where jobs are written
        ModelConfig(name="mlp", version="0.0.1")


# ------------------------------------------------------------------ the example's tabular net


def test_tabular_embeddings_read_one_hot_groups_and_train_with_dp_sgd() -> None:
    config = ModelConfig.model_validate(
        {"name": "tabular_embeddings", "categorical": [{"first": 1, "columns": 3}]}
    )
    model = build_model(config, (5,), 2, 0)
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    rows = torch.tensor(
        [[0.5, 0, 0, 0, 1.0], [0.5, 1, 0, 0, 1.0], [0.5, 0, 0, 1, 1.0]], dtype=torch.float32
    )
    seen: list[torch.Tensor] = []
    embedding.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    model(rows)
    assert seen[0].tolist() == [0, 1, 3]  # no column set (the dropped first category): row 0
    # Another layout of the same sizes computes something else: the hash tells them apart.
    moved = ModelConfig.model_validate(
        {"name": "tabular_embeddings", "categorical": [{"first": 2, "columns": 3}]}
    )
    assert architecture_hash(build_model(moved, (5,), 2, 0)) != architecture_hash(model)
    rng = np.random.default_rng(0)
    x = np.zeros((64, 5), dtype=np.float32)
    x[:, 0], x[:, 4] = rng.normal(size=64), rng.normal(size=64)
    x[np.arange(64), 1 + rng.integers(0, 3, size=64)] = 1.0
    data = LabeledArrays(x=x, y=(x[:, 1] > 0).astype(np.int64))
    before = embedding.weight.detach().clone()
    result = train_locally(
        model,
        data,
        TrainingConfig(batch_size=16, learning_rate=0.5),
        DpSettings(noise_multiplier=1.0, max_grad_norm=1.0),
        seed=0,
        device=torch.device("cpu"),
    )
    assert result.steps > 0 and not torch.equal(before, embedding.weight.detach())


# ------------------------------------------------------------------ a simulation


class _Quiet:
    def on_start(self, total_rounds: int, roster: object, skew: object) -> None: ...
    def on_round_started(self, server_round: int) -> None: ...
    def on_round(self, record: object) -> None: ...


@pytest.mark.slow
def test_the_plugins_resnet_trains_a_round_on_mnist_in_the_simulation_lab(
    tmp_path: Path, mnist_dir: Path
) -> None:
    """The real engine (Ray, virtual nodes, Opacus): gn_resnet on 600 MNIST images, 2 sites."""
    from consortia.common.config_io import load_scenario
    from consortia.simulations.engine import simulate

    scenario = tmp_path / "mnist-gn-resnet.toml"
    scenario.write_text(
        'name = "mnist-gn-resnet"\nseed = 0\nrounds = 1\nevaluation = "federated"\n'
        '[model]\nname = "gn_resnet"\nwidth = 8\nstages = [1, 1]\n'
        "[training]\nbatch_size = 32\nlearning_rate = 0.5\n"
        "[privacy]\ntarget_epsilon = 4.0\ndelta = 1e-5\nmax_grad_norm = 1.0\n"
        '[simulation]\nnodes = 2\n[simulation.data]\nsource = "idx"\n'
        f'path = "{mnist_dir}"\nmax_records = 600\ntest_fraction = 0.2\n'
        "[simulation.data.normalize]\nmean = 0.1307\nstd = 0.3081\n"
        '[simulation.partition]\nmethod = "iid"\n'
    )
    summary = simulate(load_scenario(scenario), tmp_path / "run", _Quiet())
    (record,) = summary.rounds
    assert sorted(record.participants) == sorted(summary.final.epsilon)
    assert all(0 < eps <= 4.0 for eps in summary.final.epsilon.values())
    assert summary.final.accuracy is not None and 0.0 <= summary.final.accuracy <= 1.0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    built = build_model(ModelConfig(name="gn_resnet", width=8), (1, 28, 28), 10, 0)
    assert manifest["model_architecture"] == architecture_hash(built)
    assert manifest["packages"][EXAMPLE] == EXAMPLE_VERSION
    assert manifest["config"]["model"] == {
        "name": "gn_resnet",
        "width": 8,
        "stages": [1, 1],
        "groups": 4,
    }
