"""DP-SGD engines, physical batch chunking and device choice of `train_locally`.

Every engine and chunking setting must be the same mechanism: same Poisson
batches, same clipping, same seeded noise, and so the same number of noisy
steps (what the accountant is told) and, up to float rounding, the same
weights. Each comparison uses clipping that binds (small `max_grad_norm`) and
a proximal term, so a wrong clip factor or an update taken on a partial
batch would show.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from pydantic import ValidationError
from torch import nn

from consortia.client import fused_dpsgd, training
from consortia.client.device import resolve_device
from consortia.client.training import DpSettings, LocalTrainResult, train_locally
from consortia.common.arrays import LabeledArrays
from consortia.common.config import ModelConfig, TrainingConfig
from consortia.common.errors import ConfigError
from consortia.common.models import build_model

CPU = torch.device("cpu")
DP = DpSettings(noise_multiplier=0.8, max_grad_norm=0.1)


def _data(num_records: int, shape: tuple[int, ...], num_classes: int) -> LabeledArrays:
    rng = np.random.default_rng(5)
    x = (3 * rng.normal(size=(num_records, *shape))).astype(np.float32)
    return LabeledArrays(x, rng.integers(0, num_classes, num_records).astype(np.int64))


def _train(
    model: nn.Module, data: LabeledArrays, proximal_mu: float = 0.0, **settings: object
) -> tuple[LocalTrainResult, dict[str, torch.Tensor]]:
    config = TrainingConfig(learning_rate=0.3, momentum=0.5, **settings)
    result = train_locally(model, data, config, DP, seed=11, device=CPU, proximal_mu=proximal_mu)
    return result, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_run(
    first: tuple[LocalTrainResult, dict[str, torch.Tensor]],
    second: tuple[LocalTrainResult, dict[str, torch.Tensor]],
    steps: int,
    start: dict[str, torch.Tensor],
) -> None:
    (result_a, state_a), (result_b, state_b) = first, second
    assert result_a.steps == result_b.steps == steps
    assert result_a.sample_rate == result_b.sample_rate
    assert result_a.mean_loss == pytest.approx(result_b.mean_loss, rel=1e-5)
    for key, value in state_a.items():
        torch.testing.assert_close(value, state_b[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(state_a[key], start[key]) for key in start)  # it trained


def _cnn() -> nn.Module:
    return build_model(ModelConfig(name="cnn"), (1, 8, 8), 4, seed=0)


def _mlp(shape: tuple[int, ...] = (1, 4, 4)) -> nn.Module:
    return build_model(ModelConfig(name="mlp", hidden=(16,)), shape, 3, seed=0)


def _record_batch_sizes(module: nn.Module) -> list[int]:
    sizes: list[int] = []
    module.register_forward_pre_hook(lambda _, inputs: sizes.append(len(inputs[0])))
    return sizes


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize("proximal_mu", [0.0, 0.5])
def test_physical_chunks_on_opacus_give_the_same_steps_and_weights(proximal_mu: float) -> None:
    """CNN through Opacus' hooks, Poisson batches of ~16 cut into chunks of at most 5."""
    data = _data(48, (1, 8, 8), 4)
    settings = {"local_epochs": 2, "batch_size": 16}
    start = _cnn().state_dict()

    whole_model = _cnn()
    whole_sizes = _record_batch_sizes(whole_model.features[0])
    whole = _train(whole_model, data, proximal_mu, **settings)
    chunked_model = _cnn()
    chunked_sizes = _record_batch_sizes(chunked_model.features[0])
    chunked = _train(chunked_model, data, proximal_mu, **settings, max_physical_batch_size=5)

    assert max(whole_sizes) > 5 >= max(chunked_sizes)  # chunking really happened
    assert sum(whole_sizes) == sum(chunked_sizes)  # of the very same Poisson batches
    _assert_same_run(whole, chunked, 2 * math.ceil(48 / 16), start)
    assert whole[0].sample_rate == 1 / math.ceil(48 / 16)


def test_physical_chunks_count_empty_poisson_batches_once() -> None:
    """Tiny batches: many empty ones (pure-noise steps) and many split ones."""
    data = _data(12, (4,), 3)
    settings = {"local_epochs": 3, "batch_size": 2, "dp_engine": "opacus"}
    start = _mlp((4,)).state_dict()
    whole = _train(_mlp((4,)), data, 0.5, **settings)
    chunked = _train(_mlp((4,)), data, 0.5, **settings, max_physical_batch_size=1)
    _assert_same_run(whole, chunked, 3 * 6, start)


def test_physical_chunks_on_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' keeps a Linear-only model on the fused path and chunks it there."""
    data = _data(60, (1, 4, 4), 3)
    settings = {"local_epochs": 2, "batch_size": 12}
    start = _mlp().state_dict()
    assert training.dp_engine_for(_mlp(), TrainingConfig(max_physical_batch_size=4)) == "fused"

    whole = _train(_mlp(), data, 0.5, **settings)
    sizes: list[int] = []
    original = fused_dpsgd.clipped_grad_sums

    def spy(model, features, labels, max_grad_norm):  # type: ignore[no-untyped-def]
        sizes.append(len(labels))
        return original(model, features, labels, max_grad_norm)

    monkeypatch.setattr(fused_dpsgd, "clipped_grad_sums", spy)
    chunked = _train(_mlp(), data, 0.5, **settings, max_physical_batch_size=4)

    assert sizes and max(sizes) <= 4 and sum(sizes) > 60  # two epochs of ~60 records, chunked
    _assert_same_run(whole, chunked, 2 * math.ceil(60 / 12), start)


# ---------------------------------------------------------------- ghost clipping


@pytest.mark.parametrize(
    ("name", "max_physical_batch_size"), [("mlp", None), ("logreg", None), ("mlp", 3)]
)
def test_ghost_clipping_matches_per_sample_hooks(
    monkeypatch: pytest.MonkeyPatch, name: str, max_physical_batch_size: int | None
) -> None:
    """Opacus' ghost norms give the hooks' clip factors: same noise, same weights.

    Both engines draw the same noise from the same seeded generator and the
    clipped sums differ only by float rounding, so the runs agree to ~1e-7
    (not just statistically); clipping binds for every record here.
    """
    data = _data(40, (6,), 3)
    settings = {"local_epochs": 2, "batch_size": 8}

    def model() -> nn.Module:
        return build_model(ModelConfig(name=name, hidden=(16,)), (6,), 3, seed=0)

    start = model().state_dict()
    hooks = _train(model(), data, 0.5, **settings, dp_engine="opacus")
    ghost_config = TrainingConfig(**settings, dp_engine="ghost")
    assert training.dp_engine_for(model(), ghost_config) == "ghost"
    ghost_batches = _count_ghost_clipping(monkeypatch)
    ghost = _train(
        model(),
        data,
        0.5,
        **settings,
        dp_engine="ghost",
        max_physical_batch_size=max_physical_batch_size,
    )
    fused = _train(model(), data, 0.5, **settings)  # 'auto': the fused path
    assert len(ghost_batches) >= 2 * math.ceil(40 / 8)  # ghost clipping really ran
    if max_physical_batch_size is not None:
        assert max(ghost_batches) <= max_physical_batch_size < 8
    _assert_same_run(hooks, ghost, 2 * math.ceil(40 / 8), start)
    _assert_same_run(fused, ghost, 2 * math.ceil(40 / 8), start)


def _count_ghost_clipping(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes whose clip factors Opacus' ghost-clipping module computes from now on."""
    sizes: list[int] = []
    original = GradSampleModuleFastGradientClipping.get_clipping_coef

    def spy(self: GradSampleModuleFastGradientClipping) -> torch.Tensor:
        coefficients = original(self)
        sizes.append(len(coefficients))
        return coefficients

    monkeypatch.setattr(GradSampleModuleFastGradientClipping, "get_clipping_coef", spy)
    return sizes


def test_ghost_clipping_trains_the_cnn_like_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Conv/GroupNorm layers take Opacus' fast gradient clipping under 'ghost'."""
    data = _data(24, (1, 8, 8), 4)
    start = _cnn().state_dict()
    hooks = _train(_cnn(), data, batch_size=8)
    ghost_batches = _count_ghost_clipping(monkeypatch)
    ghost = _train(_cnn(), data, batch_size=8, dp_engine="ghost")
    assert len(ghost_batches) == math.ceil(24 / 8)
    _assert_same_run(hooks, ghost, math.ceil(24 / 8), start)


def _tied() -> nn.Sequential:
    torch.manual_seed(2)
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Flatten(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(4, 3))


class _CalledTwice(nn.Module):
    """A layer applied twice by custom forward code: invisible in the module tree."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.inner(torch.relu(self.inner(x)))))


@pytest.mark.parametrize("make_model", [_tied, _CalledTwice])
def test_ghost_clipping_refuses_tied_parameters(make_model) -> None:  # type: ignore[no-untyped-def]
    data = _data(16, (4,), 3)
    model = make_model()
    if make_model is _tied:  # seen in the module tree: refused before any training
        with pytest.raises(ConfigError, match=r"'3\.weight' is shared with '1\.weight'"):
            training.dp_engine_for(model, TrainingConfig(dp_engine="ghost"))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ConfigError, match="dp_engine = 'ghost' cannot train this model"):
        _train(model, data, batch_size=4, dp_engine="ghost")

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())  # Opacus' hooks removed
    # The per-sample hooks engine handles weight sharing: the refusal is ghost's alone.
    result, _ = _train(make_model(), data, batch_size=4, dp_engine="opacus")
    assert result.steps == math.ceil(16 / 4)


def test_registry_models_all_support_ghost_clipping() -> None:
    ghost = TrainingConfig(dp_engine="ghost")
    for model in (_mlp(), _cnn(), build_model(ModelConfig(name="logreg"), (4,), 2, seed=0)):
        assert training.dp_engine_for(model, ghost) == "ghost"
    assert training.dp_engine_for(_cnn(), TrainingConfig()) == "hooks"
    assert training.dp_engine_for(_mlp(), TrainingConfig(dp_engine="opacus")) == "hooks"


# ---------------------------------------------------------------- config, device


def test_training_config_validates_the_new_options() -> None:
    assert TrainingConfig().dp_engine == "auto"
    assert TrainingConfig().max_physical_batch_size is None
    with pytest.raises(ValidationError):
        TrainingConfig(max_physical_batch_size=0)
    with pytest.raises(ValidationError):
        TrainingConfig(dp_engine="functorch")


def test_resolve_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == CPU  # forced, GPU or not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_resolve_device_on_this_gpu_less_machine() -> None:
    assert resolve_device("auto") == CPU
    with pytest.raises(ConfigError):
        resolve_device("cuda")
