"""Local training on a node: DP-SGD through Opacus, or plain SGD when DP is off.

Privacy-relevant choices, all Opacus' own machinery:
- Poisson sampling (`DPDataLoader`): each record joins each batch with
  probability q = 1 / ceil(n / batch_size), which the accountant assumes.
- Per-sample clipping to `max_grad_norm` and Gaussian noise of std
  `noise_multiplier * max_grad_norm` (`DPOptimizer`).
- Every optimizer step is counted, including those on empty Poisson batches:
  each still releases a noisy gradient.
FedProx' proximal term depends only on the weights, never on the data, so it
is applied as a separate step after the private one (pure post-processing,
no privacy cost); adding it to the loss would bypass per-sample clipping.

Models made only of Flatten/Linear/ReLU/Tanh (`logreg`, `mlp`) take the fused
path of `fused_dpsgd`: the same sampler, clipping and noise, computed without
Opacus' per-step hooks (several times cheaper on CPU). Other models go
through Opacus' `PrivacyEngine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consortia.client import fused_dpsgd
from consortia.common.arrays import LabeledArrays
from consortia.common.config import TrainingConfig

# Take the fused DP-SGD path for models that support it. Only benchmarks and
# tests turn this off, to time or compare against plain Opacus.
USE_FUSED_DP_SGD = True


@dataclass(frozen=True)
class LocalTrainResult:
    """What one round of local training did."""

    mean_loss: float
    steps: int
    sample_rate: float


@dataclass(frozen=True)
class DpSettings:
    """The DP-SGD mechanism of one round."""

    noise_multiplier: float
    max_grad_norm: float


def poisson_sample_rate(num_records: int, batch_size: int) -> float:
    """The sample rate Opacus uses for a loader of `num_records` and `batch_size`."""
    return 1.0 / math.ceil(num_records / batch_size)


def steps_per_epoch(num_records: int, batch_size: int) -> int:
    """Number of (possibly empty) Poisson batches in one epoch."""
    return math.ceil(num_records / batch_size)


class _BatchedTensors(TensorDataset):
    """A TensorDataset that fetches a whole batch by fancy indexing.

    DataLoader calls `__getitems__` with the sampled indices; gathering rows in
    one indexing op instead of one `__getitem__` per record and a collate
    keeps the data path from dominating small models' steps.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index] for tensor in self.tensors)


def _keep_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return batch


def make_loader(data: LabeledArrays, batch_size: int, generator: torch.Generator) -> DataLoader:
    """A shuffling loader over `data` (Opacus swaps in Poisson sampling for DP)."""
    dataset = _BatchedTensors(torch.from_numpy(data.x), torch.from_numpy(data.y))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=_keep_batch
    )


def train_locally(
    model: nn.Module,
    data: LabeledArrays,
    training: TrainingConfig,
    dp: DpSettings | None,
    *,
    seed: int,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> LocalTrainResult:
    """Train `model` in place for `training.local_epochs` epochs on `data`.

    `seed` fixes batch sampling and DP noise, so a round is reproducible on
    CPU. With `dp` set, training goes through Opacus and the result reports
    the exact number of noisy steps and the sample rate for the accountant.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    global_weights = [p.detach().clone() for p in model.parameters()] if proximal_mu else []
    optimizer = _optimizer(model, training)
    loader = make_loader(data, training.batch_size, generator)
    sample_rate = 1.0 / len(loader)
    if dp is not None and USE_FUSED_DP_SGD and fused_dpsgd.supports_fused(model):
        assert isinstance(model, nn.Sequential)  # guaranteed by supports_fused

        def after_step() -> None:
            _proximal_step(model, global_weights, proximal_mu * training.learning_rate)

        proximal = after_step if proximal_mu else None
        return _train_fused(model, loader, optimizer, training, dp, seed, device, proximal)
    engine = None
    if dp is not None:
        engine = PrivacyEngine(accountant="rdp")
        noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
        )
    criterion = nn.CrossEntropyLoss()
    model.train()
    steps, loss_sum, loss_batches = 0, 0.0, 0
    for _ in range(training.local_epochs):
        for features, labels in loader:
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            # Only Poisson sampling (DP) yields empty batches. They too go
            # forward and backward: Opacus then holds zero-length per-sample
            # gradients and takes a pure-noise step, which is counted.
            loss = criterion(model(features), labels)
            loss.backward()
            optimizer.step()
            steps += 1
            if len(labels) > 0:
                loss_sum += float(loss.detach())
                loss_batches += 1
            if proximal_mu:
                _proximal_step(model, global_weights, proximal_mu * training.learning_rate)
    if engine is not None:
        _unwrap(model)
    return LocalTrainResult(
        mean_loss=loss_sum / max(loss_batches, 1), steps=steps, sample_rate=sample_rate
    )


def _train_fused(
    model: nn.Sequential,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    training: TrainingConfig,
    dp: DpSettings,
    seed: int,
    device: torch.device,
    after_step: Callable[[], None] | None,
) -> LocalTrainResult:
    """DP-SGD through `fused_dpsgd`, set up exactly as `make_private` sets up Opacus.

    Same Poisson batches (`DPDataLoader` over the loader's own generator), same
    noise generator seed, same expected batch size to divide by.
    """
    dp_loader = DPDataLoader.from_data_loader(loader)
    # make_private's formula, verbatim: it divides by len(dp_loader), which is
    # int(1 / sample_rate) and can be one less than len(loader) through float
    # rounding (e.g. 93 batches -> 92), not by the sampler's own rate.
    expected_batch_size = int(len(dp_loader.dataset) * (1 / len(dp_loader)))
    run = fused_dpsgd.train_fused(
        model,
        dp_loader,
        optimizer,
        epochs=training.local_epochs,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected_batch_size,
        noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        device=device,
        after_step=after_step,
    )
    return LocalTrainResult(
        mean_loss=run.loss_sum / max(run.loss_batches, 1),
        steps=run.steps,
        sample_rate=dp_loader.sample_rate,  # the sampler's rate, as the Opacus path reports
    )


def _optimizer(model: nn.Module, training: TrainingConfig) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    return torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum
    )


@torch.no_grad()
def _proximal_step(model: nn.Module, global_weights: list[torch.Tensor], scale: float) -> None:
    """w <- w - lr * mu * (w - w_global): a gradient step on (mu/2)||w - w_global||²."""
    for param, anchor in zip(model.parameters(), global_weights, strict=True):
        param.sub_(param - anchor, alpha=scale)


def _unwrap(model: nn.Module) -> None:
    """Remove Opacus' hooks so the caller's module is a plain module again."""
    cleanup = getattr(model, "cleanup", None)
    if callable(cleanup):
        cleanup()
