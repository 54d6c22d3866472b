"""Model plugins: every model a node can train is an entry point of an installed distribution.

A distribution (consortia itself, or a researcher's package) registers a
`ModelPlugin` under the entry-point group `consortia.models`:

    [project.entry-points."consortia.models"]
    gn_resnet = "consortia_example_models.resnet:GN_RESNET"

A job names the entry point (`[model] name = "gn_resnet"`) and gives its
settings beside the name; the plugin's own pydantic model validates them.
The job carries names and values only, never code: a node builds a model
only from a distribution its operator installed, and the coordinator tells
the nodes which distribution and version it built the model from (see
`ModelConfig.pinned`), so that a node with another version refuses rather
than trains another network.

This module is torch-free on purpose: validating a job reads the plugin's
settings model, and a typo in a job must fail without importing torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from consortia.common.codeguard import REFUSE_VARIABLE
from consortia.common.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

ENTRY_POINT_GROUP = "consortia.models"

# The keys of `[model]` that are consortia's, not the model's: a plugin's settings
# may not use them (`ModelConfig` declares exactly these fields).
MODEL_KEYS = frozenset({"name", "distribution", "version"})

# The validation context key that says how a job's model is looked up (`ModelLookup`).
MODEL_LOOKUP = "consortia.model-lookup"


class ModelLookup(StrEnum):
    """How validating a job treats its model (the pydantic validation context `MODEL_LOOKUP`).

    REQUIRED (the default): the model must be installed here, and its
    settings are validated (and completed with their defaults) now: where a
    job is written, checked, submitted or run by the coordinator.
    DEFERRED: a node reading a job. A model missing here is the node's
    refusal to give (with a code naming the distribution), not a malformed
    job, so the settings are kept as written until the node builds it.
    """

    REQUIRED = "required"
    DEFERRED = "deferred"


def deferred_lookup() -> dict[str, ModelLookup]:
    """The validation context of a node reading a job (see `ModelLookup.DEFERRED`)."""
    return {MODEL_LOOKUP: ModelLookup.DEFERRED}


@dataclass(frozen=True)
class ModelContext:
    """What a model factory is told about the data: the same on the coordinator and every node.

    `feature_shape`: one record's features (channels, height, width for
    images; the encoded columns for tables, one-hot groups included);
    `num_classes`: the label's classes. Nothing else about the data leaves a
    node, so a factory that needs more (which columns form a categorical
    group) takes it as a setting.
    """

    feature_shape: tuple[int, ...]
    num_classes: int


S = TypeVar("S", bound=BaseModel)


@dataclass(frozen=True)
class ModelPlugin(Generic[S]):
    """What a distribution registers under `consortia.models`.

    `settings`: the pydantic model of the job's `[model]` keys beside
    `name` (give every field a default and `extra="forbid"`; consortia also
    refuses keys it does not declare). `build(settings, context)` returns
    the `nn.Module` with freshly initialised weights (the caller seeds
    torch); it raises `ValueError` with a sentence when the data cannot fit
    the model (a table for an image network). `example` is the input
    `consortia models check` builds the model for by default.
    """

    settings: type[S]
    build: Callable[[S, ModelContext], nn.Module]
    summary: str = ""
    example: ModelContext = ModelContext(feature_shape=(1, 28, 28), num_classes=10)


class ModelError(ConfigError):
    """A job's model cannot be used here; on a node, a refusal (client/model_admission.py)."""


class ModelNotInstalledError(ModelError):
    """No installed distribution provides the model (or not the distribution the job names)."""


class ModelVersionError(ModelError):
    """The model's distribution is installed at another version than the job's."""


class ModelUnusableError(ModelError):
    """Installed, but not buildable: settings, data shape, an ambiguous name, a broken plugin."""


class ModelNotTrainableError(ModelError):
    """Opacus cannot train the model with DP-SGD (BatchNorm, unsupported layers)."""


@dataclass(frozen=True)
class InstalledModel:
    """An entry point of `consortia.models` and the distribution that registered it."""

    name: str
    distribution: str
    version: str
    target: str  # the entry point's value, "module:object"
    entry_point: EntryPoint

    def label(self) -> str:
        """`'name' (distribution version)`: how messages name the model."""
        return f"model {self.name!r} ({self.distribution} {self.version})"

    def plugin(self) -> ModelPlugin[Any]:
        """Import the entry point's object; `ModelUnusableError` unless it is a `ModelPlugin`."""
        try:
            loaded = self.entry_point.load()
        except Exception as exc:  # the plugin's own import failed: name it, whatever it was
            raise ModelUnusableError(
                f"{self.label()}: its entry point {self.target!r} cannot be imported "
                f"({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(loaded, ModelPlugin):
            raise ModelUnusableError(
                f"{self.label()}: its entry point {self.target!r} is a "
                f"{type(loaded).__name__}, not a consortia.common.model_plugins.ModelPlugin"
            )
        if not (isinstance(loaded.settings, type) and issubclass(loaded.settings, BaseModel)):
            raise ModelUnusableError(
                f"{self.label()}: its settings must be a pydantic model class, not "
                f"{loaded.settings!r}"
            )
        clash = sorted(MODEL_KEYS & set(loaded.settings.model_fields))
        if clash:
            raise ModelUnusableError(
                f"{self.label()}: its settings use {', '.join(clash)}, which [model] keeps for "
                "consortia (the entry point's name, distribution and version); rename them"
            )
        return loaded


def canonical_name(distribution: str) -> str:
    """A distribution's name as packaging compares them (PEP 503): case, '-', '_', '.' alike."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installed_models() -> list[InstalledModel]:
    """Every model installed here, by name then distribution.

    A distribution found inside the folder a node refuses code from (the
    coordinator's app bundles, `CONSORTIA_REFUSE_CODE_UNDER`) is left out:
    a model comes from what the node's operator installed, never from what
    the coordinator shipped.
    """
    refused = os.environ.get(REFUSE_VARIABLE)
    found = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = point.dist
        if dist is None:  # pragma: no cover - every metadata finder sets it
            continue
        if refused and _inside(Path(str(dist.locate_file(""))), Path(refused)):
            continue
        found.append(
            InstalledModel(
                name=point.name,
                distribution=dist.metadata["Name"] or dist.name,
                version=dist.version,
                target=point.value,
                entry_point=point,
            )
        )
    return sorted(found, key=lambda m: (m.name, canonical_name(m.distribution)))


def _inside(location: Path, root: Path) -> bool:
    try:
        return location.resolve().is_relative_to(root.resolve())
    except (OSError, ValueError):
        return False


def find_model(
    name: str, distribution: str | None = None, version: str | None = None
) -> InstalledModel:
    """The installed model `name` (from `distribution`, at `version`, where given).

    Raises `ModelNotInstalledError` (naming the distribution when the job
    names one), `ModelVersionError`, or `ModelUnusableError` when two
    installed distributions register the same name and the job names neither.
    """
    everything = installed_models()
    candidates = [m for m in everything if m.name == name]
    if distribution is not None:
        wanted = canonical_name(distribution)
        candidates = [m for m in candidates if canonical_name(m.distribution) == wanted]
        if not candidates:
            raise ModelNotInstalledError(
                f"model {name!r} needs distribution {distribution!r}"
                + (f" {version}" if version else "")
                + f", which is not installed here{_providers(name, everything)}; install it "
                f"(pip install {distribution}{'==' + version if version else ''})"
            )
    if not candidates:
        names = sorted({m.name for m in everything})
        raise ModelNotInstalledError(
            f"model {name!r} is not installed here: no installed distribution registers it "
            f"in the entry-point group {ENTRY_POINT_GROUP!r} (installed: "
            f"{', '.join(names) or 'none'}); install the distribution that provides it, or "
            "reinstall one whose pyproject.toml changed (entry points are registered at install)"
        )
    if len(candidates) > 1:
        which = ", ".join(f"{m.distribution} {m.version}" for m in candidates)
        raise ModelUnusableError(
            f"model {name!r} is registered by {len(candidates)} installed distributions "
            f'({which}); name one with [model] distribution = "..."'
        )
    found = candidates[0]
    if version is not None and found.version != version:
        raise ModelVersionError(
            f"model {name!r} is {found.distribution} {version} in the job, but "
            f"{found.distribution} {found.version} is installed here; install "
            f"{found.distribution}=={version} (or run the job with the installed version)"
        )
    return found


def _providers(name: str, everything: list[InstalledModel]) -> str:
    others = [f"{m.distribution} {m.version}" for m in everything if m.name == name]
    return f" (here {name!r} comes from {', '.join(others)})" if others else ""


def validate_settings(
    installed: InstalledModel, plugin: ModelPlugin[S], raw: Mapping[str, object]
) -> S:
    """The job's settings for the model, validated by its plugin's own settings model.

    Keys the settings model does not declare are refused whatever its own
    `extra` setting, so that a typo never silently falls back to a default.
    Every problem goes into one `ModelUnusableError`.
    """
    allowed = sorted(plugin.settings.model_fields)
    problems = [
        f"{key}: unknown key (allowed here: {', '.join(allowed) or 'none'})"
        for key in raw
        if key not in plugin.settings.model_fields
    ]
    settings = None
    try:
        settings = plugin.settings.model_validate(dict(raw))
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            if error["type"] == "extra_forbidden":
                continue  # listed above, with the allowed keys
            message = error["msg"].removeprefix("Value error, ")  # the settings' own sentence
            where = ".".join(str(part) for part in error["loc"])
            problems.append(f"{where}: {message}" if where else message)
    if problems or settings is None:
        raise ModelUnusableError(f"{installed.label()}: settings: " + "; ".join(problems))
    return settings


def settings_dump(installed: InstalledModel, raw: Mapping[str, object]) -> dict[str, object]:
    """The job's settings validated and completed with the model's defaults, as plain values."""
    settings: BaseModel = validate_settings(installed, installed.plugin(), raw)
    return settings.model_dump()
