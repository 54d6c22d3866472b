"""`consortia models`: the checkpoints of runs, as a model registry.

consortia models list runs/                   every checkpoint of every run in runs/
consortia models list RUN_DIR                 every checkpoint of one run
consortia models show RUN_DIR [--round N]     one checkpoint in detail (default: the newest)
consortia models export RUN_DIR [--round N] --out model.pt
                                              a plain PyTorch state dict of that model
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

models_app = typer.Typer(
    help="Every round checkpoint of a run: list, inspect, export to PyTorch.",
    no_args_is_help=True,
)
console = Console()

RunArgument = Annotated[Path, typer.Argument(help="A run folder (with checkpoints/).")]
RoundOption = Annotated[
    int | None, typer.Option("--round", min=1, help="The round (default: the newest).")
]


def _short(digest: str) -> str:
    return digest[:12]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@models_app.command("list")
def list_models(
    path: Annotated[
        Path, typer.Argument(help="A run folder, or a folder of run folders (e.g. runs/).")
    ],
) -> None:
    """Every checkpoint: run, round, accuracy, loss, ε per node, manifest and model hashes."""
    from consortia.server.outputs.model_registry import list_checkpoints
    from consortia.server.rounds.run_log import NOT_PRIVATE

    listing = list_checkpoints(path)
    table = Table("run", "round", "accuracy", "loss", "max ε", "ε per node", "manifest", "model")
    for row in listing.checkpoints:
        if row.epsilon is None or row.epsilon_max is None:
            per_node, epsilon_max = "", NOT_PRIVATE  # no DP: no finite ε, and no 0 to misread
        else:
            per_node = ", ".join(f"{name}={eps:.3f}" for name, eps in sorted(row.epsilon.items()))
            epsilon_max = f"{row.epsilon_max:.4f}"
        table.add_row(
            escape(row.run),
            f"{row.round}/{row.rounds_planned}",
            _number(row.accuracy),
            _number(row.loss),
            epsilon_max,
            escape(per_node),
            _short(row.manifest_sha256),
            _short(row.model_sha256),
        )
    console.print(table)
    for problem in listing.problems:
        # soft_wrap: a path is never broken across lines (copy-paste, grep).
        console.print(f"[yellow]skipped:[/] {escape(problem)}", highlight=False, soft_wrap=True)


@models_app.command()
def show(run_dir: RunArgument, round_: RoundOption = None) -> None:
    """One checkpoint in detail: metrics, ε per node, hashes, arrays, strategy state."""
    from consortia.server.outputs.model_registry import load_checkpoint

    checkpoint = load_checkpoint(run_dir, round_)
    doc = checkpoint.doc
    record = doc.records[-1] if doc.records else None
    facts = Table("", "", show_header=False, box=None)
    facts.columns[1].overflow = "fold"  # full hashes, folded rather than cut
    facts.add_row("run", escape(run_dir.name))
    facts.add_row("round", f"{doc.round} of {doc.rounds_planned}")
    facts.add_row("job", escape(str(doc.manifest.config.get("name", ""))))
    if record is not None:
        facts.add_row("accuracy", _number(record.accuracy))
        facts.add_row("loss", _number(record.loss))
        facts.add_row("train loss", _number(record.train_loss))
        facts.add_row("participants", escape(", ".join(record.participants)))
        for failure in record.failures:
            facts.add_row("failure", escape(str(failure)))
    facts.add_row("model sha256", doc.model_sha256)
    facts.add_row("manifest sha256", doc.manifest_sha256)
    facts.add_row("config sha256", doc.config_sha256)
    facts.add_row("architecture", doc.manifest.model_architecture)
    facts.add_row("strategy state", ", ".join(sorted(checkpoint.strategy)) or "none")
    console.print(facts)
    if doc.manifest.private:
        privacy = Table("node", "ε so far", "releases", title="Privacy spent per node")
        for name, eps in sorted(doc.epsilon.items()):
            privacy.add_row(escape(name), f"{eps:.4f}", str(len(doc.releases.get(name, []))))
        console.print(privacy)
    else:
        console.print("privacy: not private (trained without differential privacy: no finite ε)")
    arrays = Table("array", "shape", "dtype", title="Model arrays")
    for key in doc.model_keys:
        array = checkpoint.model[key]
        arrays.add_row(escape(key), str(list(array.shape)), str(array.dtype))
    console.print(arrays)


@models_app.command()
def export(
    run_dir: RunArgument,
    out: Annotated[Path, typer.Option("--out", help="The .pt file to write.")],
    round_: RoundOption = None,
) -> None:
    """Write a checkpoint's model as a plain PyTorch state dict (for `load_state_dict`)."""
    from consortia.server.outputs.model_registry import export_state_dict

    exported = export_state_dict(run_dir, round_, out)
    console.print(f"wrote {escape(str(exported.path))} ({exported.tensors} tensors)")
    if not exported.architecture_matches:
        console.print(
            "[yellow]warning:[/] this consortia builds the model with another architecture "
            "hash than the run recorded (upgraded since?); the arrays fit it by name and shape"
        )
