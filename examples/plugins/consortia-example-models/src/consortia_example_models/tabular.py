"""`tabular_embeddings`: an MLP over a table whose category columns get learned embeddings.

A node's table reaches the model encoded: numeric columns as numbers, each
category column as a group of one-hot columns, in the order of the
dataset's schema (`drop_first` leaves out a group's first category, which
is then all zeros). The model factory is told only the encoded width
(`ModelContext.feature_shape`), the same on every node; which columns form
a category group is part of the schema the consortium agreed on, so the job
says it: each `categorical` entry names a group's first one-hot column and
its number of columns. Every other column is numeric.

Each group is read back as a category index (0 for a row with no column
set: the dropped first category, or a missing value), looked up in its own
`nn.Embedding` (k + 1 rows for k columns), and concatenated with the
numeric columns before the MLP. Opacus computes per-record gradients for
Embedding layers, so the model trains with DP-SGD as it is.

    [model]
    name = "tabular_embeddings"
    hidden = [64]
    categorical = [{first = 4, columns = 3}, {first = 7, columns = 5, dim = 3}]
"""

from __future__ import annotations

from itertools import pairwise

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from consortia.common.model_plugins import ModelContext, ModelPlugin


class CategoricalColumns(BaseModel):
    """One category column, as its group of one-hot columns in the encoded table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first: int = Field(ge=0, description="index of the group's first one-hot column")
    columns: int = Field(ge=1, description="one-hot columns in the group")
    dim: int | None = Field(
        default=None, ge=1, le=64, description="embedding size (default: embedding_dim)"
    )


class TabularSettings(BaseModel):
    """The `[model]` settings of `tabular_embeddings`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    categorical: tuple[CategoricalColumns, ...] = ()
    embedding_dim: int = Field(default=4, ge=1, le=64)
    hidden: tuple[int, ...] = Field(default=(64,), max_length=8)

    @model_validator(mode="after")
    def _groups_do_not_overlap(self) -> TabularSettings:
        if any(width < 1 for width in self.hidden):
            raise ValueError("every hidden width must be at least 1")
        ordered = sorted(self.categorical, key=lambda group: group.first)
        for before, after in pairwise(ordered):
            if before.first + before.columns > after.first:
                raise ValueError(
                    f"the groups starting at columns {before.first} and {after.first} overlap"
                )
        return self


class TabularEmbeddingNet(nn.Module):
    """Numeric columns and category embeddings, concatenated, through an MLP."""

    def __init__(self, width: int, num_classes: int, settings: TabularSettings) -> None:
        super().__init__()
        groups = sorted(settings.categorical, key=lambda group: group.first)
        # Column ranges as plain ints (not buffers: a buffer would be state Opacus refuses).
        self.groups = [(group.first, group.columns) for group in groups]
        taken = {group.first + i for group in groups for i in range(group.columns)}
        self.numeric = [column for column in range(width) if column not in taken]
        dims = [group.dim or settings.embedding_dim for group in groups]
        self.embeddings = nn.ModuleList(
            nn.Embedding(group.columns + 1, dim) for group, dim in zip(groups, dims, strict=True)
        )
        layers: list[nn.Module] = []
        size = len(self.numeric) + sum(dims)
        for hidden in settings.hidden:
            layers += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        layers.append(nn.Linear(size, num_classes))
        self.mlp = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        # The column layout is in no parameter's shape: stated here, consortia's architecture
        # hash (which reads every module's extra_repr) tells two layouts apart.
        return f"groups={self.groups}, numeric={self.numeric}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, self.numeric]]
        for (first, columns), embedding in zip(self.groups, self.embeddings, strict=True):
            one_hot = x[:, first : first + columns]
            positions = torch.arange(1, columns + 1, dtype=x.dtype, device=x.device)
            index = (one_hot * positions).sum(dim=1).round().long().clamp(0, columns)
            parts.append(embedding(index))
        logits: torch.Tensor = self.mlp(torch.cat(parts, dim=1))
        return logits


def build(settings: TabularSettings, context: ModelContext) -> nn.Module:
    """`tabular_embeddings` for a table of `context.feature_shape` = (encoded columns,)."""
    shape = context.feature_shape
    if len(shape) != 1:
        raise ValueError(
            f"tabular_embeddings needs a table (one row of encoded columns); got features "
            f"of shape {shape}"
        )
    for group in settings.categorical:
        if group.first + group.columns > shape[0]:
            raise ValueError(
                f"the category group at columns {group.first}..{group.first + group.columns - 1} "
                f"lies beyond the table's {shape[0]} encoded columns"
            )
    return TabularEmbeddingNet(shape[0], context.num_classes, settings)


TABULAR_EMBEDDINGS = ModelPlugin(
    settings=TabularSettings,
    build=build,
    summary="MLP over numeric columns and learned embeddings of one-hot category groups",
    example=ModelContext(feature_shape=(12,), num_classes=2),
)
