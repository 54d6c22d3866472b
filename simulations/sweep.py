"""Sweeps: one scenario over a grid of settings × seeds, summed up as a privacy–utility table.

`consortia simulate SCENARIO --sweep privacy.target_epsilon=0.5,1,2 --seeds 3`
plans one run per (grid point, seed); this module plans the runs (every one
validated against the scenario schema before the first starts), reads each
finished run's metrics.json, and writes the sweep folder's sweep.json,
sweep.csv, plots/privacy-utility.png and report.html. The runs themselves
are started by the CLI (cli/sweep.py).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
import re
import statistics
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, JsonValue

from consortia.common.atomic import FileAccess, write_bytes_atomic, write_json_atomic
from consortia.common.config import ScenarioConfig
from consortia.common.config_io import LoadedScenario, validate_model
from consortia.common.errors import ConfigError
from consortia.simulations.sweep_file import (
    SWEEP_FILE,
    PointSummary,
    RunResult,
    SweepAxis,
    SweepFile,
)

if TYPE_CHECKING:
    from consortia.server.outputs.plots import CurvePoint, NonPrivatePoint

# Planning imports no torch, Flower or matplotlib: a bad --sweep fails in a blink. Reading
# results and drawing import them where they are needed (read_result, write_sweep).

SWEEP_CSV = "sweep.csv"
CURVE_FILE = "plots/privacy-utility.png"

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SweepSpec(BaseModel):
    """The grid (the product of the axes) and the seeds every grid point runs with."""

    axes: list[SweepAxis]
    seeds: list[int]

    def points(self) -> list[dict[str, JsonValue]]:
        keys = [axis.key for axis in self.axes]
        return [
            dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(axis.values for axis in self.axes))
        ]


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: its folder (inside the sweep's), grid point, seed and config."""

    folder: str
    point: dict[str, JsonValue]
    seed: int
    config: ScenarioConfig

    def loaded(self, base: LoadedScenario) -> LoadedScenario:
        """The run's scenario; the manifest names the sweep's source file, and its config."""
        return LoadedScenario(
            config=self.config, source=base.source, source_sha256=base.source_sha256
        )

    def describe(self) -> str:
        return " ".join([*(f"{k}={_short(v)}" for k, v in self.point.items()), f"seed={self.seed}"])


# ------------------------------------------------------------------ the plan


def parse_axis(option: str) -> SweepAxis:
    """`KEY=V1,V2,...` → an axis; each value is read as TOML (1, 0.5, true, [64, 32], "x"),
    and a bare word that is not TOML as a string (fedprox)."""
    key, sep, raw = option.partition("=")
    key = key.strip()
    if not sep or not raw.strip():
        raise ConfigError(
            f"--sweep {option}: expected KEY=V1,V2,... (e.g. privacy.target_epsilon=1,2)"
        )
    if not _KEY.match(key):
        raise ConfigError(
            f"--sweep {option}: '{key}' is not a dotted scenario key (e.g. privacy.delta)"
        )
    if key == "seed":
        raise ConfigError(f"--sweep {option}: give seeds with --seeds N, not as a sweep key")
    values = [_parse_value(piece, option) for piece in _split_values(raw)]
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ConfigError(f"--sweep {option}: a value is listed twice")
    return SweepAxis(key=key, values=values)


def sweep_spec(options: Sequence[str], seeds: int, base_seed: int) -> SweepSpec:
    """The grid of `--sweep` options and seeds base_seed, base_seed + 1, ..."""
    axes = [parse_axis(option) for option in options]
    keys = [axis.key for axis in axes]
    for key in keys:
        if keys.count(key) > 1 or any(k.startswith(f"{key}.") for k in keys):
            raise ConfigError(
                f"--sweep {key}: the key is swept twice (or inside another swept key)"
            )
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: at least one seed per grid point")
    return SweepSpec(axes=axes, seeds=[base_seed + i for i in range(seeds)])


def plan_runs(base: ScenarioConfig, spec: SweepSpec) -> list[PlannedRun]:
    """Every run's validated config, in order; fails before any run starts.

    Each value is first checked on its own (the message names exactly the
    `--sweep KEY=VALUE` at fault), then every combination and seed.
    """
    for axis in spec.axes:
        for value in axis.values:
            _configure(base, {axis.key: value}, base.seed, f"--sweep {axis.key}={_short(value)}")
    runs: list[PlannedRun] = []
    points = spec.points()
    width = len(str(len(points) * len(spec.seeds)))
    for point in points:
        for seed in spec.seeds:
            index = len(runs) + 1
            settings = ", ".join(f"{k}={_short(v)}" for k, v in point.items())
            source = f"--sweep {settings} (seed {seed})" if point else f"--seeds (seed {seed})"
            config = _configure(base, point, seed, source)
            folder = f"{index:0{width}d}-" + _slug(
                [*(f"{k}={_short(v)}" for k, v in point.items()), f"seed={seed}"]
            )
            runs.append(PlannedRun(folder=folder, point=point, seed=seed, config=config))
    return runs


def _configure(
    base: ScenarioConfig, point: dict[str, JsonValue], seed: int, source: str
) -> ScenarioConfig:
    """`base` with each dotted key of `point` replaced, validated as a whole scenario."""
    data = base.model_dump(exclude_unset=True)
    for key, value in point.items():
        _set_dotted(data, base, key, value, source)
    data["seed"] = seed
    return validate_model(ScenarioConfig, data, source)


def _set_dotted(
    data: dict[str, Any], base: BaseModel, key: str, value: JsonValue, source: str
) -> None:
    """Set `key` (a.b.c) in the scenario's data. A table the file left out starts
    from the scenario's default for it, so only the one key changes."""
    parts = key.split(".")
    node = data
    model: BaseModel | None = base
    for depth, part in enumerate(parts[:-1]):
        model = getattr(model, part, None)
        if part not in node or node[part] is None:
            node[part] = (
                model.model_dump(exclude_unset=True) if isinstance(model, BaseModel) else {}
            )
        if not isinstance(node[part], dict):
            table = ".".join(parts[: depth + 1])
            raise ConfigError(f"{source}: '{table}' is a value, not a table with keys")
        node = node[part]
    node[parts[-1]] = value


def _split_values(raw: str) -> list[str]:
    """Split at the commas outside brackets and quotes: `[64,32],[128]` is two values."""
    pieces: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    return [piece.strip() for piece in pieces]


def _parse_value(piece: str, option: str) -> JsonValue:
    if not piece:
        raise ConfigError(f"--sweep {option}: an empty value (two commas in a row?)")
    try:
        value: JsonValue = tomllib.loads(f"v = {piece}")["v"]
        return value
    except tomllib.TOMLDecodeError:
        return piece  # a bare word: a string value (e.g. strategy.name=fedprox)


def _short(value: JsonValue) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value, separators=(",", ":"))


def _slug(parts: list[str]) -> str:
    """A folder name: the run's settings, with anything but [A-Za-z0-9._=-] as '-'."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", "_".join(parts))[:120]


# ------------------------------------------------------------------ results


def new_sweep(base: LoadedScenario, spec: SweepSpec, runs: list[PlannedRun]) -> SweepFile:
    sweep = SweepFile(
        scenario=base.config.name,
        source=base.source,
        created_utc=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        axes=spec.axes,
        seeds=spec.seeds,
        planned=[run.folder for run in runs],
        runs=[],
        points=[],
    )
    return with_result(sweep, None)


def read_result(sweep_dir: Path, run: PlannedRun, wall_s: float) -> RunResult:
    """The run's figures, as its own metrics.json states them."""
    from consortia.server.outputs.metrics_file import METRICS_FILE, MetricsFile

    metrics = MetricsFile.model_validate_json((sweep_dir / run.folder / METRICS_FILE).read_bytes())
    final = metrics.final
    if final is None:
        return failed_result(run, wall_s, "the run wrote no final metrics")
    return RunResult(
        folder=run.folder,
        point=run.point,
        seed=run.seed,
        accuracy=final.accuracy,
        loss=final.loss,
        private=final.private,
        epsilon_max=final.epsilon_max,
        delta=final.delta,
        wall_s=wall_s,
    )


def failed_result(run: PlannedRun, wall_s: float, message: str) -> RunResult:
    return RunResult(
        folder=run.folder, point=run.point, seed=run.seed, wall_s=wall_s, error=message
    )


def with_result(sweep: SweepFile, result: RunResult | None) -> SweepFile:
    """The sweep with one more finished run, its table recomputed."""
    runs = [*sweep.runs, *([result] if result is not None else [])]
    spec = SweepSpec(axes=sweep.axes, seeds=sweep.seeds)
    points = [summarize(point, [r for r in runs if r.point == point]) for point in spec.points()]
    return sweep.model_copy(update={"runs": runs, "points": points})


def summarize(point: dict[str, JsonValue], runs: list[RunResult]) -> PointSummary:
    """Means and stds over a point's finished runs. A point trained without DP has no ε:
    its ε columns stay None (one run without DP makes the point not private)."""
    ok = [r for r in runs if r.error is None]
    accuracy = [r.accuracy for r in ok if r.accuracy is not None]
    private = None if not ok else all(r.private is not False for r in ok)
    epsilon = [r.epsilon_max for r in ok if r.epsilon_max is not None] if private else []
    return PointSummary(
        point=point,
        folders=[r.folder for r in runs],
        runs_ok=len(ok),
        runs_failed=len(runs) - len(ok),
        private=private,
        accuracy_mean=_mean(accuracy),
        accuracy_std=_std(accuracy),
        epsilon_max_mean=_mean(epsilon),
        epsilon_max_std=_std(epsilon),
        wall_s_mean=_mean([r.wall_s for r in ok]),
    )


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    """Sample standard deviation over seeds; None when fewer than two seeds finished."""
    return statistics.stdev(values) if len(values) >= 2 else None


# ------------------------------------------------------------------ files


def write_sweep(sweep_dir: Path, sweep: SweepFile) -> None:
    """sweep.json, sweep.csv, the privacy–utility figure and report.html (each atomic)."""
    from consortia.server.outputs import plots
    from consortia.simulations.sweep_report import write_sweep_report

    write_json_atomic(sweep_dir / SWEEP_FILE, sweep.model_dump(mode="json"), FileAccess.UMASK)
    write_bytes_atomic(sweep_dir / SWEEP_CSV, sweep_csv(sweep).encode("utf-8"), FileAccess.UMASK)
    curve = plots.privacy_utility_png(curves(sweep), non_private_points(sweep))
    write_bytes_atomic(sweep_dir / CURVE_FILE, curve, FileAccess.UMASK)
    write_sweep_report(sweep_dir, sweep, curve)


def sweep_csv(sweep: SweepFile) -> str:
    """One row per point. A point without DP has `private` false and empty ε cells (no ε)."""
    keys = [axis.key for axis in sweep.axes]
    columns = ["runs_ok", "runs_failed", "accuracy_mean", "accuracy_std"]
    columns += ["epsilon_max_mean", "epsilon_max_std", "wall_s_mean", "private"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*keys, *columns])
    for point in sweep.points:
        row = point.model_dump()
        writer.writerow(
            [
                *(_short(point.point[k]) for k in keys),
                *(_cell(row[c]) for c in columns),
            ]
        )
    return buffer.getvalue()


def _cell(value: object) -> object:
    """A CSV cell: None empty, booleans as JSON writes them (true/false)."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, bool) else value


def curves(sweep: SweepFile) -> dict[str, list[CurvePoint]]:
    """Accuracy-vs-ε points of the private grid points, one curve per combination of the
    axes after the first (points without DP: `non_private_points`)."""
    from consortia.server.outputs.plots import CurvePoint, finite

    out: dict[str, list[CurvePoint]] = {}
    for point in sweep.points:
        if not point.private or point.accuracy_mean is None or point.epsilon_max_mean is None:
            continue
        out.setdefault(_curve_label(sweep, point), []).append(
            CurvePoint(
                epsilon=point.epsilon_max_mean,
                epsilon_std=finite(point.epsilon_max_std),
                accuracy=point.accuracy_mean,
                accuracy_std=finite(point.accuracy_std),
            )
        )
    return out


def non_private_points(sweep: SweepFile) -> list[NonPrivatePoint]:
    """The grid points trained without DP: no ε, so on no curve. Each is labelled by its
    settings other than `privacy.*` (which a run without DP does not use)."""
    from consortia.server.outputs.plots import NonPrivatePoint, finite

    return [
        NonPrivatePoint(
            label=", ".join(
                f"{key}={_short(value)}"
                for key, value in point.point.items()
                if not key.startswith("privacy.")
            ),
            accuracy=point.accuracy_mean,
            accuracy_std=finite(point.accuracy_std),
        )
        for point in sweep.points
        if point.private is False and point.accuracy_mean is not None
    ]


def _curve_label(sweep: SweepFile, point: PointSummary) -> str:
    """The settings of the axes after the first: one curve per combination."""
    return ", ".join(f"{axis.key}={_short(point.point[axis.key])}" for axis in sweep.axes[1:])
