"""benchmarks/stock_secagg.py: stock Flower's per-round times, plain FedAvg and SecAgg+.

One small real run per mode (3 nodes, 1,000 parameters, 2 rounds), each in
the benchmark's own worker process with Ray, so that the wiring of Flower's
legacy workflow API (LegacyContext, DefaultWorkflow, SecAggPlusWorkflow,
secaggplus_mod) is exercised on the installed Flower. The worker itself
fails when the final model is not FedAvg's, so returning times means the
aggregate was right too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "stock_secagg.py"


def _benchmark() -> ModuleType:
    """The benchmark module, loaded from its file (benchmarks/ is not a package).

    Its helpers (worker_process.py) are imported from its folder, as when it
    runs as a script.
    """
    if str(BENCHMARK.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARK.parent))
    spec = importlib.util.spec_from_file_location("stock_secagg", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_plain_and_secagg_rounds_are_timed() -> None:
    stock_secagg = _benchmark()
    for secagg in (False, True):
        seconds = stock_secagg.flower_round_seconds(3, 1000, secagg=secagg, rounds=2)
        assert len(seconds) == 2, (secagg, seconds)
        assert all(isinstance(s, float) and s > 0 for s in seconds), (secagg, seconds)
