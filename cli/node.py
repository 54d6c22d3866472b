"""`consortia node`: what a node's operator runs on-prem.

consortia node data add NAME --config dataset.toml --node node.toml
consortia node data check NAME --node node.toml
consortia node data list --node node.toml
consortia node ledger show --node node.toml
consortia node check-job job.toml --node node.toml
consortia node start --node node.toml
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.common.errors import ConfigError

node_app = typer.Typer(help="Run and administer an on-prem node.", no_args_is_help=True)
data_app = typer.Typer(help="Register and check the node's datasets.", no_args_is_help=True)
ledger_app = typer.Typer(help="The node's privacy ledger.", no_args_is_help=True)
node_app.add_typer(data_app, name="data")
node_app.add_typer(ledger_app, name="ledger")
console = Console()

NodeOption = Annotated[Path, typer.Option("--node", help="The node's node.toml.")]


def _node(path: Path):  # type: ignore[no-untyped-def]  # NodeConfig, imported lazily
    from consortia.client.node_config import load_node_config

    return load_node_config(path)


@data_app.command("add")
def data_add(
    name: Annotated[str, typer.Argument(help="Name to register the dataset under.")],
    config: Annotated[Path, typer.Option("--config", help="The dataset's dataset.toml.")],
    node: NodeOption,
    replace: Annotated[bool, typer.Option(help="Replace an existing registration.")] = False,
) -> None:
    """Validate a local dataset against its schema and register it (nothing leaves the node)."""
    from consortia.client.onboarding.registry import DatasetRegistry

    registry = DatasetRegistry(_node(node).state_dir)
    registration = registry.add(name, config, replace=replace)
    registry.quality(name).render(console)
    console.print(
        f"registered [bold]{registration.name}[/]: {registration.records} records "
        f"({registration.train_records} train / {registration.test_records} test), "
        f"{registration.num_classes} classes, fingerprint {registration.fingerprint[:16]}…"
    )


@data_app.command("check")
def data_check(
    name: Annotated[str, typer.Argument(help="A registered dataset.")], node: NodeOption
) -> None:
    """Re-validate a registered dataset and confirm its file is unchanged since registration."""
    from consortia.client.onboarding.registry import DatasetRegistry

    report = DatasetRegistry(_node(node).state_dir).check(name)
    report.render(console)
    console.print(f"[green]{name}: valid and unchanged since registration[/]")


@data_app.command("list")
def data_list(node: NodeOption) -> None:
    """The node's registered datasets."""
    from consortia.client.onboarding.registry import DatasetRegistry

    config = _node(node)
    table = Table("dataset", "records", "classes", "served", "fingerprint", "registered (UTC)")
    for item in DatasetRegistry(config.state_dir).list():
        table.add_row(
            item.name,
            str(item.records),
            str(item.num_classes),
            "yes" if item.name in config.serve else "no",
            item.fingerprint[:16] + "…",
            item.registered_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@ledger_app.command("show")
def ledger_show(node: NodeOption) -> None:
    """ε spent and left per dataset, composed over every release of every job."""
    from consortia.client.ledger import PrivacyLedger, ledger_path

    path = ledger_path(_node(node).state_dir)
    if not path.exists():
        console.print(f"no releases yet ({path} does not exist)")
        return
    table = Table("dataset", "ε spent", "ε budget", "ε left", "δ", "accountant", "releases")
    with PrivacyLedger(path) as ledger:
        for budget in ledger.datasets():
            table.add_row(
                budget.name,
                f"{budget.epsilon_spent:.4f}",
                f"{budget.epsilon_budget:g}",
                f"{budget.epsilon_remaining:.4f}",
                f"{budget.delta:g}",
                budget.accountant,
                str(budget.releases),
            )
    console.print(table)


@node_app.command("check-job")
def check_job(
    job: Annotated[Path, typer.Argument(help="The job's job.toml, as the coordinator runs it.")],
    node: NodeOption,
) -> None:
    """Would this node take part in JOB? Runs the node's policy checks; trains nothing.

    Prints the architecture hash of the job's model (pin it in the policy's
    `architectures`), the noise the node would calibrate, and the dataset's ε
    after one round and after every planned round. Exit code 1 if refused.
    """
    from consortia.client.admission import preview_admission

    preview = preview_admission(_load_job(job), _node(node))
    table = Table("", "", show_header=False, box=None)
    for label, value in preview.rows():
        table.add_row(label, value)
    console.print(table)
    if preview.refusal is not None:
        console.print(f"[red]refused[/] {escape(str(preview.refusal))}", highlight=False)
        raise typer.Exit(1)
    console.print("[green]this node would take part[/]")


def _guard_against_shipped_code() -> None:
    """Make every process of the SuperNode refuse imports from Flower's app-bundle folder."""
    from importlib import resources

    from flwr.supercore.utils import get_flwr_home

    guard = resources.files("consortia.client") / "codeguard"
    os.environ["CONSORTIA_REFUSE_CODE_UNDER"] = str(get_flwr_home() / "apps")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(guard), *filter(None, [os.environ.get("PYTHONPATH")])]
    )


def _load_job(path: Path):  # type: ignore[no-untyped-def]  # JobConfig, imported lazily
    from consortia.common.config_io import load_job

    return load_job(path).config


@node_app.command("start")
def start(node: NodeOption) -> None:
    """Start the Flower SuperNode serving consortia's installed ClientApp for this node."""
    from consortia.client.node_config import NODE_CONFIG_KEY

    config = _node(node)
    executable = shutil.which("flower-supernode")
    if executable is None:
        raise ConfigError("flower-supernode is not on PATH; install consortia in this environment")
    link = config.superlink
    args = [executable, "--superlink", link.address]
    if link.insecure:
        args.append("--insecure")
    elif link.root_certificates is not None:
        args += ["--root-certificates", str(link.root_certificates)]
    args += ["--node-config", f'{NODE_CONFIG_KEY}="{node.resolve()}"']
    args += ["--port", str(config.runtime_port)]
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Run only the code this machine installed: never `uv sync` a coordinator's app ...
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    # ... and never import Python files from the app bundle it sends (codeguard).
    _guard_against_shipped_code()
    console.print(f"node {config.name}: connecting to {link.address}", highlight=False)
    sys.stdout.flush()
    os.execv(executable, args)
