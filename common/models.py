"""consortia's model registry: nodes train only architectures installed here.

A job names a model; it never ships code or pickles. Every model is DP-SGD
compatible (no BatchNorm: per-sample gradients need per-sample independence;
GroupNorm is used instead) and checked with Opacus' `ModuleValidator`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math

import torch
from opacus.validators import ModuleValidator
from torch import nn

from consortia.common.config import ModelConfig
from consortia.common.errors import ConfigError


def build_model(
    config: ModelConfig, feature_shape: tuple[int, ...], num_classes: int, seed: int
) -> nn.Module:
    """Create the named model with deterministic initial weights for `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = _architecture(config, feature_shape, num_classes)
    finally:
        torch.random.set_rng_state(generator_state)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:  # pragma: no cover - the registry only holds compatible models
        raise ConfigError(f"model {config.name!r} is not DP-SGD compatible: {errors}")
    return model


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
        "code": sorted(
            {
                inspect.getsource(type(m).forward)
                for m in model.modules()
                if type(m).__module__.startswith("consortia.")
            }
        ),
    }
    canonical = json.dumps(description, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _architecture(
    config: ModelConfig, feature_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    in_features = math.prod(feature_shape)
    if config.name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
    if config.name == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        return nn.Sequential(*layers)
    if config.name == "cnn":
        if len(feature_shape) != 3:
            raise ConfigError(
                f"model 'cnn' needs image data (channels, height, width); got features of "
                f"shape {feature_shape}: use 'mlp' or 'logreg' for tables"
            )
        return _SmallCnn(feature_shape[0], num_classes)
    raise ConfigError(f"unknown model {config.name!r}")  # pragma: no cover - Literal-checked


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
