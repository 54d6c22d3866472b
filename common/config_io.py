"""Reading config files into validated models, with messages a person can act on.

A pydantic `ValidationError` is precise but written for programmers; this
module turns it into "file: key: what is wrong (allowed: ...)" lines.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from consortia.common.config import JobConfig, ScenarioConfig
from consortia.common.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

BUNDLED_SCENARIOS_PACKAGE = "consortia.simulations"
DEFAULT_SCENARIO = "hospitals-breast-cancer"


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, or raise a `ConfigError` that says where it is broken."""
    return _parse(_read_text(path), str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None


def validate_model(
    model: type[M], data: dict[str, Any], source: str, context: Mapping[str, object] | None = None
) -> M:
    """Validate `data` against `model`; on failure raise one readable `ConfigError`.

    `context`: pydantic's validation context (`deferred_lookup()` for a node
    reading a job whose model it may not have, see common/model_plugins.py).
    """
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """Render every problem as `source: key: message`, naming allowed keys where useful."""
    lines = []
    for error in exc.errors(include_url=False):
        if error["type"] == "default_factory_not_called":
            continue  # a default derived from a field that failed: that field's error says it
        loc = [part for part in error["loc"] if isinstance(part, str | int)]
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            message = "unknown key" + (f" (allowed here: {', '.join(allowed)})" if allowed else "")
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] in {"union_tag_invalid", "union_tag_not_found"}:
            message = error["msg"].replace("tag", "'name'")
        elif error["type"] in _BOUNDS and isinstance(
            bound := error.get("ctx", {}).get(_BOUNDS[error["type"]]), float
        ):
            # pydantic writes 1e-10 as 0.0000000001: easy to misread by a zero.
            message = f"{error['msg'].rsplit(' ', 1)[0]} {bound:g}"
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


_BOUNDS = {
    "greater_than": "gt",
    "greater_than_equal": "ge",
    "less_than": "lt",
    "less_than_equal": "le",
}


def _allowed_keys(model: type[BaseModel], loc: list[str | int]) -> list[str]:
    """The field names valid at `loc` inside `model` (empty if it cannot be resolved)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not _is_model(current):
            return []
        field = current.model_fields.get(part)
        if field is None:
            # A discriminated union is addressed by its tag value (e.g. 'fedprox').
            return []
        current = field.annotation
        current = _resolve_union_member(current)
    return sorted(current.model_fields) if _is_model(current) else []


def _resolve_union_member(annotation: Any) -> Any:
    """For `X | None` return X; unions of several models cannot be resolved."""
    args = getattr(annotation, "__args__", None)
    if not args:
        return annotation
    models = [arg for arg in args if _is_model(arg)]
    return models[0] if len(models) == 1 else annotation


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


# ------------------------------------------------------------------ scenarios


class LoadedConfig(BaseModel):
    """A validated job or scenario with where it came from and the hash of its source text."""

    config: ScenarioConfig | JobConfig
    source: str
    source_sha256: str


class LoadedScenario(LoadedConfig):
    """A validated scenario (a job plus its simulated consortium)."""

    config: ScenarioConfig


def load_job(path: Path, context: Mapping[str, object] | None = None) -> LoadedConfig:
    """Load a deployment job file (no `[simulation]` block: the nodes bring the data)."""
    return load_job_text(_read_text(path), str(path), context)


def read_job(path: Path) -> tuple[str, LoadedConfig]:
    """A job file's exact text and its validated config (the text is what travels)."""
    text = _read_text(path)
    return text, load_job_text(text, str(path))


def load_job_text(
    text: str, source: str, context: Mapping[str, object] | None = None
) -> LoadedConfig:
    """Validate a job's TOML text; `source` names it in messages and in the manifest."""
    config = validate_model(JobConfig, _settings(text, source, "job"), source, context)
    return LoadedConfig(
        config=config,
        source=source,
        source_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


def bundled_scenarios() -> list[str]:
    """Names of the scenarios that ship with the package."""
    folder = resources.files(BUNDLED_SCENARIOS_PACKAGE)
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_scenario(
    ref: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> LoadedScenario:
    """Load a scenario by path or bundled name, apply top-level overrides, validate.

    Parameters
    ----------
    ref : str | Path | None
        A path to a TOML file, or the name of a bundled scenario; the default
        scenario when None.
    overrides : dict, optional
        Top-level keys (e.g. ``{"rounds": 3}``) that replace the file's values,
        as given on the command line.
    """
    path, text = _resolve_scenario(ref)
    data = _settings(text, path, "scenario")
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    config = validate_model(ScenarioConfig, data, path)
    return LoadedScenario(
        config=config,
        source=path,
        source_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


def _resolve_scenario(ref: str | Path | None) -> tuple[str, str]:
    """Return (display path, text) for a scenario path or bundled name."""
    ref = DEFAULT_SCENARIO if ref is None else ref
    candidate = Path(ref)
    if candidate.suffix == ".toml" or candidate.exists():
        return str(candidate), _read_text(candidate)
    name = str(ref)
    resource = resources.files(BUNDLED_SCENARIOS_PACKAGE) / f"{name}.toml"
    if not resource.is_file():
        raise ConfigError(
            f"{name}: neither a file nor a bundled scenario "
            f"(bundled: {', '.join(bundled_scenarios())})"
        )
    return f"<bundled>/{name}.toml", resource.read_text(encoding="utf-8")


def _settings(text: str, source: str, kind: str) -> dict[str, Any]:
    """A job's or scenario's settings; an empty file is refused.

    Every key has a default, so an empty (or all-comment) file would validate
    and silently run the default job: much more likely a file saved empty,
    or the wrong file, than a deliberate choice.
    """
    data = _parse(text, source)
    if not data:
        bundled = f" (or name a bundled one: {', '.join(bundled_scenarios())})"
        raise ConfigError(
            f"{source}: the file holds no settings, so it would run the defaults; write the "
            f"{kind}'s settings in it{bundled if kind == 'scenario' else ''}"
        )
    return data


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
