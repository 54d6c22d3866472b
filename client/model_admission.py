"""The job's model as a node builds it: from an installed distribution its policy accepts.

The job names an entry point of `consortia.models` and, as the coordinator
pinned them, the distribution and version it built the model from. The
node looks the model up among what its operator installed, checks the
policy's names and distribution pins (`models`, `model_distributions`)
before it imports any plugin code, builds the model with the job's settings and has Opacus
check it. Every way this can fail is a refusal with its own code, whose
reason names the distribution: a node without the plugin, or with another
version, declines the round instead of failing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from consortia.client.policy import (
    NodePolicy,
    Refusal,
    check_architecture,
    check_model_name,
    check_model_source,
)
from consortia.client.spend import NodeRefusedError
from consortia.common.config import JobConfig
from consortia.common.model_plugins import (
    InstalledModel,
    ModelContext,
    ModelError,
    ModelNotInstalledError,
    ModelNotTrainableError,
    ModelVersionError,
    find_model,
    installed_models,
)
from consortia.common.models import architecture_hash, build_installed
from consortia.common.protocol import RefusalCode

_CODES: dict[type[ModelError], RefusalCode] = {
    ModelNotInstalledError: RefusalCode.MODEL_NOT_INSTALLED,
    ModelVersionError: RefusalCode.MODEL_VERSION_MISMATCH,
    ModelNotTrainableError: RefusalCode.MODEL_NOT_DP_TRAINABLE,
}


def model_refusal(exc: ModelError) -> Refusal:
    """The refusal a node gives for a model it cannot build (`model-unusable` by default)."""
    return Refusal(code=_CODES.get(type(exc), RefusalCode.MODEL_UNUSABLE), reason=exc.message)


def installed_for(job: JobConfig, policy: NodePolicy | None) -> InstalledModel:
    """The installed distribution the job's model comes from, if the policy accepts it.

    Its name (`models`) and distribution pins (`model_distributions`) are
    checked here, reading only package metadata: no plugin code runs for a
    model the policy does not allow.
    """
    model = job.model
    try:
        installed = find_model(model.name, model.distribution, model.version)
    except ModelError as exc:
        raise NodeRefusedError(model_refusal(exc)) from None
    refusal = None
    if policy is not None:
        refusal = check_model_name(model.name, policy) or check_model_source(installed, policy)
    if refusal is not None:
        raise NodeRefusedError(refusal)
    return installed


def node_model(
    job: JobConfig,
    feature_shape: tuple[int, ...],
    num_classes: int,
    policy: NodePolicy | None,
) -> tuple[nn.Module, str]:
    """The job's model, seeded, and its architecture hash; `NodeRefusedError` if it cannot be.

    `policy`: a deployed node's (a simulated node has none: it only needs
    the model installed and trainable).
    """
    installed = installed_for(job, policy)
    try:
        model = build_installed(
            installed, job.model.settings, ModelContext(feature_shape, num_classes), job.seed
        )
        return model, architecture_hash(model)
    except ModelError as exc:
        raise NodeRefusedError(model_refusal(exc)) from None


@dataclass(frozen=True)
class NodeModelRow:
    """One installed model as `consortia node models list` shows it to the node's operator.

    `architecture`: its hash with default settings for the listing's input
    (None when it cannot be built there: `problem` says why); `refusal`: what
    the node's policy would answer a job that uses it so (None: accepted).
    """

    installed: InstalledModel
    architecture: str | None
    problem: Refusal | None
    refusal: Refusal | None


def node_models(policy: NodePolicy, context: ModelContext | None) -> list[NodeModelRow]:
    """Every model installed on this node, hashed for `context` (None: each plugin's example)."""
    rows = []
    for installed in installed_models():
        architecture = problem = None
        try:
            plugin = installed.plugin()
            model = build_installed(installed, {}, context or plugin.example, seed=0)
            architecture = architecture_hash(model)
        except ModelError as exc:
            problem = model_refusal(exc)
        refusal = check_model_name(installed.name, policy) or check_model_source(installed, policy)
        if refusal is None and architecture is not None:
            refusal = check_architecture(architecture, policy)
        rows.append(NodeModelRow(installed, architecture, problem, refusal))
    return rows
