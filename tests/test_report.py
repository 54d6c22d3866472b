"""report.html: built from synthetic metrics and manifests (no simulation), checked for its
content and, in headless Chromium, for charts that actually render."""

from __future__ import annotations

import html
import json
import os
import re
import stat
from pathlib import Path

import pytest
from chromium import rendered_charts
from pydantic import Field

from consortia.common.config import ScenarioConfig
from consortia.common.config_io import load_scenario
from consortia.server.outputs.manifest import Manifest
from consortia.server.outputs.metrics_file import FinalMetrics, MetricsFile
from consortia.server.outputs.report import REPORT_FILE, RunReport, render_run_report
from consortia.server.rounds.label_skew import LabelSkew, NodeLabels
from consortia.server.rounds.run_log import NodeFailure, RoundRecord
from consortia.simulations.lab import LAB
from consortia.simulations.sweep import (
    PlannedRun,
    new_sweep,
    plan_runs,
    read_result,
    sweep_spec,
    with_result,
    write_sweep,
)

TINY_SCENARIO = """
name = "tiny"
seed = 7
rounds = 3

[model]
name = "logreg"

[privacy]
target_epsilon = 2.0

[simulation]
nodes = 3

[simulation.data]
source = "breast_cancer"

[simulation.partition]
method = "dirichlet"
alpha = 0.5
min_records = 20
"""

BREAST_CANCER_RECORDS = 569
NODES = ("node-1", "node-2", "node-3")
FAILURES = {
    2: [
        NodeFailure(node="node-2", reason="no train reply within 60 s"),
        NodeFailure(node="node-3", reason="offline this round", refusal="simulated-dropout"),
    ],
    3: [
        NodeFailure(node="node-1", reason="update norm 41.2 exceeds the bound 3.1"),
        NodeFailure(node="node-3", reason="privacy budget spent", refusal="budget-exhausted"),
    ],
}


def tiny_scenario(folder: Path) -> Path:
    path = folder / "tiny.toml"
    path.write_text(TINY_SCENARIO)
    return path


def synthetic_manifest(folder: Path, *, simulated: bool = True) -> Manifest:
    """A manifest as a run writes it; a deployed job's has no `simulation` block."""
    config = load_scenario(tiny_scenario(folder)).config.model_dump(mode="json")
    if not simulated:
        config.pop("simulation")
    return Manifest(
        run_name="synthetic-run",
        created_utc="2025-01-02T03:04:05+00:00",
        scenario_source="tiny.toml",
        scenario_source_sha256="ab" * 32,
        config=config,
        config_sha256="cd" * 32,
        seed=7,
        packages={"consortia": "0.1.0", "flwr": "1.41.0", "torch": "2.13.0"},
        python="3.11.7",
        git_commit="0123456789abcdef0123456789abcdef01234567-dirty",
        data_fingerprints={name: f"{i}f" * 32 for i, name in enumerate(NODES)},
        model_architecture="ef" * 32,
    )


def synthetic_rounds(count: int = 3, record: type[RoundRecord] = RoundRecord) -> list[RoundRecord]:
    return [
        record(
            round=r,
            accuracy=0.6 + 0.1 * r,
            loss=1.0 / r,
            train_loss=1.1 / r,
            epsilon={name: 0.5 * r + 0.01 * i for i, name in enumerate(NODES)},
            participants=[n for n in NODES if all(f.node != n for f in FAILURES.get(r, []))],
            failures=FAILURES.get(r, []),
            seconds=1.5,
        )
        for r in range(1, count + 1)
    ]


def synthetic_metrics(finished: bool = True) -> MetricsFile:
    rounds = synthetic_rounds()
    final = FinalMetrics(
        accuracy=rounds[-1].accuracy,
        loss=rounds[-1].loss,
        epsilon_max=max(rounds[-1].epsilon.values()),
        epsilon=rounds[-1].epsilon,
        delta=1e-5,
        model="model/round-003.safetensors",
        model_sha256="00" * 32,
    )
    return MetricsFile(rounds=rounds, final=final if finished else None)


def _write_report(folder: Path, metrics: MetricsFile, manifest: Manifest | None) -> Path:
    """As a simulation's run writes it: the lab gives the true label counts of its scenario."""
    simulated = manifest is not None and "simulation" in manifest.config
    counts = LAB.label_counts(ScenarioConfig.model_validate(manifest.config)) if simulated else None
    report = RunReport(folder, counts)
    if manifest is not None:
        report.set_manifest(manifest)
    return report.write(metrics)


@pytest.fixture(scope="module")
def run_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    return _write_report(folder, synthetic_metrics(), synthetic_manifest(folder))


def _visible_text(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


# ------------------------------------------------------------------ content


def test_report_is_self_contained(run_report: Path) -> None:
    page = run_report.read_text(encoding="utf-8")
    assert run_report.name == REPORT_FILE
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # No external resource of any kind: every image is inline PNG data.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "@import" not in page and "url(" not in page and "<script" not in page
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert len(sources) == 4  # accuracy+loss, ε, labels, failures
    assert all(src.startswith("data:image/png;base64,") for src in sources)


def test_report_shows_learning_privacy_and_manifest(run_report: Path) -> None:
    text = _visible_text(run_report.read_text(encoding="utf-8"))
    assert "finished: 3 rounds" in text
    assert "0.9000" in text  # final accuracy
    assert "1.5200" in text  # node-3's ε after round 3: the largest
    assert "δ = 1e-05" in text
    for expected in (
        "tiny.toml",
        "ab" * 32,  # source sha256
        "cd" * 32,  # config sha256
        "0123456789abcdef0123456789abcdef01234567-dirty",
        "2025-01-02T03:04:05+00:00",
        "2f" * 32,  # node-3's data fingerprint
    ):
        assert expected in text, expected


def test_report_shows_the_true_partition(run_report: Path) -> None:
    """A simulation's report counts every node's labels: together, the whole dataset."""
    page = run_report.read_text(encoding="utf-8")
    assert "the simulated partition (true counts" in page
    rows = re.findall(r"<tr><td>(node-\d)</td><td>(\d+)</td><td>(\d+)</td></tr>", page)
    assert [name for name, _, _ in rows] == list(NODES)
    assert sum(int(a) + int(b) for _, a, b in rows) == BREAST_CANCER_RECORDS


def test_report_lists_every_failure_with_its_kind(run_report: Path) -> None:
    text = _visible_text(run_report.read_text(encoding="utf-8"))
    for failures in FAILURES.values():
        for failure in failures:
            assert failure.reason in text
    assert "no reply (dropout)" in text and "rejected update" in text
    assert "refused" in text and "budget-exhausted" in text
    assert "simulated dropout" in text  # the simulation lab's injected faults, by name


def test_report_renders_fields_a_later_round_record_adds(tmp_path: Path) -> None:
    """Per-round fields the report does not know by name are shown, not dropped."""

    class FutureRound(RoundRecord):
        quarantined: list[str] = Field(default_factory=list)
        trust: dict[str, float] = Field(default_factory=dict)
        blocked: list[str] = Field(default_factory=list)

    rounds = synthetic_rounds(record=FutureRound)
    rounds[1].quarantined.extend(["node-2", "node-3"])  # type: ignore[attr-defined]
    rounds[2].trust.update({"node-1": 0.25})  # type: ignore[attr-defined]
    page = render_run_report(MetricsFile(rounds=rounds), synthetic_manifest(tmp_path), None)
    text = _visible_text(page)
    assert "quarantined" in text and "node-2, node-3" in text
    assert "trust" in text and "node-1: 0.25" in text
    assert "blocked" not in text  # empty in every round: nothing to show


def test_a_secure_run_shows_its_quantization_error_per_round_and_its_failed_round(
    tmp_path: Path,
) -> None:
    """The fixed-point error is a column of every round, not a 'failure'; a round that
    could not be unmasked is listed with its reason under failures."""
    rounds = synthetic_rounds()
    for record in rounds:
        record.quantization_error = 3.4e-7
    rounds[1].quantization_error = None
    rounds[1].aggregation_failure = "the self-mask seed of node 5 has 1 share(s), 2 needed"
    page = render_run_report(MetricsFile(rounds=rounds), synthetic_manifest(tmp_path), None)
    text = _visible_text(page)
    assert "secure-aggregation error" in text and "3.4e-07" in text
    assert "aggregation_failure" in text and "has 1 share(s), 2 needed" in text
    assert "quantization_error" not in text


def test_interrupted_run_and_deployed_run(tmp_path: Path) -> None:
    """No final block: 'not finished'; a deployment knows only the DP label histograms."""
    manifest = synthetic_manifest(tmp_path, simulated=False)
    page = render_run_report(synthetic_metrics(finished=False), manifest, None)
    assert "not finished (running or interrupted): 3 of 3 rounds" in _visible_text(page)
    assert "Not known" in page

    skew = LabelSkew(
        noise_multiplier=4.0,
        pooled=(0.5, 0.5),
        nodes={
            "node-1": NodeLabels(proportions=(0.25, 0.75), total_variation=0.25),
            "node-2": NodeLabels(withheld="policy forbids label histograms"),
        },
    )
    report = RunReport(tmp_path)
    report.set_manifest(manifest.model_copy(update={"label_skew": skew}))
    text = _visible_text(report.write(synthetic_metrics()).read_text(encoding="utf-8"))
    assert "DP label histograms (Gaussian noise, σ = 4)" in text
    assert "0.250" in text and "0.750" in text
    assert "withheld: policy forbids label histograms" in text


def non_private_metrics() -> MetricsFile:
    """What a run with `privacy.enabled = false` writes: no ε anywhere, `private` false."""
    rounds = [r.model_copy(update={"epsilon": None}) for r in synthetic_rounds()]
    final = FinalMetrics(
        accuracy=rounds[-1].accuracy,
        loss=rounds[-1].loss,
        private=False,
        epsilon_max=None,
        epsilon=None,
        delta=None,
        model="model/round-003.safetensors",
        model_sha256="00" * 32,
    )
    return MetricsFile(rounds=rounds, final=final)


def _no_dp_manifest(folder: Path) -> Manifest:
    manifest = synthetic_manifest(folder)
    config = dict(manifest.config)
    config["privacy"] = {**config["privacy"], "enabled": False}  # type: ignore[dict-item]
    return manifest.model_copy(update={"config": config})


def _epsilon_cells(page: str) -> list[str]:
    """The 'max ε' column of the 'Every round' table."""
    table = page[page.index("Every round") :]
    headers = re.findall(r"<th>([^<]*)</th>", table)
    column = headers.index("max ε")
    rows = re.findall(r"<tr>((?:<td>[^<]*</td>)+)</tr>", table)
    return [re.findall(r"<td>([^<]*)</td>", row)[column] for row in rows]


def test_a_run_without_dp_reads_not_private_never_epsilon_zero(tmp_path: Path) -> None:
    page = render_run_report(non_private_metrics(), _no_dp_manifest(tmp_path), None)
    text = " ".join(_visible_text(page).split())
    assert "max ε per node not private (trained without DP: no finite ε)" in text
    assert "Not private: the nodes trained without differential privacy" in text
    assert _epsilon_cells(page) == ["not private"] * 3
    assert "0.0000" not in text and "ε after round" not in text


def test_an_older_metrics_file_without_dp_loads_as_not_private(tmp_path: Path) -> None:
    """metrics.json before `private` existed: ε 0.0 per node, δ null. It must still load,
    and read as what it meant; an older file of a DP run keeps its ε."""
    old = non_private_metrics().model_dump(mode="json")
    zeros = dict.fromkeys(NODES, 0.0)
    for record in old["rounds"]:
        record["epsilon"] = zeros
        for key in ("accuracy_per_node", "loss_per_node", "accuracy_node_mean", "loss_node_mean"):
            del record[key]
    del old["final"]["private"]
    old["final"].update(epsilon_max=0.0, epsilon=zeros)
    loaded = MetricsFile.model_validate_json(json.dumps(old))
    assert loaded.final is not None and loaded.final.private is False
    assert loaded.final.epsilon_max is None and loaded.final.epsilon is None
    assert all(r.epsilon is None for r in loaded.rounds)
    text = _visible_text(render_run_report(loaded, _no_dp_manifest(tmp_path), None))
    assert "not private" in text and "0.0000" not in text

    private = synthetic_metrics().model_dump(mode="json")
    del private["final"]["private"]
    again = MetricsFile.model_validate_json(json.dumps(private))
    assert again.final is not None and again.final.private is True
    assert again.final.epsilon_max == pytest.approx(1.52)
    # An interrupted older run without DP: no final block, its manifest says no DP.
    del old["final"]
    interrupted = render_run_report(
        MetricsFile.model_validate_json(json.dumps(old)), _no_dp_manifest(tmp_path), None
    )
    assert _epsilon_cells(interrupted) == ["not private"] * 3


def test_a_final_block_cannot_claim_an_epsilon_without_dp() -> None:
    with pytest.raises(ValueError, match="exactly when private is true"):
        FinalMetrics(
            accuracy=0.9,
            loss=0.1,
            private=False,
            epsilon_max=0.0,
            epsilon={"node-1": 0.0},
            delta=None,
            model="model/round-001.safetensors",
            model_sha256="00" * 32,
        )


def test_report_shows_every_nodes_own_evaluation_and_their_mean(tmp_path: Path) -> None:
    rounds = synthetic_rounds()
    for record in rounds:
        record.accuracy_per_node = {"node-1": 0.5, "node-2": 0.9, "node-3": 1.0}
        record.loss_per_node = {"node-1": 0.8, "node-2": 0.2, "node-3": 0.05}
        record.accuracy_node_mean = 0.8
        record.loss_node_mean = 0.35
    page = render_run_report(MetricsFile(rounds=rounds), synthetic_manifest(tmp_path), None)
    text = _visible_text(page)
    assert "Evaluation per node" in text
    cells = dict(re.findall(r"<tr><td>(node-\d)</td><td>([0-9.]+)</td><td>[0-9.]+</td></tr>", page))
    assert cells == {"node-1": "0.5000", "node-2": "0.9000", "node-3": "1.0000"}
    assert "unweighted mean over nodes" in text and "0.8000" in text
    assert "node mean accuracy" in text  # a column of every round
    assert "accuracy_per_node" not in text  # not listed again as an unknown field


def test_run_outputs_follow_the_umask_for_sharing(tmp_path: Path) -> None:
    """report.html and metrics.json are for colleagues: the umask decides, not a fixed 0600."""
    from consortia.server.outputs.run_outputs import RunOutputs

    previous = os.umask(0o022)
    try:
        outputs = RunOutputs(tmp_path / "run")
        outputs.write_manifest(synthetic_manifest(tmp_path))
        outputs.metrics = synthetic_metrics(finished=False)
        outputs.finish(synthetic_metrics().final, 1e-5)  # type: ignore[arg-type]
    finally:
        os.umask(previous)
    for name in ("report.html", "metrics.json", "manifest.json", "plots/accuracy.png"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


def test_rewrites_after_a_round_only_when_cheap(tmp_path: Path) -> None:
    report = RunReport(tmp_path)
    empty = MetricsFile()  # no chart to draw: the throttle is what is tested
    assert report.write_if_cheap(empty) is False  # the run just started
    report.write(empty)
    assert report.write_if_cheap(empty) is False  # written a moment ago
    report._written_at -= 3600  # an hour later: a report is cheap next to the run
    assert report.write_if_cheap(empty) is True
    assert "No round has finished yet" in (tmp_path / REPORT_FILE).read_text()


# ------------------------------------------------------------------ Chromium


def test_run_report_charts_render_in_chromium(run_report: Path, tmp_path: Path) -> None:
    seen = rendered_charts(run_report, tmp_path)
    assert seen == {"images": 4, "svgs": 0, "broken": [], "empty_svgs": 0}


def test_sweep_report_chart_renders_in_chromium(tmp_path: Path) -> None:
    sweep_dir = synthetic_sweep(tmp_path)
    seen = rendered_charts(sweep_dir / REPORT_FILE, tmp_path)
    assert seen == {"images": 1, "svgs": 0, "broken": [], "empty_svgs": 0}


def test_chromium_check_catches_a_broken_chart(run_report: Path, tmp_path: Path) -> None:
    """The check must be able to fail: a truncated PNG counts as a broken chart."""
    page = run_report.read_text(encoding="utf-8")
    start = page.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = tmp_path / "broken" / REPORT_FILE
    broken.parent.mkdir()
    broken.write_text(page[:start] + "iVBORw0KGgoAAAANSUhEUg" + page[start + 5000 :])
    seen = rendered_charts(broken, tmp_path)
    assert seen["images"] == 4 and len(seen["broken"]) == 1  # type: ignore[arg-type]


# ------------------------------------------------------------------ sweeps without Ray

SWEEP_ACCURACY = {(0.5, 7): 0.80, (0.5, 8): 0.84, (2.0, 7): 0.90, (2.0, 8): 0.96}


def write_run_metrics(folder: Path, accuracy: float, epsilon: float) -> None:
    """The metrics.json a finished run leaves (what a sweep reads back)."""
    folder.mkdir(parents=True)
    metrics = MetricsFile(
        rounds=[RoundRecord(round=1, accuracy=accuracy, epsilon={"node-1": epsilon})],
        final=FinalMetrics(
            accuracy=accuracy,
            loss=0.3,
            epsilon_max=epsilon,
            epsilon={"node-1": epsilon},
            delta=1e-5,
            model="model/round-001.safetensors",
            model_sha256="00" * 32,
        ),
    )
    (folder / "metrics.json").write_text(metrics.model_dump_json())


def synthetic_sweep(folder: Path) -> Path:
    """A 2 × 2 sweep whose runs are metrics.json files written here (no simulation)."""
    loaded = load_scenario(tiny_scenario(folder))
    spec = sweep_spec(["privacy.target_epsilon=0.5,2.0"], 2, loaded.config.seed)
    runs: list[PlannedRun] = plan_runs(loaded.config, spec)
    sweep_dir = folder / "sweep"
    sweep = new_sweep(loaded, spec, runs)
    for run in runs:
        target = run.config.privacy.target_epsilon
        assert target is not None
        write_run_metrics(sweep_dir / run.folder, SWEEP_ACCURACY[(target, run.seed)], target * 0.9)
        sweep = with_result(sweep, read_result(sweep_dir, run, wall_s=2.0))
    write_sweep(sweep_dir, sweep)
    return sweep_dir
