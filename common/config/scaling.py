"""Public constants that image pixels are scaled with (the `normalize` tables)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from consortia.common.config.strict import StrictModel

__all__ = ["FiniteFloat", "ImageNormalization"]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class ImageNormalization(StrictModel):
    """Public per-channel constants that image pixels are standardised with.

    A model sees (pixel on [0, 1] − mean) / std per channel: `mean` and `std`
    are on the [0, 1] pixel scale (uint8 pixels / 255). They must be public,
    published with the dataset (MNIST's 0.1307 / 0.3081) or agreed by the
    consortium, never computed from one node's records: then every node
    scales alike and nothing of its data is spent on it. One value stands
    for every channel.
    """

    mean: tuple[FiniteFloat, ...] = Field(min_length=1)
    std: tuple[Annotated[FiniteFloat, Field(gt=0)], ...] = Field(min_length=1)

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _one_value_for_all(cls, value: object) -> object:
        return (value,) if isinstance(value, int | float) else value

    @model_validator(mode="after")
    def _same_length(self) -> ImageNormalization:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"'mean' gives {len(self.mean)} values and 'std' {len(self.std)}; give one "
                "value for every channel, or one for all"
            )
        return self

    def per_channel(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) for images of `channels` channels; ValueError if the counts differ."""
        if len(self.mean) == 1:
            return self.mean * channels, self.std * channels
        if len(self.mean) != channels:
            raise ValueError(
                f"'mean' and 'std' give {len(self.mean)} values for images of {channels} "
                f"channel{'' if channels == 1 else 's'}; give one per channel, or one for all"
            )
        return self.mean, self.std
