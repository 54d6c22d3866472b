"""`gn_resnet`: a small ResNet with GroupNorm, for grayscale (or colour) images.

BatchNorm, the usual ResNet normaliser, mixes the records of a batch, so
DP-SGD's per-record gradients cannot be computed through it (Opacus refuses
it); GroupNorm normalises each record on its own and trains well under DP
(Kolesnikov et al. 2020; De et al. 2022). Sized for 28x28 inputs such as
MNIST on a CPU: the defaults have about 20k parameters.

A job:

    [model]
    name = "gn_resnet"
    width = 16          # channels of the first stage
    stages = [1, 1]     # residual blocks per stage; each later stage halves the
                        # resolution and doubles the channels
    groups = 4          # GroupNorm groups (must divide every stage's channels)
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional

from consortia.common.model_plugins import ModelContext, ModelPlugin


class ResNetSettings(BaseModel):
    """The `[model]` settings of `gn_resnet`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(default=16, ge=4, le=256, description="channels of the first stage")
    stages: tuple[int, ...] = Field(
        default=(1, 1), min_length=1, max_length=4, description="residual blocks per stage"
    )
    groups: int = Field(default=4, ge=1, description="GroupNorm groups")

    @model_validator(mode="after")
    def _groups_divide_every_stage(self) -> ResNetSettings:
        if any(blocks < 1 for blocks in self.stages):
            raise ValueError("every stage needs at least one block")
        for index in range(len(self.stages)):
            channels = self.width * 2**index
            if channels % self.groups:
                raise ValueError(
                    f"groups = {self.groups} does not divide stage {index + 1}'s {channels} "
                    "channels"
                )
        return self


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, and a shortcut (1x1 when the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                nn.GroupNorm(groups, channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return functional.relu(out + self.shortcut(x))


class GroupNormResNet(nn.Module):
    """Stem, residual stages, global average pooling, a linear classifier."""

    def __init__(self, channels: int, num_classes: int, settings: ResNetSettings) -> None:
        super().__init__()
        width = settings.width
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.GroupNorm(settings.groups, width),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        channels_in = width
        for index, count in enumerate(settings.stages):
            channels_out = width * 2**index
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels_in, channels_out, stride, settings.groups))
                channels_in = channels_out
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels_in, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.stages(self.stem(x)))
        return logits


def build(settings: ResNetSettings, context: ModelContext) -> nn.Module:
    """`gn_resnet` for images of `context.feature_shape` = (channels, height, width)."""
    shape = context.feature_shape
    if len(shape) != 3:
        raise ValueError(
            f"gn_resnet needs images (channels, height, width); got features of shape {shape}"
        )
    smallest = min(shape[1:]) // 2 ** (len(settings.stages) - 1)
    if smallest < 1:
        raise ValueError(
            f"{len(settings.stages)} stages halve {shape[1]}x{shape[2]} images to nothing; "
            "use fewer stages"
        )
    return GroupNormResNet(shape[0], context.num_classes, settings)


GN_RESNET = ModelPlugin(
    settings=ResNetSettings,
    build=build,
    summary="ResNet with GroupNorm (DP-SGD-safe) for images",
    example=ModelContext(feature_shape=(1, 28, 28), num_classes=10),
)
