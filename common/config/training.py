"""`[model]` and `[training]`: what each node trains, and how, in every round."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from consortia.common.config.strict import StrictModel


class TrainingConfig(StrictModel):
    """Local training on each node, per round.

    `device`: 'auto' trains on the GPU when CUDA is present, else on the CPU;
    'cpu' forces the CPU; 'cuda' insists on a GPU (an error without one).

    `dp_engine` picks how DP-SGD computes clipped per-sample gradients. The
    mechanism (Poisson sampling, flat clipping to `max_grad_norm`, Gaussian
    noise, one noisy step per Poisson batch) and so the privacy guarantee are
    the same for all three; only speed and memory differ:
    - 'auto': the fused path (`client/fused_dpsgd.py`, no per-sample gradient
      materialised) for Flatten/Linear/ReLU/Tanh stacks (`logreg`, `mlp`),
      Opacus' per-sample hooks for every other model;
    - 'opacus': always Opacus' per-sample hooks (grad_sample_mode="hooks");
    - 'ghost': Opacus' fast gradient clipping (grad_sample_mode="ghost"):
      Linear and Embedding layers get their per-sample gradient norms without
      materialising per-sample gradients (ghost clipping), other layers go
      through fast gradient clipping; a model with tied (shared) parameters
      cannot use it.

    `max_physical_batch_size` caps how many records go through the model at
    once under DP: a Poisson batch larger than it is processed in chunks
    whose clipped gradient sums are added up before the single noisy step
    (Opacus' `BatchMemoryManager` on the Opacus engines). The logical batch,
    the noise and the step count, hence the privacy accounting, are unchanged.
    With 'auto' a fused-path model is chunked in the fused path too rather
    than rerouted through Opacus: the fused path's memory grows with the batch
    like a plain step's, so the cap applies there as well, and a memory limit
    should not silently cost the fused path's speed. Without DP the setting
    is ignored (a plain batch is `batch_size` records, never more).
    """

    local_epochs: int = Field(default=1, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, description="expected (Poisson) batch size under DP")
    learning_rate: float = Field(default=0.1, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_physical_batch_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "under DP, most records per forward/backward pass: larger Poisson batches are "
            "processed in chunks before their one noisy step (GPU memory; privacy unchanged)"
        ),
    )
    dp_engine: Literal["auto", "opacus", "ghost"] = Field(
        default="auto",
        description=(
            "DP-SGD implementation: 'auto' (fused for Linear-only models, else Opacus hooks), "
            "'opacus' (Opacus per-sample hooks), 'ghost' (Opacus fast gradient clipping)"
        ),
    )


class ModelConfig(StrictModel):
    """A model from consortia's registry, by name (never code from the wire)."""

    name: Literal["mlp", "logreg", "cnn"] = "mlp"
    hidden: tuple[int, ...] = (64,)
