"""Facts about the machine a benchmark ran on, to print above its figures.

Usage from a script in this folder (run as `python benchmarks/<script>.py`)::

    from machine import format_machine_facts, machine_facts

    facts = machine_facts()
    print(format_machine_facts(facts))

Only the standard library is imported at module level; library versions are
read from the installed distributions' metadata, so asking for them does not
import PyTorch or Flower.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

_LIBRARIES = {"numpy": "numpy", "torch": "torch", "flwr": "flwr", "opacus": "opacus"}


def machine_facts() -> dict[str, str]:
    """CPU, cores, memory, Python and library versions, and the date (UTC), as strings."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    facts = {
        "cpu": _cpu_model(),
        "logical cores": str(os.cpu_count()),
        "usable cores": str(usable if usable is not None else os.cpu_count()),
        "memory": _total_memory(),
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
    }
    for label, distribution in _LIBRARIES.items():
        facts[label] = _version(distribution)
    torch = sys.modules.get("torch")
    if torch is not None:  # only when the benchmark already imported it
        facts["torch threads"] = str(torch.get_num_threads())
    facts["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return facts


def format_machine_facts(facts: dict[str, str], prefix: str = "") -> str:
    """One `key: value` line per fact, aligned, each preceded by `prefix`."""
    width = max(len(key) for key in facts)
    return "\n".join(f"{prefix}{key + ':':<{width + 1}} {value}" for key, value in facts.items())


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                return value.strip()
    return platform.processor() or "unknown"


def _total_memory() -> str:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024**2:.1f} GiB"
    return "unknown"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    print(format_machine_facts(machine_facts()))
