"""Local training on a node: DP-SGD through Opacus, or plain SGD when DP is off.

Privacy-relevant choices, all Opacus' own machinery:
- Poisson sampling (`DPDataLoader`): each record joins each batch with
  probability q = 1 / ceil(n / batch_size), which the accountant assumes.
- Per-sample clipping to `max_grad_norm` and Gaussian noise of std
  `noise_multiplier * max_grad_norm` (`DPOptimizer`).
- Every noisy optimizer step is counted, including those on empty Poisson
  batches: each still releases a noisy gradient. Physical chunks of one
  Poisson batch (`max_physical_batch_size`) are not steps: only the last
  chunk's step adds noise and moves the weights.
FedProx' proximal term depends only on the weights, never on the data, so it
is applied as a separate step after each private one (pure post-processing,
no privacy cost); adding it to the loss would bypass per-sample clipping.

Three engines compute the clipped gradient sum (`TrainingConfig.dp_engine`):
models made only of Flatten/Linear/ReLU/Tanh (`logreg`, `mlp`) take the
fused path of `fused_dpsgd` under 'auto' (several times cheaper on CPU);
other models, or 'opacus', go through Opacus' per-sample hooks; 'ghost' uses
Opacus' fast gradient clipping. All share the sampler, clipping, noise
generator seed and step accounting, so the choice changes speed and memory,
never the privacy guarantee.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from consortia.client import fused_dpsgd
from consortia.common.arrays import LabeledArrays
from consortia.common.config import TrainingConfig
from consortia.common.errors import ConfigError

Engine = Literal["fused", "hooks", "ghost"]


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


# A loader of (features, labels) batches.
TensorLoader = DataLoader[tuple[torch.Tensor, ...]]


def _keep_batch(batch: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """The collate step: `__getitems__` has already built the batch.

    (torch types a collate function as taking a list of records, the
    `__getitems__`-less case; the tuple it gets here is a sequence too.)
    """
    return batch


def make_loader(data: LabeledArrays, batch_size: int, generator: torch.Generator) -> TensorLoader:
    """A shuffling loader over `data` (Opacus swaps in Poisson sampling for DP)."""
    dataset = _BatchedTensors(torch.from_numpy(data.x), torch.from_numpy(data.y))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=_keep_batch
    )


def dp_engine_for(model: nn.Module, training: TrainingConfig) -> Engine:
    """The DP-SGD engine `train_locally` uses for `model` under `training.dp_engine`.

    'auto' keeps the fused path for the models it supports (exact and
    cheapest) and Opacus' hooks otherwise; 'ghost' first checks that Opacus'
    ghost clipping can handle the model, so a misfit is a config error before
    any training rather than an exception mid-round.
    """
    if training.dp_engine == "ghost":
        check_ghost_supported(model)
        return "ghost"
    if training.dp_engine == "auto" and fused_dpsgd.supports_fused(model):
        return "fused"
    return "hooks"


def check_ghost_supported(model: nn.Module) -> None:
    """Raise `ConfigError` if Opacus' ghost clipping cannot train `model`.

    Opacus (grad_sample_mode="ghost") computes per-sample gradient norms of
    Linear and Embedding layers from activations and output gradients alone
    ("ghost norm"), and of every other layer with a per-sample gradient
    sampler (Conv, GroupNorm, ...) by materialising that layer's per-sample
    gradient just long enough to take its norm. What it cannot do is a
    parameter used by more than one layer, or one layer applied twice: the
    norm of a sum of per-use gradients is not the sum of their norms, and
    Opacus raises "Parameter tying is not supported" mid-forward. A module
    listed twice in the model, or a parameter shared between modules, is
    caught here; a layer *called* twice by custom forward code can only be
    seen while training and is turned into the same error there.
    """
    owners: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        if id(param) in owners:
            raise ConfigError(
                f"training.dp_engine = 'ghost' cannot train this model: parameter {name!r} "
                f"is shared with {owners[id(param)]!r} (tied weights or a layer used twice), "
                "which Opacus' ghost clipping does not support; use dp_engine = 'opacus'"
            )
        owners[id(param)] = name


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
    CPU. With `dp` set, training goes through the engine `dp_engine_for`
    picks, and the result reports the exact number of noisy steps and the
    sample rate for the accountant.
    """
    _seed_torch(seed, device)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    optimizer = _optimizer(model, training)
    loader = make_loader(data, training.batch_size, generator)
    after_step = _proximal_hook(model, proximal_mu * training.learning_rate)
    if dp is None:
        return _run_epochs(
            model,
            loader,
            optimizer,
            nn.CrossEntropyLoss(),
            epochs=training.local_epochs,
            sample_rate=1.0 / len(loader),
            device=device,
            after_step=after_step,
        )
    engine = dp_engine_for(model, training)
    if engine == "fused":
        assert isinstance(model, nn.Sequential)  # guaranteed by supports_fused
        return _train_fused(model, loader, optimizer, training, dp, seed, device, after_step)
    return _train_opacus(
        model, loader, optimizer, training, dp, seed, device, after_step, ghost=engine == "ghost"
    )


def _seed_torch(seed: int, device: torch.device) -> None:
    """Seed the generators the model's own layers draw from (dropout, initialisers).

    Not `torch.manual_seed`: on a machine without CUDA it queues a CUDA seeding
    call with its traceback every time, which cost 8% of a small node's round.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _proximal_hook(model: nn.Module, scale: float) -> Callable[[], None] | None:
    """FedProx' proximal step towards the weights `model` starts the round with (None if off)."""
    if not scale:
        return None
    global_weights = [p.detach().clone() for p in model.parameters()]

    def after_step() -> None:
        _proximal_step(model, global_weights, scale)

    return after_step


def _train_opacus(
    model: nn.Module,
    loader: TensorLoader,
    optimizer: torch.optim.Optimizer,
    training: TrainingConfig,
    dp: DpSettings,
    seed: int,
    device: torch.device,
    after_step: Callable[[], None] | None,
    *,
    ghost: bool,
) -> LocalTrainResult:
    """DP-SGD through Opacus' `PrivacyEngine`, per-sample hooks or ghost clipping.

    Ghost clipping needs the loss per sample (it backpropagates twice: once
    for the norms, once for the clipped sum), so `make_private` wraps the
    criterion too. With `max_physical_batch_size`, `BatchMemoryManager`
    splits each Poisson batch into chunks and tells the optimizer to skip
    (only clip and accumulate) on all but the last chunk. The step count is
    cross-checked against the steps Opacus' own accountant recorded.
    """
    engine = PrivacyEngine(accountant="rdp")
    private = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        grad_sample_mode="ghost" if ghost else "hooks",
    )
    if ghost:
        wrapped, dp_optimizer, criterion, dp_loader = private
    else:
        wrapped, dp_optimizer, dp_loader = private
        criterion = nn.CrossEntropyLoss()
    try:
        cap = training.max_physical_batch_size
        with _physical_batches(dp_loader, dp_optimizer, cap) as batches:
            result = _run_epochs(
                wrapped,
                batches,
                dp_optimizer,
                criterion,
                epochs=training.local_epochs,
                sample_rate=1.0 / len(loader),
                device=device,
                after_step=after_step,
            )
    except NotImplementedError as error:
        if not isinstance(wrapped, GradSampleModuleFastGradientClipping):
            raise
        raise ConfigError(
            f"training.dp_engine = 'ghost' cannot train this model ({error}); "
            "use dp_engine = 'opacus'"
        ) from error
    finally:
        _unwrap(wrapped)
    accounted = sum(num_steps for _, _, num_steps in engine.accountant.history)
    if result.steps != accounted:  # pragma: no cover - would be a bug in the loop
        raise RuntimeError(f"counted {result.steps} noisy steps but Opacus accounted {accounted}")
    return result


def _physical_batches(
    dp_loader: TensorLoader, optimizer: DPOptimizer, max_physical_batch_size: int | None
) -> AbstractContextManager[TensorLoader]:
    """A context giving `dp_loader`, chunked by `BatchMemoryManager` when a cap is set.

    The chunked loader wraps the Poisson loader's own batch sampler, so every
    epoch draws the same logical batches (same sampler, same generator) as
    without a cap; it only cuts each into pieces and queues the optimizer's
    skip signals as it hands them out.
    """
    if max_physical_batch_size is None:
        return nullcontext(dp_loader)
    chunked: AbstractContextManager[TensorLoader] = BatchMemoryManager(
        data_loader=dp_loader, max_physical_batch_size=max_physical_batch_size, optimizer=optimizer
    )
    return chunked


def _run_epochs(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    sample_rate: float,
    device: torch.device,
    after_step: Callable[[], None] | None,
) -> LocalTrainResult:
    """The training loop of plain SGD and of both Opacus engines.

    A step that the DP optimizer skipped (a non-final physical chunk) is no
    step: it neither counts, nor triggers `after_step`, nor ends the batch
    whose mean loss is reported. Only Poisson sampling (DP) yields empty
    batches; they too go forward and backward, Opacus then takes a
    pure-noise step, which is counted. `sample_rate` is passed through to
    the result.
    """
    model.train()
    steps, loss_sum, loss_batches = 0, 0.0, 0
    batch_loss, batch_records = 0.0, 0  # of the logical batch under way
    for _ in range(epochs):
        for features, labels in batches:
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(features), labels)
            loss.backward()
            optimizer.step()
            if len(labels) > 0:
                batch_loss += float(loss.detach()) * len(labels)
                batch_records += len(labels)
            if _step_was_skipped(optimizer):
                continue
            steps += 1
            if batch_records:
                loss_sum += batch_loss / batch_records
                loss_batches += 1
            batch_loss, batch_records = 0.0, 0
            if after_step is not None:
                after_step()
    return LocalTrainResult(
        mean_loss=loss_sum / max(loss_batches, 1), steps=steps, sample_rate=sample_rate
    )


def _step_was_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the last `step()` only accumulated a physical chunk (no noise, no update).

    `DPOptimizer` records this in `_is_last_step_skipped` (what its own
    `zero_grad` reads to keep the running sum); `step()`'s return value
    cannot tell, since a plain SGD step returns None too.
    """
    return isinstance(optimizer, DPOptimizer) and optimizer._is_last_step_skipped


def _train_fused(
    model: nn.Sequential,
    loader: TensorLoader,
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
    noise_generator = torch.Generator(device=device).manual_seed(seed + 1)
    if training.max_physical_batch_size is None:
        run = fused_dpsgd.train_fused(
            model,
            dp_loader,
            optimizer,
            epochs=training.local_epochs,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=expected_batch_size,
            noise_generator=noise_generator,
            device=device,
            after_step=after_step,
        )
    else:
        run = _train_fused_chunked(
            model,
            dp_loader,
            optimizer,
            epochs=training.local_epochs,
            dp=dp,
            max_physical_batch_size=training.max_physical_batch_size,
            expected_batch_size=expected_batch_size,
            noise_generator=noise_generator,
            device=device,
            after_step=after_step,
        )
    return LocalTrainResult(
        mean_loss=run.loss_sum / max(run.loss_batches, 1),
        steps=run.steps,
        sample_rate=dp_loader.sample_rate,  # the sampler's rate, as the Opacus path reports
    )


@torch.no_grad()
def _train_fused_chunked(
    model: nn.Sequential,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    dp: DpSettings,
    max_physical_batch_size: int,
    expected_batch_size: int,
    noise_generator: torch.Generator,
    device: torch.device,
    after_step: Callable[[], None] | None,
) -> fused_dpsgd.FusedRun:
    """`fused_dpsgd.train_fused` with each Poisson batch fed in chunks.

    The clipped gradient sum of a batch is the sum of its chunks' sums
    (clipping is per sample), so one noisy step on that total is the
    unchunked step up to float rounding, while no more than
    `max_physical_batch_size` records are on the device at once. Chunks are
    near-equal, as Opacus' `BatchMemoryManager` cuts them.
    """
    params = list(model.parameters())
    steps, loss_sum, loss_batches = 0, 0.0, 0
    for _ in range(epochs):
        for features, labels in batches:
            sums = [torch.zeros_like(param) for param in params]
            batch_loss = 0.0
            for chunk in _chunks(len(labels), max_physical_batch_size):
                chunk_sums, loss = fused_dpsgd.clipped_grad_sums(
                    model,
                    features[chunk].to(device),
                    labels[chunk].to(device),
                    dp.max_grad_norm,
                )
                for total, part in zip(sums, chunk_sums, strict=True):
                    total.add_(part)
                if loss is not None:
                    batch_loss += float(loss) * (chunk.stop - chunk.start)
            fused_dpsgd.noisy_step(
                params,
                sums,
                optimizer,
                noise_std=dp.noise_multiplier * dp.max_grad_norm,
                expected_batch_size=expected_batch_size,
                generator=noise_generator,
            )
            steps += 1
            if len(labels) > 0:
                loss_sum += batch_loss / len(labels)
                loss_batches += 1
            if after_step is not None:
                after_step()
    optimizer.zero_grad(set_to_none=True)  # as train_fused: no noisy gradient left attached
    return fused_dpsgd.FusedRun(steps=steps, loss_sum=loss_sum, loss_batches=loss_batches)


def _chunks(size: int, max_size: int) -> list[slice]:
    """Slices of at most `max_size` covering range(size), cut as `np.array_split` cuts.

    That is Opacus' `BatchSplittingSampler`: ceil(size / max_size) chunks, the
    first `size % count` of them one longer. None for an empty batch.
    """
    count = math.ceil(size / max_size)
    if count == 0:
        return []
    base, longer = divmod(size, count)
    bounds = [0, *itertools.accumulate(base + (i < longer) for i in range(count))]
    return [slice(start, stop) for start, stop in itertools.pairwise(bounds)]


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
