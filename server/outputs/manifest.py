"""The run manifest: everything needed to reproduce a run and to audit it later."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel

from consortia.common.config import JobConfig
from consortia.server.rounds.label_skew import LabelSkew, label_skew
from consortia.server.rounds.roster import Roster

_PACKAGES = ("consortia", "flwr", "torch", "opacus", "numpy")


class Manifest(BaseModel):
    """manifest.json."""

    run_name: str
    created_utc: str
    scenario_source: str
    scenario_source_sha256: str
    config: dict[str, object]
    config_sha256: str
    seed: int
    packages: dict[str, str]
    python: str
    git_commit: str | None
    data_fingerprints: dict[str, str]
    model_architecture: str
    label_skew: LabelSkew | None = None

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
) -> Manifest:
    resolved = config.model_dump(mode="json")
    return Manifest(
        run_name=run_name,
        created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        scenario_source=source,
        scenario_source_sha256=source_sha256,
        config=resolved,
        config_sha256=config_sha256(config),
        seed=config.seed,
        packages={name: _version(name) for name in _PACKAGES},
        python=platform.python_version(),
        git_commit=_git_commit(),
        data_fingerprints={n.name: n.data_fingerprint for n in roster.nodes},
        model_architecture=model_architecture,
        label_skew=(
            None
            if config.label_histogram is None
            else label_skew(roster, config.label_histogram.noise_multiplier)
        ),
    )


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

    Then every field was hashed, None or not, and `[secure_aggregation]` did
    not exist yet: the full dump without that key. A resume accepts it, so
    runs begun before the change stay resumable.
    """
    dump = config.model_dump(mode="json")
    if dump.get("secure_aggregation", 0) is None:
        del dump["secure_aggregation"]
    return _sha256_of(dump)


def _sha256_of(dump: dict[str, object]) -> str:
    canonical = json.dumps(dump, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str | None:
    """The commit of consortia's source tree, when it runs from a git checkout."""
    source_dir = Path(__file__).resolve().parent
    try:
        commit = _git(source_dir, "rev-parse", "HEAD")
        dirty = _git(source_dir, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if commit is None:
        return None
    return commit + ("-dirty" if dirty else "")


def _git(folder: Path, *args: str) -> str | None:
    """git's stripped output, or None if it fails (not a checkout, no git)."""
    result = subprocess.run(
        ["git", *args], cwd=folder, capture_output=True, text=True, timeout=5, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else None
