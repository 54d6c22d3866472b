"""Sweeps: the grid, its validation, the privacy–utility table, and one real sweep (Ray)."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pytest
from conftest import CliRunner, one_cli_error
from rich.console import Console
from test_report import SWEEP_ACCURACY, synthetic_sweep, tiny_scenario, write_run_metrics

from consortia.common.config_io import LoadedScenario, load_scenario
from consortia.common.errors import ConfigError, FederationError, PrivacyError
from consortia.server.outputs.report import REPORT_FILE
from consortia.simulations.sweep import (
    CURVE_FILE,
    SWEEP_CSV,
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
    so it ends with the accuracy, ε and model bytes of the same seed run alone.
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
        for seed in (3, 4):
            alone = consortia_cli(
                "simulate", "real.toml", "--out", f"alone-{seed}", "--seed", str(seed), "--quiet",
                cwd=tmp_path,
            )  # fmt: skip
            assert alone.returncode == 0, alone.stderr[-3000:]
        assert len(_ray_sessions(separate_ray)) == 2  # the count sees every Ray start
    finally:
        for folder in (swept_ray, separate_ray):
            shutil.rmtree(folder, ignore_errors=True)
    sweep = SweepFile.model_validate_json((tmp_path / "sweep" / SWEEP_FILE).read_bytes())
    assert [run.seed for run in sweep.runs] == [3, 4]
    for run in sweep.runs:
        swept = json.loads((tmp_path / "sweep" / run.folder / "metrics.json").read_text())
        alone = json.loads((tmp_path / f"alone-{run.seed}" / "metrics.json").read_text())
        for key in ("accuracy", "epsilon", "epsilon_max", "model_sha256"):
            assert swept["final"][key] == alone["final"][key], (run.seed, key)


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
