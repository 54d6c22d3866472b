"""The run directory: manifest.json, checkpoints/, model/, metrics.json, plots/, report.html.

After every round, in this order: the round checkpoint (everything needed
to resume), the round's model file, then metrics.json, then report.html
when rewriting it is cheap (report.py). Each is written atomically, so a
run killed at any moment leaves complete files only, and the newest
checkpoint is never behind metrics.json: a resumed run rebuilds
metrics.json from its checkpoint (`restore`). The end of the run adds the
plots and always rewrites report.html.
"""

from __future__ import annotations

from pathlib import Path

from consortia.common.atomic import FileAccess, write_json_atomic
from consortia.common.errors import FederationError
from consortia.server.outputs.checkpoint import (
    RoundCheckpoint,
    checkpoint_dir,
    checkpoint_files,
    write_checkpoint,
)
from consortia.server.outputs.manifest import Manifest
from consortia.server.outputs.metrics_file import METRICS_FILE, FinalMetrics, MetricsFile
from consortia.server.outputs.model_files import (
    file_sha256,
    model_file_bytes,
    model_path,
    write_model_file,
)
from consortia.server.outputs.plots import write_plots
from consortia.server.outputs.report import LabelCounts, RunReport
from consortia.server.rounds.run_log import RoundRecord

MANIFEST_FILE = "manifest.json"


class RunOutputs:
    """Writes one run's files under `root`."""

    def __init__(self, root: Path, label_counts: LabelCounts | None = None) -> None:
        """`label_counts`: a simulation's true label counts per node, for the report."""
        self.root = root
        self.model_dir = root / "model"
        self.plots_dir = root / "plots"
        self.metrics = MetricsFile()
        self.report = RunReport(root, label_counts)
        root.mkdir(parents=True, exist_ok=True)

    def write_manifest(self, manifest: Manifest) -> str:
        """Write manifest.json; return the sha256 of the file (checkpoints name it)."""
        path = self.root / MANIFEST_FILE
        write_json_atomic(path, manifest.model_dump(mode="json"), FileAccess.UMASK)
        self.report.set_manifest(manifest)
        return file_sha256(path)

    def add_round(self, record: RoundRecord, checkpoint: RoundCheckpoint, model: bytes) -> Path:
        """Checkpoint the round, write its model file (`model`: its bytes), append to metrics.json.

        Returns the model file's path.
        """
        write_checkpoint(self.root, checkpoint)
        path = write_model_file(self.model_dir, record.round, model)
        self.metrics.rounds.append(record)
        self._write_metrics()
        self.report.write_if_cheap(self.metrics)
        return path

    def restore(self, checkpoint: RoundCheckpoint) -> Path:
        """Make the folder what it was right after the checkpoint's round; return its model file.

        Files of later rounds (an interrupted round's leftovers, or rounds
        past an older checkpoint asked for) are removed, the round's model
        file and manifest.json are rewritten from the checkpoint if missing
        or different, and metrics.json is rebuilt from its records.
        """
        doc = checkpoint.doc
        for server_round, path in checkpoint_files(self.root):
            if server_round > doc.round:
                path.unlink()
        for folder in (checkpoint_dir(self.root), self.model_dir, self.root):
            for leftover in folder.glob(".*.tmp") if folder.is_dir() else []:
                leftover.unlink()  # a write that was killed before its rename
        for path in self.model_dir.glob("round-*.safetensors") if self.model_dir.is_dir() else []:
            digits = path.name.removeprefix("round-").removesuffix(".safetensors")
            if digits.isdigit() and int(digits) > doc.round:
                path.unlink()
        manifest = self.root / MANIFEST_FILE
        intact = manifest.is_file() and file_sha256(manifest) == doc.manifest_sha256
        self.report.set_manifest(doc.manifest)
        if not intact and self.write_manifest(doc.manifest) != doc.manifest_sha256:
            raise FederationError(
                f"{manifest}: rewritten from the checkpoint but its sha256 differs from "
                "the one recorded; the checkpoint's manifest is inconsistent"
            )
        model = model_path(self.model_dir, doc.round)
        if not model.is_file() or file_sha256(model) != doc.model_sha256:
            write_model_file(self.model_dir, doc.round, model_file_bytes(checkpoint.model))
        if file_sha256(model) != doc.model_sha256:
            raise FederationError(f"{model}: the checkpoint's model does not match its sha256")
        self.metrics = MetricsFile(rounds=list(doc.records))
        self._write_metrics()
        return model

    def finish(self, final: FinalMetrics, delta: float | None) -> None:
        self.metrics.final = final
        self._write_metrics()
        write_plots(self.plots_dir, self.metrics.rounds, delta)
        self.report.write(self.metrics)

    def _write_metrics(self) -> None:
        write_json_atomic(
            self.root / METRICS_FILE, self.metrics.model_dump(mode="json"), FileAccess.UMASK
        )


def rewrite_report(run_dir: Path, label_counts: LabelCounts | None = None) -> Path:
    """Render report.html again from the run folder's files (after an audit added to them)."""
    try:
        metrics = MetricsFile.model_validate_json((run_dir / METRICS_FILE).read_bytes())
        manifest = Manifest.model_validate_json((run_dir / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError) as exc:
        raise FederationError(f"{run_dir}: cannot re-render its report: {exc}") from None
    report = RunReport(run_dir, label_counts)
    report.set_manifest(manifest)
    return report.write(metrics)
