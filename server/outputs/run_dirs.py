"""Where a run's files go by default: runs/<UTC timestamp>-<scenario name>/."""

from __future__ import annotations

import datetime as dt
from pathlib import Path


def default_run_dir(base: Path, scenario_name: str) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate = base / f"{stamp}-{scenario_name}"
    suffix = 1
    while candidate.exists():  # two runs in the same second
        suffix += 1
        candidate = base / f"{stamp}-{scenario_name}-{suffix}"
    return candidate
