"""consortia's own models, `logreg`, `mlp` and `cnn`: plugins of the `consortia` distribution.

They are registered in consortia's pyproject.toml under the entry-point
group `consortia.models` exactly as a researcher's plugin is in its own
(common/model_plugins.py); nothing treats them specially. The three share
one settings model, the `[model]` keys jobs have always had (`hidden`, the
MLP's hidden widths, accepted and unused by the other two as it always was),
so existing jobs validate unchanged and build the same weights.

Torch-free at import, like model_plugins: validating a job loads this
module for its settings model; torch is imported when a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from consortia.common.config.strict import StrictModel
from consortia.common.model_plugins import ModelContext, ModelPlugin

if TYPE_CHECKING:
    from torch import nn


class LayerSettings(StrictModel):
    """The settings of `logreg`, `mlp` and `cnn`: `hidden`, the MLP's hidden layer widths."""

    hidden: tuple[int, ...] = (64,)


def _logreg(settings: LayerSettings, context: ModelContext) -> nn.Module:
    from consortia.common import models  # torch, only once a model is built

    return models.logreg(context)


def _mlp(settings: LayerSettings, context: ModelContext) -> nn.Module:
    from consortia.common import models

    return models.mlp(context, settings.hidden)


def _cnn(settings: LayerSettings, context: ModelContext) -> nn.Module:
    from consortia.common import models

    return models.cnn(context)


LOGREG = ModelPlugin(
    settings=LayerSettings,
    build=_logreg,
    summary="multinomial logistic regression: Flatten, Linear",
)
MLP = ModelPlugin(
    settings=LayerSettings,
    build=_mlp,
    summary="Flatten, then Linear+ReLU per `hidden` width, then Linear",
)
CNN = ModelPlugin(
    settings=LayerSettings,
    build=_cnn,
    summary="two Conv+GroupNorm+Tanh blocks and a Tanh MLP head, for images",
)
