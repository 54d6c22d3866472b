"""Fused DP-SGD for stacks of Linear layers: Opacus' mechanism without its per-step overhead.

Why: on consortia's small models (`logreg`, `mlp`) a DP-SGD step through
Opacus' hooks costs 2.7-3.6x a plain step on CPU (docs/benchmarks.md). Nearly
all of it is per-step overhead (module hooks, materialising one gradient per
sample and parameter, per-parameter clipping bookkeeping), not the arithmetic
DP-SGD needs.

What makes the shortcut exact: for a Linear layer applied to 2-d input, the
gradient of sample b's loss is the outer product of the gradient at the layer's
output, g_b, with the layer's input, a_b (plus g_b for the bias). So

    ||per-sample grad_b||² = ||g_b||² · (||a_b||² + 1 if bias else ||a_b||²)

("ghost norm": Goodfellow 2015; Li et al. 2022), and the sum of clipped
per-sample gradients is one matmul, (g * clip[:, None]).T @ a. No per-sample
gradient is ever materialised.

What stays Opacus' own, so the privacy mechanism is unchanged:
- batches come from Opacus' Poisson sampler (`DPDataLoader`), empty ones
  included; every batch, empty or not, is one noisy step;
- flat clipping over all parameters with Opacus' clip factor,
  min(1, C / (||g_b|| + 1e-6)) (`DPOptimizer.clip_and_accumulate`);
- noise from `opacus.optimizers.optimizer._generate_noise` with std
  `noise_multiplier * max_grad_norm`, one draw per parameter in parameter
  order, then division by Opacus' expected batch size (`add_noise`,
  `scale_grad` with loss_reduction="mean").
With the same batch and noise generator a fused step therefore equals an
Opacus step up to float rounding (tests/test_fused_dpsgd.py checks this).

The backward pass is written out by hand (softmax cross-entropy, the two
supported activations, Linear) rather than run through autograd: the whole
model is a handful of tensor ops, and skipping the autograd graph is a large
part of the saving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from opacus.optimizers.optimizer import _generate_noise
from torch import nn
from torch.nn import functional

# Parameter-free elementwise activations with their backward, written with the
# same aten kernels autograd uses, taking the activation's *output*: so an
# in-place module (ReLU(inplace=True)) is no problem.
_Forward = Callable[[torch.Tensor], torch.Tensor]
_Backward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (grad, output) -> input grad
_ACTIVATIONS: dict[type[nn.Module], tuple[_Forward, _Backward]] = {
    nn.ReLU: (torch.relu, lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0)),
    nn.Tanh: (torch.tanh, torch.ops.aten.tanh_backward),
}


def supports_fused(model: nn.Module) -> bool:
    """Whether `model` can take the fused path: exactly the `logreg`/`mlp` family.

    That is a plain `nn.Sequential` that starts with a batch-preserving
    `nn.Flatten` and otherwise holds only `nn.Linear`, `nn.Flatten`, `nn.ReLU`
    and `nn.Tanh`, with every parameter trainable and no module hooks. The
    leading Flatten guarantees each Linear sees (batch, features) input, which
    the ghost-norm identity needs (on 3-d input a Linear's per-sample gradient
    is a sum of outer products and the identity no longer holds). Exact type
    checks, not isinstance: a subclass may override `forward`.
    """
    if type(model) is not nn.Sequential or len(model) == 0:
        return False
    layers = list(model)
    if not _is_batch_flatten(layers[0]):
        return False
    if any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
        return False
    kinds_ok = all(
        type(layer) is nn.Linear or type(layer) in _ACTIVATIONS or _is_batch_flatten(layer)
        for layer in layers
    )
    linears = [layer for layer in layers if type(layer) is nn.Linear]
    # A Linear used twice shares its weights: its gradient would be a sum of
    # two outer products, which the ghost-norm identity does not cover.
    distinct = len({id(layer) for layer in linears}) == len(linears)
    trainable = all(param.requires_grad for param in model.parameters())
    return kinds_ok and bool(linears) and distinct and trainable


def _is_batch_flatten(layer: nn.Module) -> bool:
    return type(layer) is nn.Flatten and layer.start_dim == 1 and layer.end_dim == -1


class _FusedModel:
    """A supported model read once into flat lists, so a step is tensor ops only.

    On these models one step is ~20 tiny tensor ops; walking `nn.Sequential`
    and dispatching on layer types every step would cost as much again.
    After the leading Flatten every tensor is (batch, features), so later
    Flattens are no-ops and are dropped.
    """

    def __init__(self, model: nn.Sequential) -> None:
        if not supports_fused(model):
            raise ValueError("the fused DP-SGD path needs a Flatten/Linear/ReLU/Tanh Sequential")
        self.layers: list[nn.Module] = [layer for layer in model if type(layer) is not nn.Flatten]
        self.linears: list[nn.Linear] = [m for m in self.layers if type(m) is nn.Linear]
        self.params: list[nn.Parameter] = list(model.parameters())
        self._minus_ones = torch.empty(0)  # grown on demand, see _minus_one_column

    def clipped_grad_sums(
        self, features: torch.Tensor, labels: torch.Tensor, max_grad_norm: float
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if len(labels) == 0:
            return [torch.zeros_like(param) for param in self.params], None

        # Forward, keeping every Linear's input and every layer's output.
        linear_inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        hidden = features.flatten(1)
        for layer in self.layers:
            if type(layer) is nn.Linear:
                linear_inputs.append(hidden)
                hidden = functional.linear(hidden, layer.weight, layer.bias)
            else:
                hidden = _ACTIVATIONS[type(layer)][0](hidden)
            outputs.append(hidden)
        log_probs = functional.log_softmax(hidden, dim=1)
        mean_loss = functional.nll_loss(log_probs, labels)  # for reporting only

        # Backward of the *per-sample* (sum-reduced) loss: d loss_b / d logits_b
        # = softmax_b - onehot(y_b). Walk back to the first Linear, keeping each
        # Linear's output gradient; the data's own gradient is never needed.
        grad = log_probs.exp_()  # the loss is taken: reuse its buffer for softmax
        grad.scatter_add_(1, labels.unsqueeze(1), self._minus_one_column(grad))
        output_grads: list[torch.Tensor] = []
        remaining = len(self.linears)
        for index in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[index]
            if type(layer) is nn.Linear:
                output_grads.append(grad)
                remaining -= 1
                if remaining == 0:
                    break
                grad = grad.mm(layer.weight)
            else:
                grad = _ACTIVATIONS[type(layer)][1](grad, outputs[index])
        output_grads.reverse()

        # Per-sample squared norm over all parameters (flat clipping), by ghost norm.
        squared_norms: torch.Tensor | None = None
        for layer, inputs, out_grad in zip(self.linears, linear_inputs, output_grads, strict=True):
            grad_sq = torch.linalg.vecdot(out_grad, out_grad)
            input_sq = torch.linalg.vecdot(inputs, inputs)
            if squared_norms is None:
                squared_norms = grad_sq if layer.bias is not None else torch.zeros_like(grad_sq)
            elif layer.bias is not None:
                squared_norms.add_(grad_sq)
            # With a bias: g·g·(a·a + 1) = g·g + g·g·a·a.
            squared_norms.addcmul_(grad_sq, input_sq)
        assert squared_norms is not None  # supports_fused guarantees a Linear
        # Opacus' clip factor, verbatim (DPOptimizer.clip_and_accumulate).
        clip_factor = (max_grad_norm / (squared_norms.sqrt_() + 1e-6)).clamp(max=1.0)
        clip_column = clip_factor.unsqueeze(1)

        sums: list[torch.Tensor] = []
        for layer, inputs, out_grad in zip(self.linears, linear_inputs, output_grads, strict=True):
            clipped = out_grad * clip_column
            sums.append(clipped.t().mm(inputs))
            if layer.bias is not None:
                sums.append(clipped.sum(0))
        return sums, mean_loss

    def _minus_one_column(self, like: torch.Tensor) -> torch.Tensor:
        """A (>= batch, 1) column of -1 for scatter_add_ (it reads only what it needs).

        Kept between steps: building it anew is as costly as the op using it.
        """
        cached = self._minus_ones
        if len(cached) < len(like) or cached.dtype != like.dtype or cached.device != like.device:
            self._minus_ones = torch.full(
                (max(len(like), 2 * len(cached)), 1),
                -1.0,
                dtype=like.dtype,
                device=like.device,
            )
        return self._minus_ones


@torch.no_grad()
def clipped_grad_sums(
    model: nn.Sequential, features: torch.Tensor, labels: torch.Tensor, max_grad_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Sum over the batch of per-sample gradients, each clipped to `max_grad_norm`.

    The loss is softmax cross-entropy, as in `train_locally`. Returns one
    tensor per parameter, in `model.parameters()` order and shape (what Opacus
    keeps in `p.summed_grad`), and the batch's mean loss (None for an empty
    batch, whose sums are zeros: its step is pure noise).
    """
    return _FusedModel(model).clipped_grad_sums(features, labels, max_grad_norm)


@torch.no_grad()
def noisy_step(
    params: list[nn.Parameter],
    sums: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    noise_std: float,
    expected_batch_size: int,
    generator: torch.Generator | None,
) -> None:
    """Opacus' `add_noise` + `scale_grad` (loss_reduction="mean"), then a plain step.

    Noise is drawn per parameter in parameter order with Opacus' own
    generator function, so the same generator state yields the same noise as
    an Opacus `DPOptimizer` step. Leaves the noisy gradients in `p.grad`.
    """
    for param, summed in zip(params, sums, strict=True):
        noise = _generate_noise(
            std=noise_std, reference=summed, generator=generator, secure_mode=False
        )
        # (summed + noise) / expected batch size, as Opacus; shapes already match.
        param.grad = noise.add_(summed).div_(expected_batch_size)
    optimizer.step()


@dataclass(frozen=True)
class FusedRun:
    """What the fused loop did: noisy steps taken and the losses of non-empty batches."""

    steps: int
    loss_sum: float
    loss_batches: int


def train_fused(
    model: nn.Sequential,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    noise_generator: torch.Generator | None,
    device: torch.device,
    after_step: Callable[[], None] | None = None,
) -> FusedRun:
    """DP-SGD over `epochs` passes of `batches` (an Opacus `DPDataLoader`).

    `expected_batch_size` must be the one `make_private` would use,
    int(len(dataset) * (1 / len(batches))). Every batch, empty ones included,
    is one noisy step, and `after_step` (FedProx' proximal step) runs after each.
    """
    fused = _FusedModel(model)
    noise_std = noise_multiplier * max_grad_norm
    steps, loss_sum, loss_batches = 0, 0.0, 0
    with torch.no_grad():
        for _ in range(epochs):
            for features, labels in batches:
                sums, loss = fused.clipped_grad_sums(
                    features.to(device), labels.to(device), max_grad_norm
                )
                noisy_step(
                    fused.params,
                    sums,
                    optimizer,
                    noise_std=noise_std,
                    expected_batch_size=expected_batch_size,
                    generator=noise_generator,
                )
                steps += 1
                if loss is not None:
                    loss_sum += float(loss)
                    loss_batches += 1
                if after_step is not None:
                    after_step()
    # Each step overwrites p.grad, so clearing once is enough: the caller gets
    # its model back without the last noisy gradient attached.
    optimizer.zero_grad(set_to_none=True)
    return FusedRun(steps=steps, loss_sum=loss_sum, loss_batches=loss_batches)
