"""`[model]` and `[training]`: what each node trains, and how, in every round."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from consortia.common.config.strict import StrictModel
from consortia.common.model_plugins import (
    MODEL_KEYS,
    MODEL_LOOKUP,
    ModelError,
    ModelLookup,
    find_model,
    settings_dump,
)


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
    """`[model]`: an installed model, by entry-point name, and its settings (never code).

    `name` is an entry point of the group `consortia.models`
    (common/model_plugins.py); consortia's own `logreg`, `mlp` and `cnn` are
    entries of the `consortia` distribution like any plugin's. Every other
    key of `[model]` is a setting of that model, validated by the plugin's
    own settings model (`mlp`'s `hidden`, say), as `[strategy]` keeps each
    strategy's settings beside its name: today's jobs read as they always
    did, and a sweep axis such as `model.hidden` reaches a plugin's settings
    the same way. Validation completes the settings with their defaults,
    so a job's resolved config (and `config_sha256`) states the model fully.

    `distribution` and `version` pin where the model comes from. A job may
    leave them out; the coordinator fills both in from the distribution it
    built the model with before the job goes to the nodes (`pinned`), and a
    node whose installed distribution or version differs refuses.

    A node reads a job with `ModelLookup.DEFERRED`: a model it does not
    have is its refusal to give, not a malformed job.
    """

    # The extra keys are the model's settings; the plugin's settings model checks them.
    model_config = ConfigDict(extra="allow")

    name: str = Field(default="mlp", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    distribution: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="the installed distribution the model must come from",
    )
    version: str | None = Field(
        default=None, min_length=1, max_length=64, description="its exact version"
    )

    @model_validator(mode="before")
    @classmethod
    def _settings_of_the_model(cls, data: object, info: ValidationInfo) -> object:
        """Validate the settings with the model's own settings model, defaults filled in."""
        context = info.context if isinstance(info.context, dict) else {}
        if context.get(MODEL_LOOKUP) == ModelLookup.DEFERRED or not isinstance(data, dict):
            return data  # a node's reading: its own checks decide, as refusals
        name, distribution, version = (data.get(key) for key in ("name", "distribution", "version"))
        if not all(isinstance(v, str | None) for v in (name, distribution, version)):
            return data  # the fields' own validation names the wrong type
        settings = {k: v for k, v in data.items() if k not in MODEL_KEYS}
        try:
            installed = find_model(name or "mlp", distribution, version)
            resolved = settings_dump(installed, settings)
        except ModelError as exc:
            raise PydanticCustomError("model_plugin", "{reason}", {"reason": exc.message}) from None
        return {**{k: v for k, v in data.items() if k in MODEL_KEYS}, **resolved}

    @model_serializer(mode="wrap")
    def _without_unset_source(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        """Unpinned `distribution`/`version` are left out: a job that does not pin its model
        serialises (and hashes, `config_sha256`) exactly as before models were plugins."""
        dump: dict[str, object] = handler(self)
        return {k: v for k, v in dump.items() if not (k in MODEL_KEYS and v is None)}

    @property
    def settings(self) -> dict[str, object]:
        """The model's settings: the keys of `[model]` besides name, distribution and version."""
        return dict(self.model_extra or {})

    def pinned(self) -> ModelConfig:
        """This model with `distribution` and `version` set to the installed ones it resolves to."""
        installed = find_model(self.name, self.distribution, self.version)
        return self.model_copy(
            update={"distribution": installed.distribution, "version": installed.version}
        )
