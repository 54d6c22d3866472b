"""The fused DP-SGD path must be Opacus' mechanism, only cheaper.

Each check compares against Opacus itself (hooks-mode `GradSampleModule` and
`DPOptimizer`), so a drift in the ghost-norm arithmetic, the clip factor, the
noise draw or the batch-size scaling shows up here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from consortia.client import fused_dpsgd, training
from consortia.client.training import DpSettings, train_locally
from consortia.common.arrays import LabeledArrays
from consortia.common.config import ModelConfig, TrainingConfig
from consortia.common.models import build_model

CPU = torch.device("cpu")


def _logreg() -> nn.Sequential:
    return build_model(ModelConfig(name="logreg"), (30,), 2, seed=3)


def _mlp2() -> nn.Sequential:
    return build_model(ModelConfig(name="mlp", hidden=(16, 8)), (1, 4, 4), 5, seed=3)


def _tanh_no_bias() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12, bias=False), nn.Tanh(), nn.Linear(12, 5), nn.Tanh()
    )


def _batch(model: nn.Sequential, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch whose per-sample gradient norms span three orders of magnitude."""
    generator = torch.Generator().manual_seed(11)
    linears = [layer for layer in model if isinstance(layer, nn.Linear)]
    in_features, num_classes = linears[0].in_features, linears[-1].out_features
    shape = (size, 30) if in_features == 30 else (size, 1, 4, 4)
    scale = torch.logspace(-2, 1, size).reshape(-1, *([1] * (len(shape) - 1)))
    features = torch.randn(shape, generator=generator) * scale
    labels = torch.randint(0, num_classes, (size,), generator=generator)
    return features, labels


def _opacus_summed_grads(
    model: nn.Sequential, features: torch.Tensor, labels: torch.Tensor, max_grad_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Opacus' `p.summed_grad` after clip_and_accumulate, and its per-sample norms."""
    module = GradSampleModule(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(module.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(labels),
    )
    nn.CrossEntropyLoss()(module(features), labels).backward()
    norms = torch.stack(
        [g.reshape(len(g), -1).norm(2, dim=-1) for g in optimizer.grad_samples], dim=1
    ).norm(2, dim=1)
    optimizer.clip_and_accumulate()
    sums = [p.summed_grad.detach().clone() for p in module.parameters()]
    module._close()
    return sums, norms


@pytest.mark.parametrize(
    "make_model", [_logreg, _mlp2, _tanh_no_bias], ids=["logreg", "mlp-2-hidden", "tanh-no-bias"]
)
def test_clipped_sums_match_opacus(make_model) -> None:
    model = make_model()
    features, labels = _batch(model)
    _, norms = _opacus_summed_grads(make_model(), features, labels, 1.0)
    max_grad_norm = float(norms.median())  # half the samples clipped, half not
    assert (norms < max_grad_norm).sum() >= 5 and (norms > max_grad_norm).sum() >= 5
    expected, _ = _opacus_summed_grads(make_model(), features, labels, max_grad_norm)

    sums, loss = fused_dpsgd.clipped_grad_sums(model, features, labels, max_grad_norm)

    assert loss is not None
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(nn.CrossEntropyLoss()(model(features), labels)))
    assert [s.shape for s in sums] == [p.shape for p in model.parameters()]
    for ours, theirs in zip(sums, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_one_fused_step_equals_one_opacus_step(momentum: float) -> None:
    features, labels = _batch(_mlp2())
    noise_multiplier, max_grad_norm, expected_batch_size = 1.3, 0.5, 20

    reference = GradSampleModule(_mlp2())
    dp_optimizer = DPOptimizer(
        torch.optim.SGD(reference.parameters(), lr=0.5, momentum=momentum),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=torch.Generator().manual_seed(5),
    )
    nn.CrossEntropyLoss()(reference(features), labels).backward()
    dp_optimizer.step()

    model = _mlp2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=momentum)
    sums, _ = fused_dpsgd.clipped_grad_sums(model, features, labels, max_grad_norm)
    fused_dpsgd.noisy_step(
        list(model.parameters()),
        sums,
        optimizer,
        noise_std=noise_multiplier * max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=torch.Generator().manual_seed(5),
    )

    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[1].weight, _mlp2()[1].weight)
    reference._close()


def test_empty_batch_is_a_counted_pure_noise_step() -> None:
    model = _logreg()
    start = [p.detach().clone() for p in model.parameters()]
    empty = (torch.empty(0, 30), torch.empty(0, dtype=torch.long))

    sums, loss = fused_dpsgd.clipped_grad_sums(model, *empty, max_grad_norm=1.0)
    assert loss is None
    assert all(not s.any() for s in sums)

    run = fused_dpsgd.train_fused(
        model,
        [empty],
        torch.optim.SGD(model.parameters(), lr=0.5),
        epochs=2,
        noise_multiplier=2.0,
        max_grad_norm=1.5,
        expected_batch_size=7,
        noise_generator=torch.Generator().manual_seed(9),
        device=CPU,
    )

    assert (run.steps, run.loss_batches, run.loss_sum) == (2, 0, 0.0)
    noise = torch.Generator().manual_seed(9)
    for _ in range(2):
        for param in start:
            param -= 0.5 * torch.normal(0.0, 3.0, size=param.shape, generator=noise) / 7
    for ours, expected in zip(model.parameters(), start, strict=True):
        torch.testing.assert_close(ours.detach(), expected)


def _data(num_records: int, shape: tuple[int, ...], num_classes: int, seed: int) -> LabeledArrays:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_records, *shape)).astype(np.float32)
    return LabeledArrays(x, rng.integers(0, num_classes, num_records).astype(np.int64))


def _mlp_run(data: LabeledArrays, config: TrainingConfig, **kwargs) -> tuple[dict, object]:
    model = build_model(ModelConfig(name="mlp", hidden=(16,)), data.x.shape[1:], 3, seed=0)
    result = train_locally(model, data, config, DpSettings(1.1, 1.0), seed=7, device=CPU, **kwargs)
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def test_train_locally_fused_is_deterministic_and_counts_every_step() -> None:
    data = _data(200, (1, 4, 4), 3, seed=1)
    config = TrainingConfig(local_epochs=2, batch_size=16, learning_rate=0.2)
    assert fused_dpsgd.supports_fused(
        build_model(ModelConfig(name="mlp", hidden=(16,)), (1, 4, 4), 3, seed=0)
    )

    first_state, first = _mlp_run(data, config)
    second_state, second = _mlp_run(data, config)

    assert first == second
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    assert first.steps == 2 * math.ceil(200 / 16)
    assert first.sample_rate == 1 / math.ceil(200 / 16)


@pytest.mark.parametrize(
    ("records", "batch_size", "epochs", "proximal_mu", "steps"),
    [
        (12, 2, 3, 0.0, 3 * 6),  # many empty Poisson batches
        (12, 2, 3, 0.5, 3 * 6),  # FedProx' proximal step after each noisy step
        # ceil(2966 / 32) = 93 batches, but Opacus' loader yields int(1 / (1 / 93)) = 92
        # and divides by int(2966 / 92) = 32, not int(2966 / 93) = 31.
        (2966, 32, 1, 0.0, 92),
    ],
)
def test_train_locally_fused_matches_opacus_path(
    records: int, batch_size: int, epochs: int, proximal_mu: float, steps: int
) -> None:
    """Same seed, same Poisson batches (empty ones included), same noise: same model."""
    data = _data(records, (4,), 3, seed=2)
    settings = {"local_epochs": epochs, "batch_size": batch_size, "learning_rate": 0.2}
    config = TrainingConfig(**settings, momentum=0.5)
    assert training.dp_engine_for(_mlp2(), config) == "fused"
    fused_state, fused = _mlp_run(data, config, proximal_mu=proximal_mu)
    opacus_config = TrainingConfig(**settings, momentum=0.5, dp_engine="opacus")
    assert training.dp_engine_for(_mlp2(), opacus_config) == "hooks"
    opacus_state, opacus = _mlp_run(data, opacus_config, proximal_mu=proximal_mu)

    assert fused.steps == opacus.steps == steps
    assert fused.sample_rate == opacus.sample_rate
    assert fused.mean_loss == pytest.approx(opacus.mean_loss, rel=1e-5)
    for key, value in fused_state.items():
        torch.testing.assert_close(value, opacus_state[key], rtol=1e-5, atol=1e-6)


def test_cnn_is_not_fused_and_still_trains_through_opacus() -> None:
    cnn = build_model(ModelConfig(name="cnn"), (1, 8, 8), 4, seed=0)
    assert not fused_dpsgd.supports_fused(cnn)
    before = [p.detach().clone() for p in cnn.parameters()]

    result = train_locally(
        cnn,
        _data(20, (1, 8, 8), 4, seed=3),
        TrainingConfig(batch_size=8),
        DpSettings(1.0, 1.0),
        seed=1,
        device=CPU,
    )

    assert result.steps == math.ceil(20 / 8)
    assert not hasattr(cnn, "_module")  # the caller's module, hooks removed
    assert any(not torch.equal(b, p) for b, p in zip(before, cnn.parameters(), strict=True))


def test_supports_fused_only_for_flatten_linear_activation_stacks() -> None:
    assert fused_dpsgd.supports_fused(_logreg())
    assert fused_dpsgd.supports_fused(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh()))
    assert not fused_dpsgd.supports_fused(nn.Sequential(nn.Linear(4, 3)))  # no leading Flatten
    assert not fused_dpsgd.supports_fused(nn.Sequential(nn.Flatten(0), nn.Linear(4, 3)))
    assert not fused_dpsgd.supports_fused(nn.Sequential(nn.Flatten(), nn.GELU(), nn.Linear(4, 3)))
    frozen = _logreg()
    frozen[1].bias.requires_grad_(False)
    assert not fused_dpsgd.supports_fused(frozen)

    shared = nn.Linear(4, 4)
    assert not fused_dpsgd.supports_fused(nn.Sequential(nn.Flatten(), shared, nn.ReLU(), shared))

    class Custom(nn.Sequential):
        pass

    assert not fused_dpsgd.supports_fused(Custom(nn.Flatten(), nn.Linear(4, 3)))
