"""Building a job's model, and the hash that says what it computes.

A job names a model; it never ships code or pickles. `build_model` looks
the name up among the installed model plugins (common/model_plugins.py:
consortia's own `logreg`, `mlp` and `cnn` below, and any installed
distribution's), validates the job's settings with the plugin's settings
model, builds it with seeded initial weights, and checks with Opacus that
DP-SGD can train it (no BatchNorm: per-sample gradients need per-sample
independence; GroupNorm is used instead). A model Opacus cannot train is
refused with the layers named and what `ModuleValidator.fix` would change.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass

import torch
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn

from consortia.common.config import ModelConfig
from consortia.common.model_plugins import (
    InstalledModel,
    ModelContext,
    ModelNotTrainableError,
    ModelUnusableError,
    find_model,
    validate_settings,
)


def build_model(
    config: ModelConfig, feature_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.Module:
    """Create the named model with deterministic initial weights for `seed`.

    Raises a `ModelError` (a `ConfigError`: one message, exit 2 at the CLI;
    a refusal on a node) when the model is not installed, is installed at
    another version than the job pins, its settings or the data do not fit
    it, or Opacus cannot train it.
    """
    installed = find_model(config.name, config.distribution, config.version)
    return build_installed(
        installed, config.settings, ModelContext(feature_shape, num_classes), seed
    )


def build_installed(
    installed: InstalledModel, settings: dict[str, object], context: ModelContext, seed: int
) -> nn.Module:
    """`installed` built with `settings` for `context`, seeded, and checked with Opacus."""
    plugin = installed.plugin()
    checked = validate_settings(installed, plugin, settings)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = plugin.build(checked, context)
    except ValueError as exc:  # the factory's own "this data does not fit me"
        raise ModelUnusableError(
            f"{installed.label()} cannot be built for features of shape "
            f"{context.feature_shape} with {context.num_classes} classes: {exc}"
        ) from None
    finally:
        torch.random.set_rng_state(generator_state)
    if not isinstance(model, nn.Module):
        raise ModelUnusableError(
            f"{installed.label()}: its factory returned a {type(model).__name__}, not an nn.Module"
        )
    problems = dp_problems(model)
    if problems:
        raise ModelNotTrainableError(
            f"{installed.label()} cannot be trained with DP-SGD (Opacus): "
            + "; ".join(str(problem) for problem in problems)
        )
    return model


@dataclass(frozen=True)
class LayerProblem:
    """A layer Opacus cannot train: where it is, what it is, why, and Opacus' own fix."""

    name: str  # the layer's path in the model ('' for the model itself)
    layer: str
    why: str
    fix: str | None  # what `ModuleValidator.fix` puts in its place, if anything

    def __str__(self) -> str:
        where = f"layer {self.name!r} ({self.layer})" if self.name else f"the model ({self.layer})"
        fix = (
            f"opacus.validators.ModuleValidator.fix would replace it with {self.fix}"
            if self.fix
            else "ModuleValidator.fix has no replacement for it"
        )
        return f"{where}: {self.why}; {fix}"


def dp_problems(model: nn.Module) -> list[LayerProblem]:
    """Every layer that stops Opacus from training `model` with DP-SGD, named.

    `ModuleValidator.validate` is the verdict (BatchNorm, LSTM and
    MultiheadAttention as torch has them, InstanceNorm with running
    statistics, ...); as it does not say where a problem sits, each
    trainable layer is also checked by the validator Opacus registers for
    its type, and a layer with buffers
    (state shared by the records of a batch, which Opacus' per-sample
    gradients cannot account for) is named even when no validator knows its
    type. What `ModuleValidator.fix` would change is read off a fixed copy.
    """
    problems: list[LayerProblem] = []
    for name, layer in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(layer))  # Opacus' check of this type
        errors: list[object] = list(validator(layer)) if validator is not None else []
        if not errors and any(True for _ in layer.buffers(recurse=False)):
            errors.append("it keeps buffers (running statistics), which DP-SGD cannot privatise")
        if errors:
            problems.append(LayerProblem(name, _short(layer), _first_sentence(errors[0]), None))
    whole = ModuleValidator.validate(model, strict=False)
    if whole and not problems:  # not about a layer (say, the model is in eval mode)
        problems.append(LayerProblem("", type(model).__name__, _first_sentence(whole[0]), None))
    if not problems:
        return []
    try:
        fixed = dict(ModuleValidator.fix(model).named_modules())
    except Exception:  # a fixer that fails on this model: the problems stand without a fix
        fixed = {}
    return [
        LayerProblem(p.name, p.layer, p.why, _fix(p, fixed.get(p.name))) if p.name else p
        for p in problems
    ]


def _fix(problem: LayerProblem, replacement: nn.Module | None) -> str | None:
    if replacement is None or _short(replacement) == problem.layer:
        return None
    return _short(replacement)


def _short(layer: nn.Module) -> str:
    return f"{type(layer).__name__}({layer.extra_repr()})"


def _first_sentence(error: object) -> str:
    """Opacus' explanations run to a paragraph; the first sentence says what is wrong."""
    return " ".join(str(error).split()).partition(". ")[0].rstrip(".")


def architecture_hash(model: nn.Module) -> str:
    """sha256 of what a model computes, independent of its weights.

    Covers every submodule's class and settings (`extra_repr`), every
    parameter's and buffer's name, shape and dtype, and the `forward` source of
    consortia's own module classes (torch's are pinned by the torch version in
    the run manifest). A node operator pins these hashes in the policy
    (`architectures`) to accept exactly the models reviewed, not just a name.
    """
    description = {
        "modules": [
            [name, f"{type(m).__module__}.{type(m).__qualname__}", m.extra_repr()]
            for name, m in model.named_modules()
        ],
        "tensors": [
            [name, list(t.shape), str(t.dtype)]
            for name, t in [*model.named_parameters(), *model.named_buffers()]
        ],
        "code": sorted({_forward_source(type(m)) for m in model.modules() if not _torchs(m)}),
    }
    canonical = json.dumps(description, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _torchs(module: nn.Module) -> bool:
    """A torch class: its code is pinned by the torch version the manifest records."""
    return type(module).__module__.split(".")[0] == "torch"


def _forward_source(cls: type[nn.Module]) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        raise ModelUnusableError(
            f"the source of {cls.__module__}.{cls.__qualname__}.forward cannot be read, so the "
            "model's architecture hash cannot cover its code: install the model's distribution "
            "with its .py files"
        ) from None


# ------------------------------------------------------------------ consortia's own models
# Their builders are `consortia.common.builtin_models` (the entry points); the modules stay
# here, so that their architecture hashes (which name each class's module) do not change.


def logreg(context: ModelContext) -> nn.Module:
    """Multinomial logistic regression."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(context.feature_shape), context.num_classes)
    )


def mlp(context: ModelContext, hidden: tuple[int, ...]) -> nn.Module:
    """Flatten, a Linear+ReLU per `hidden` width, and the output Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(context.feature_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, context.num_classes))
    return nn.Sequential(*layers)


def cnn(context: ModelContext) -> nn.Module:
    """`_SmallCnn` for images (channels, height, width)."""
    shape = context.feature_shape
    if len(shape) != 3:
        raise ValueError(
            f"model 'cnn' needs image data (channels, height, width); got features of "
            f"shape {shape}: use 'mlp' or 'logreg' for tables"
        )
    return _SmallCnn(shape[0], context.num_classes)


class _SmallCnn(nn.Module):
    """Two conv blocks with GroupNorm and tanh (tanh suits DP-SGD: Papernot et al., 2021)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.GroupNorm(4, 16),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.GroupNorm(4, 32),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 16, 64), nn.Tanh(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits
