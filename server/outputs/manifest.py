"""The run manifest: everything needed to reproduce a run and to audit it later."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
from importlib import metadata

from pydantic import BaseModel

from consortia.common.config import JobConfig, ScenarioConfig
from consortia.common.model_plugins import find_model
from consortia.common.scaling import FeatureScaling
from consortia.common.source_revision import source_revision
from consortia.server.rounds.label_skew import LabelSkew, label_skew
from consortia.server.rounds.roster import Roster

_PACKAGES = ("consortia", "flwr", "torch", "opacus", "numpy")


class Manifest(BaseModel):
    """manifest.json.

    `config` is the resolved config the run used, defaults filled in, less
    the settings the run never reads (see `applied_config`); `config_sha256`
    hashes the whole config, so that a resume recognises its job.
    `feature_scaling` (simulations) records how the source's features were
    scaled, with the image constants used; a deployed job leaves it None,
    as each node records its own in its dataset registration.
    """

    run_name: str
    created_utc: str
    scenario_source: str
    scenario_source_sha256: str
    config: dict[str, object]
    config_sha256: str
    seed: int
    packages: dict[str, str]  # with the model's distribution when a plugin provides it
    python: str
    # The consortia source revision (`<commit>[-dirty]`): live in a checkout, else the build's.
    git_commit: str | None
    data_fingerprints: dict[str, str]
    model_architecture: str
    label_skew: LabelSkew | None = None
    feature_scaling: FeatureScaling | None = None

    @property
    def private(self) -> bool:
        """The run trains with DP (`privacy.enabled`); without it no node has a finite ε."""
        privacy = self.config.get("privacy")
        return not isinstance(privacy, dict) or privacy.get("enabled", True) is not False


def build_manifest(
    run_name: str,
    config: JobConfig,
    source: str,
    source_sha256: str,
    roster: Roster,
    model_architecture: str,
    feature_scaling: FeatureScaling | None = None,
) -> Manifest:
    """The manifest of a run of `config`; `feature_scaling`: a simulation's input scaling."""
    resolved = applied_config(config)
    return Manifest(
        run_name=run_name,
        created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        scenario_source=source,
        scenario_source_sha256=source_sha256,
        config=resolved,
        config_sha256=config_sha256(config),
        seed=config.seed,
        packages=_packages(config),
        python=platform.python_version(),
        git_commit=source_revision(),
        data_fingerprints={n.name: n.data_fingerprint for n in roster.nodes},
        model_architecture=model_architecture,
        label_skew=(
            None
            if config.label_histogram is None
            else label_skew(roster, config.label_histogram.noise_multiplier)
        ),
        feature_scaling=feature_scaling,
    )


def applied_config(config: JobConfig) -> dict[str, object]:
    """The resolved config, less the defaults of settings the run does not use.

    A 'files' scenario would otherwise record the default `[simulation.partition]`
    (method 'dirichlet') and `test_fraction` (0.2), neither of which it
    applies. Leaving them out changes nothing a resume reads: validating the
    manifest's config fills in the same defaults again.
    """
    resolved = config.model_dump(mode="json")
    if isinstance(config, ScenarioConfig):
        for path in config.simulation.unused_settings():
            parent: object = resolved["simulation"]
            for key in path[:-1]:
                parent = parent[key] if isinstance(parent, dict) else None
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
    return resolved


def config_sha256(config: JobConfig) -> str:
    """sha256 of the resolved config as canonical JSON (sorted keys, defaults filled in).

    Unset optional blocks (None) are left out, so that a block added to the
    schema later (say `[secure_aggregation]`) does not change the hash of a
    config that does not use it, and its runs stay resumable. Injective all
    the same: a None can only stand where a value is absent.
    """
    return _sha256_of(config.model_dump(mode="json", exclude_none=True))


def legacy_config_sha256(config: JobConfig) -> str:
    """The hash runs checkpointed before `config_sha256` left out None blocks carry.

    Then every field was hashed, None or not, and `[secure_aggregation]` and
    `[simulation.data] normalize` did not exist yet: the full dump without
    those keys. A resume accepts it, so
    runs begun before the change stay resumable.
    """
    dump = config.model_dump(mode="json")
    if dump.get("secure_aggregation", 0) is None:
        del dump["secure_aggregation"]
    # Nor did `[simulation.data] normalize`: a None there is left out as well.
    data = dump.get("simulation", {}).get("data", {})
    if data.get("normalize", 0) is None:
        del data["normalize"]
    return _sha256_of(dump)


def _sha256_of(dump: dict[str, object]) -> str:
    canonical = json.dumps(dump, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _packages(config: JobConfig) -> dict[str, str]:
    """consortia's own stack, and the distribution the model comes from (a plugin's, if any)."""
    packages = {name: _version(name) for name in _PACKAGES}
    model = config.model
    installed = find_model(model.name, model.distribution, model.version)
    packages.setdefault(installed.distribution, installed.version)
    return packages


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
