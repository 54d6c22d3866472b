"""Sweeps: the grid, its validation, the privacy–utility table, and one real sweep (Ray)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import stat
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from conftest import CliRunner, one_cli_error
from rich.console import Console
from test_report import SWEEP_ACCURACY, synthetic_sweep, tiny_scenario, write_run_metrics

from consortia.common.config_io import LoadedScenario, load_scenario
from consortia.common.errors import ConfigError, FederationError, PrivacyError
from consortia.server.outputs.metrics_file import FinalMetrics, MetricsFile
from consortia.server.outputs.plots import CurvePoint, NonPrivatePoint, privacy_utility_figure
from consortia.server.outputs.report import REPORT_FILE
from consortia.server.rounds.run_log import RoundRecord
from consortia.simulations.sweep import (
    CURVE_FILE,
    SWEEP_CSV,
    curves,
    non_private_points,
    parse_axis,
    plan_runs,
    sweep_spec,
)
from consortia.simulations.sweep_file import SWEEP_FILE, SweepFile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Two nodes, one round: the cheapest real federation (most of its time is Ray starting).
REAL_SCENARIO = """
name = "sweep-test"
seed = 3
rounds = 1

[model]
name = "logreg"

[training]
batch_size = 64
learning_rate = 4.0

[privacy]
target_epsilon = 1.0

[simulation]
nodes = 2

[simulation.data]
source = "breast_cancer"

[simulation.partition]
method = "iid"
"""


# ------------------------------------------------------------------ the grid


def test_values_are_read_as_toml_and_bare_words_as_strings() -> None:
    assert parse_axis("privacy.target_epsilon=0.5,1,2e1").values == [0.5, 1, 20.0]
    assert parse_axis("strategy.name=fedavg, fedprox").values == ["fedavg", "fedprox"]
    assert parse_axis("model.hidden=[64,32],[16]").values == [[64, 32], [16]]
    assert parse_axis('simulation.data.path="a,b",c').values == ["a,b", "c"]
    assert parse_axis("privacy.enabled=true,false").values == [True, False]


def test_grid_is_the_product_of_the_axes_times_the_seeds(tmp_path: Path) -> None:
    base = load_scenario(tiny_scenario(tmp_path)).config
    spec = sweep_spec(
        ["privacy.target_epsilon=0.5,2", "training.learning_rate=0.1,1"], 2, base.seed
    )
    runs = plan_runs(base, spec)
    assert spec.seeds == [7, 8]
    assert len(runs) == 8 and len({run.folder for run in runs}) == 8
    assert runs[0].folder == "1-privacy.target_epsilon=0.5_training.learning_rate=0.1_seed=7"
    got = {
        (r.config.privacy.target_epsilon, r.config.training.learning_rate, r.config.seed)
        for r in runs
    }
    assert got == {(e, lr, s) for e in (0.5, 2.0) for lr in (0.1, 1.0) for s in (7, 8)}
    # Everything else is the scenario's own.
    assert all(r.config.simulation == base.simulation for r in runs)
    assert all(r.config.rounds == base.rounds for r in runs)


def test_a_table_the_scenario_leaves_out_starts_from_its_default(tmp_path: Path) -> None:
    """Sweeping privacy.delta in a scenario without [privacy] keeps the default target ε."""
    path = tmp_path / "bare.toml"
    path.write_text('name = "bare"\n')
    base = load_scenario(path).config
    runs = plan_runs(
        base, sweep_spec(["privacy.delta=1e-6", "label_histogram.noise_multiplier=3"], 1, 0)
    )
    privacy, histogram = runs[0].config.privacy, runs[0].config.label_histogram
    assert privacy.delta == 1e-6 and privacy.target_epsilon == base.privacy.target_epsilon
    assert histogram is not None and histogram.noise_multiplier == 3


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["privacy.target_epsilonx=1"], ["privacy.target_epsilonx: unknown key", "target_epsilon"]),
        (["privacy.target_epsilon=1,-2"], ["privacy.target_epsilon=-2", "greater than 0"]),
        (["rounds.x=1"], ["'rounds' is a value"]),
        (["seed=1,2"], ["--seeds"]),
        (["privacy.delta"], ["expected KEY=V1,V2"]),
        (["privacy.delta=1e-6,1e-6"], ["listed twice"]),
        (["privacy=1", "privacy.delta=1e-6"], ["swept twice"]),
    ],
)
def test_a_bad_sweep_is_one_precise_error(
    tmp_path: Path, options: list[str], fragments: list[str]
) -> None:
    base = load_scenario(tiny_scenario(tmp_path)).config
    with pytest.raises(ConfigError) as caught:
        plan_runs(base, sweep_spec(options, 1, base.seed))
    for fragment in fragments:
        assert fragment in caught.value.message


# ------------------------------------------------------------------ the table


def test_table_is_computed_from_each_runs_metrics(tmp_path: Path) -> None:
    sweep_dir = synthetic_sweep(tmp_path)
    sweep = SweepFile.model_validate_json((sweep_dir / SWEEP_FILE).read_bytes())
    assert [p.point for p in sweep.points] == [
        {"privacy.target_epsilon": 0.5},
        {"privacy.target_epsilon": 2.0},
    ]
    for point in sweep.points:
        target = point.point["privacy.target_epsilon"]
        accuracies = [SWEEP_ACCURACY[(target, seed)] for seed in (7, 8)]
        assert point.runs_ok == 2 and point.runs_failed == 0
        assert point.accuracy_mean == pytest.approx(statistics.fmean(accuracies))
        assert point.accuracy_std == pytest.approx(statistics.stdev(accuracies))
        assert point.epsilon_max_mean == pytest.approx(0.9 * target)
        assert point.epsilon_max_std == pytest.approx(0.0)
        assert point.wall_s_mean == 2.0
        assert all((sweep_dir / folder / "metrics.json").is_file() for folder in point.folders)
    csv_lines = (sweep_dir / SWEEP_CSV).read_text().splitlines()
    assert csv_lines[0].startswith("privacy.target_epsilon,runs_ok,runs_failed,accuracy_mean")
    assert csv_lines[1].startswith("0.5,2,0,0.82")
    assert (sweep_dir / CURVE_FILE).read_bytes().startswith(PNG_MAGIC)
    report = (sweep_dir / REPORT_FILE).read_text()
    assert all(f'href="{run.folder}/report.html"' in report for run in sweep.runs)


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """A user error in one run (an unreachable ε, say) fails that run; the CLI then says so."""
    from consortia.cli.sweep import run_sweep

    def fake_simulate(loaded: LoadedScenario, out_dir: Path, listener: object) -> None:
        target = loaded.config.privacy.target_epsilon
        if target == 0.5:
            raise PrivacyError("ε = 0.5 is out of reach")
        write_run_metrics(out_dir, 0.9, target)

    loaded = load_scenario(tiny_scenario(tmp_path))
    with pytest.raises(FederationError, match=r"1 of 2 sweep runs failed.*out of reach"):
        run_sweep(
            Console(quiet=True),
            loaded,
            tmp_path / "s",
            ["privacy.target_epsilon=0.5,2"],
            1,
            simulate=fake_simulate,
        )
    sweep = json.loads((tmp_path / "s" / SWEEP_FILE).read_text())
    assert [run["error"] for run in sweep["runs"]] == ["ε = 0.5 is out of reach", None]
    assert sweep["points"][0]["accuracy_mean"] is None
    assert sweep["points"][1]["accuracy_mean"] == 0.9


def _write_run(out_dir: Path, loaded: LoadedScenario) -> None:
    """A finished run's metrics.json as the run would write it, with or without DP."""
    privacy = loaded.config.privacy
    if privacy.enabled:
        write_run_metrics(out_dir, 0.955, 1.5)
        return
    out_dir.mkdir(parents=True)
    metrics = MetricsFile(
        rounds=[RoundRecord(round=1, accuracy=0.973, epsilon=None)],
        final=FinalMetrics(
            accuracy=0.973,
            loss=0.1,
            private=False,
            epsilon_max=None,
            epsilon=None,
            delta=None,
            model="model/round-001.safetensors",
            model_sha256="00" * 32,
        ),
    )
    (out_dir / "metrics.json").write_text(metrics.model_dump_json())


def test_a_sweep_over_dp_on_and_off_never_shows_the_run_without_dp_at_epsilon_zero(
    tmp_path: Path,
) -> None:
    """sweep.json, sweep.csv, the curve's points, the report and the terminal table all say
    'not private' (null, empty, a separate line), never ε = 0 (issue 18)."""
    from consortia.cli.sweep import run_sweep

    out = io.StringIO()
    loaded = load_scenario(tiny_scenario(tmp_path))
    run_sweep(
        Console(file=out, width=160),
        loaded,
        tmp_path / "s",
        ["privacy.enabled=true,false"],
        1,
        simulate=lambda config, out_dir, listener: _write_run(out_dir, config),
    )
    sweep_dir = tmp_path / "s"
    raw = json.loads((sweep_dir / SWEEP_FILE).read_text())
    on, off = raw["points"]
    assert on["private"] is True and on["epsilon_max_mean"] == 1.5
    assert off["private"] is False and off["accuracy_mean"] == 0.973
    assert off["epsilon_max_mean"] is None and off["epsilon_max_std"] is None
    assert [(r["private"], r["epsilon_max"]) for r in raw["runs"]] == [(True, 1.5), (False, None)]

    rows = list(csv.DictReader(io.StringIO((sweep_dir / SWEEP_CSV).read_text())))
    assert [row["private"] for row in rows] == ["true", "false"]
    assert rows[1]["epsilon_max_mean"] == "" and rows[1]["epsilon_max_std"] == ""
    assert rows[1]["accuracy_mean"] == "0.973"

    sweep = SweepFile.model_validate(raw)
    assert {
        label: [(p.epsilon, p.accuracy) for p in points] for label, points in curves(sweep).items()
    } == {"": [(1.5, 0.955)]}
    assert non_private_points(sweep) == [
        NonPrivatePoint(label="", accuracy=0.973, accuracy_std=0.0)
    ]
    figure = privacy_utility_figure(curves(sweep), non_private_points(sweep))
    try:
        (ax,) = figure.axes
        markers = [line for line in ax.lines if line.get_marker() == "o"]
        plotted = [(x, y) for line in markers for x, y in zip(*line.get_data(), strict=True)]
        assert plotted == [(1.5, 0.955)]  # the run without DP is no point, at ε = 0 or anywhere
        labels = ax.get_legend_handles_labels()[1]
        assert labels == ["not private (no ε)"]
        (dashed,) = [line for line in ax.lines if line.get_label() == labels[0]]
        assert set(dashed.get_ydata()) == {0.973} and dashed.get_linestyle() == "--"
    finally:
        plt.close(figure)

    report = " ".join(re.sub(r"<[^>]+>", " ", (sweep_dir / REPORT_FILE).read_text()).split())
    assert "False 1/1 0.9730 n/a not private" in report  # the point's row
    assert "not private" in report.split("Runs", 1)[1]  # the run's row
    table = " ".join(out.getvalue().split())
    assert "not private" in table and "0.0000" not in table


def test_privacy_utility_axis_is_accuracy_0_to_1_not_zoomed_to_the_points() -> None:
    """A one-seed 2-point difference (0.955 vs 0.973) must not fill the plot like a collapse."""
    points = [
        CurvePoint(epsilon=1.0, epsilon_std=0.0, accuracy=0.955, accuracy_std=0.0),
        CurvePoint(epsilon=8.0, epsilon_std=0.0, accuracy=0.973, accuracy_std=0.004),
    ]
    figure = privacy_utility_figure({"": points})
    try:
        (ax,) = figure.axes
        assert ax.get_ylim() == (0.0, 1.0)
        assert ax.get_ylabel() == "final accuracy"
        caps = [c for c in ax.containers if c.has_yerr]  # error bars over seeds, where there are
        assert caps
    finally:
        plt.close(figure)


def test_sweep_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        sweep_dir = synthetic_sweep(tmp_path)
    finally:
        os.umask(previous)
    for name in (SWEEP_FILE, SWEEP_CSV, CURVE_FILE, REPORT_FILE):
        assert stat.S_IMODE((sweep_dir / name).stat().st_mode) == 0o640, name


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sweep", "privacy.target_epsilonx=1,2"], "privacy.target_epsilonx: unknown key"),
        (["--sweep", "privacy.target_epsilon=1,zero"], "privacy.target_epsilon=zero"),
        (["--seeds", "2", "--resume", "somewhere"], "cannot be combined with --resume"),
    ],
)
def test_cli_sweep_errors_are_one_message(
    tmp_path: Path, consortia_cli: CliRunner, args: list[str], fragment: str
) -> None:
    scenario = tiny_scenario(tmp_path)
    result = consortia_cli("simulate", str(scenario), "--out", "sweep", *args, cwd=tmp_path)
    assert fragment in one_cli_error(result)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_real_sweep_writes_runs_table_plot_and_report(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    """Two simulations, one after the other in one process, then the table of their metrics."""
    (tmp_path / "real.toml").write_text(REAL_SCENARIO)
    result = consortia_cli(
        "simulate",
        "real.toml",
        "--out",
        "sweep",
        "--sweep",
        "privacy.target_epsilon=0.5,2",
        "--seeds",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Privacy–utility" in result.stdout
    sweep_dir = tmp_path / "sweep"
    sweep = SweepFile.model_validate_json((sweep_dir / SWEEP_FILE).read_bytes())
    assert len(sweep.planned) == len(sweep.runs) == len(sweep.points) == 2
    for point, run in zip(sweep.points, sweep.runs, strict=True):
        target = point.point["privacy.target_epsilon"]
        run_dir = sweep_dir / run.folder
        final = json.loads((run_dir / "metrics.json").read_text())["final"]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert run.error is None and run.seed == 3 and manifest["seed"] == 3
        assert manifest["config"]["privacy"]["target_epsilon"] == target
        assert point.accuracy_mean == final["accuracy"] and point.accuracy_std is None
        assert point.epsilon_max_mean == final["epsilon_max"]
        assert 0 < final["epsilon_max"] <= target  # the nodes calibrated to the swept target
        assert run.wall_s > 0 and (run_dir / REPORT_FILE).is_file()
    assert sweep.points[0].epsilon_max_mean < sweep.points[1].epsilon_max_mean
    assert (sweep_dir / CURVE_FILE).read_bytes().startswith(PNG_MAGIC)
    assert len((sweep_dir / SWEEP_CSV).read_text().splitlines()) == 3
    assert "privacy.target_epsilon=2_seed=3" in (sweep_dir / REPORT_FILE).read_text()


@pytest.mark.slow
def test_a_sweep_starts_ray_once_and_its_runs_match_separate_runs(
    tmp_path: Path, consortia_cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--seeds 2`: one Ray start (Ray's own session folders count them), the same results.

    Each run of the sweep joins the sweep's one Ray with actors of its own,
    so it ends with the accuracy, ε and model bytes of the same seed run alone:
    checked on the second run, the one that joins a Ray another run used.
    """
    (tmp_path / "real.toml").write_text(REAL_SCENARIO)
    # A short folder of its own per case: Ray's socket paths must fit 107 bytes.
    swept_ray, separate_ray = (Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")) for _ in "ab")
    try:
        monkeypatch.setenv("RAY_TMPDIR", str(swept_ray))
        result = consortia_cli(
            "simulate", "real.toml", "--out", "sweep", "--seeds", "2", "--quiet", cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert len(_ray_sessions(swept_ray)) == 1
        assert _processes_mentioning(swept_ray) == []  # the sweep's Ray stopped with it
        monkeypatch.setenv("RAY_TMPDIR", str(separate_ray))
        # The sweep's second run, alone: it joined a Ray its first run had used.
        alone = consortia_cli(
            "simulate", "real.toml", "--out", "alone-4", "--seed", "4", "--quiet", cwd=tmp_path
        )  # fmt: skip
        assert alone.returncode == 0, alone.stderr[-3000:]
        assert len(_ray_sessions(separate_ray)) == 1  # the count sees a Ray start
    finally:
        for folder in (swept_ray, separate_ray):
            shutil.rmtree(folder, ignore_errors=True)
    sweep = SweepFile.model_validate_json((tmp_path / "sweep" / SWEEP_FILE).read_bytes())
    assert [run.seed for run in sweep.runs] == [3, 4]
    finals = [
        json.loads((tmp_path / "sweep" / run.folder / "metrics.json").read_text())["final"]
        for run in sweep.runs
    ]
    assert finals[0]["model_sha256"] != finals[1]["model_sha256"]  # two seeds, two models
    alone_final = json.loads((tmp_path / "alone-4" / "metrics.json").read_text())["final"]
    for key in ("accuracy", "epsilon", "epsilon_max", "model_sha256"):
        assert finals[1][key] == alone_final[key], key


def _ray_sessions(ray_tmpdir: Path) -> list[Path]:
    """One `session_<time>_<pid>` folder per Ray started with this RAY_TMPDIR."""
    return [p for p in (ray_tmpdir / "ray").glob("session_*") if p.name != "session_latest"]


def _processes_mentioning(folder: Path, wait_s: float = 20.0) -> list[str]:
    """Command lines naming `folder` (Ray's processes name their session folder), after
    giving them `wait_s` to exit."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # exited while we looked
            if str(folder) in text:
                found.append(text)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)
