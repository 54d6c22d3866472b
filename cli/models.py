"""`consortia models`: installed model plugins, and the checkpoints of runs.

consortia models check NAME [--settings JSON] [--input-shape 1,28,28] [--classes 10]
                                              build an installed model, and check that
                                              Opacus can train it with DP-SGD
consortia models list runs/                   every checkpoint of every run in runs/
consortia models list RUN_DIR                 every checkpoint of one run
consortia models show RUN_DIR [--round N]     one checkpoint in detail (default: the newest)
consortia models export RUN_DIR [--round N] --out model.pt
                                              a plain PyTorch state dict of that model
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.common.errors import ConfigError

models_app = typer.Typer(
    help="Check an installed model plugin; list, inspect and export the checkpoints of runs.",
    no_args_is_help=True,
)
console = Console()

RunArgument = Annotated[Path, typer.Argument(help="A run folder (with checkpoints/).")]
RoundOption = Annotated[
    int | None, typer.Option("--round", min=1, help="The round (default: the newest).")
]


@models_app.command("check")
def check(
    name: Annotated[
        str, typer.Argument(help="An installed model: an entry point of consortia.models.")
    ],
    settings: Annotated[
        str | None,
        typer.Option(
            "--settings",
            help="The model's settings as a JSON object, e.g. '{\"width\": 32}' (the keys a "
            "job gives beside the model's name); default: the model's own defaults.",
        ),
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape",
            help="One record's features, e.g. 1,28,28 (images) or 30 (a table); default: the "
            "example input the plugin declares.",
        ),
    ] = None,
    classes: Annotated[
        int | None, typer.Option("--classes", min=2, help="Label classes (default: the example's).")
    ] = None,
    distribution: Annotated[
        str | None,
        typer.Option("--distribution", help="The distribution it must come from (if several)."),
    ] = None,
) -> None:
    """Build an installed model and check that Opacus can train it with DP-SGD.

    Prints where it comes from (distribution, version, entry point), its
    settings with their defaults, its size and its architecture hash. A model
    Opacus cannot train (BatchNorm, unsupported layers) is refused with the
    layers named and what opacus.validators.ModuleValidator.fix would change
    them to, exit code 2; nodes refuse it the same way.
    """
    from consortia.common.model_plugins import ModelContext, find_model, settings_dump

    installed = find_model(name, distribution)
    raw = _settings_object(settings)
    plugin = installed.plugin()
    example = plugin.example
    context = ModelContext(
        _shape(input_shape) if input_shape is not None else example.feature_shape,
        classes if classes is not None else example.num_classes,
    )
    resolved = settings_dump(installed, raw)
    from consortia.common.models import architecture_hash, build_installed

    model = build_installed(installed, raw, context, seed=0)
    facts = Table("", "", show_header=False, box=None)
    facts.columns[1].overflow = "fold"  # full hashes, folded rather than cut
    facts.add_row("model", escape(installed.name))
    facts.add_row("distribution", escape(f"{installed.distribution} {installed.version}"))
    facts.add_row("entry point", escape(installed.target))
    if plugin.summary:
        facts.add_row("summary", escape(plugin.summary))
    facts.add_row("settings", escape(json.dumps(resolved, default=list)))
    facts.add_row("input", f"features {context.feature_shape}, {context.num_classes} classes")
    facts.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    facts.add_row("architecture", architecture_hash(model))
    console.print(facts)
    console.print("[green]Opacus can train it with DP-SGD[/]")


def _settings_object(text: str | None) -> dict[str, object]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--settings: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(
            f"--settings: expected a JSON object such as '{{\"hidden\": [32]}}', got {text!r}"
        )
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise ConfigError(
            f"--input-shape: expected positive sizes separated by commas (1,28,28), got {text!r}"
        )
    return shape


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
