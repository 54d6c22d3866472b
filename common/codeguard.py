"""The environment that makes a Flower service run only installed code.

Used by `consortia node start` and `consortia coordinator start`: both
services receive app bundles (FABs) from the wire, and Flower would import
Python files from them and `uv sync` their dependencies. This sets the three
switches that prevent it for the service and every process it starts:
runtime dependency installation off, telemetry off, and the codeguard
`sitecustomize` (shipped in `consortia.client`, see its docstring) first on
PYTHONPATH so no module loads from Flower's app-bundle folder.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

REFUSE_VARIABLE = "CONSORTIA_REFUSE_CODE_UNDER"


def guarded_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: this process's environment) with the guards on."""
    env = dict(os.environ if base is None else base)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Never `uv sync` a FAB's dependencies (for torch: gigabytes, and code from the wire).
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    guard = resources.files("consortia.client") / "codeguard"
    env[REFUSE_VARIABLE] = str(_flwr_home(env) / "apps")
    env["PYTHONPATH"] = os.pathsep.join([str(guard), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _flwr_home(env: dict[str, str]) -> Path:
    """Flower's home folder as Flower computes it (FLWR_HOME, else ~/.flwr)."""
    home = env.get("FLWR_HOME")
    return Path(home).expanduser() if home else Path.home() / ".flwr"
