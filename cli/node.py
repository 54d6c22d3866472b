"""`consortia node`: what a node's operator runs on-prem.

consortia node data add NAME --config dataset.toml --node node.toml
consortia node data check NAME --node node.toml
consortia node data list --node node.toml
consortia node ledger show --node node.toml
consortia node check-job job.toml --node node.toml
consortia node models list --node node.toml [--dataset NAME]
consortia node keys init --node node.toml
consortia node keys show --node node.toml
consortia node doctor --node node.toml [--device auto|cuda|cpu]
consortia node start --node node.toml
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from consortia.common.errors import ConfigError

if TYPE_CHECKING:  # imported where used: `consortia --help` must not load them
    from consortia.client.node_config import NodeConfig
    from consortia.common.config import JobConfig
    from consortia.common.node_keys import NodePublicKey

node_app = typer.Typer(help="Run and administer an on-prem node.", no_args_is_help=True)
data_app = typer.Typer(help="Register and check the node's datasets.", no_args_is_help=True)
ledger_app = typer.Typer(help="The node's privacy ledger.", no_args_is_help=True)
keys_app = typer.Typer(
    help="The node's key pair, which authenticates it to the coordinator.", no_args_is_help=True
)
node_app.add_typer(data_app, name="data")
node_app.add_typer(ledger_app, name="ledger")
models_app = typer.Typer(
    help="The models this node can train: installed model plugins.", no_args_is_help=True
)
node_app.add_typer(keys_app, name="keys")
node_app.add_typer(models_app, name="models")
console = Console()

NodeOption = Annotated[Path, typer.Option("--node", help="The node's node.toml.")]


def _node(path: Path) -> NodeConfig:
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
    from consortia.client.node_audit import node_audit_log
    from consortia.client.onboarding.registry import DatasetRegistry

    node_config = _node(node)
    registry = DatasetRegistry(node_config.state_dir, audit=node_audit_log(node_config))
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
    statistics: Annotated[
        bool,
        typer.Option(
            "--statistics",
            help="Preview the job's [statistics] query (`job stats`) instead of training.",
        ),
    ] = False,
) -> None:
    """Would this node take part in JOB (or answer its statistics query)? Trains nothing.

    Prints the architecture hash of the job's model (pin it in the policy's
    `architectures`), the noise the node would calibrate, and the dataset's ε
    after one round and after every planned round. Exit code 1 if refused.
    """
    config, settings = _load_job(job), _node(node)  # before the imports: a typo fails fast
    from consortia.client.admission import preview_admission, preview_statistics
    from consortia.client.policy import Refusal

    if statistics:  # a statistics job (`consortia job stats`): no training
        if config.statistics is None:
            raise ConfigError(f"{job}: --statistics needs a [statistics] block in the job")
        answer = preview_statistics(config, settings)
        refusal = answer if isinstance(answer, Refusal) else answer.refusal
        if not isinstance(answer, Refusal):
            _print_rows(answer.rows())
        if refusal is not None:
            console.print(f"[red]refused[/] {escape(str(refusal))}", highlight=False)
            raise typer.Exit(1)
        console.print("[green]this node would answer the statistics query[/]")
        return
    preview = preview_admission(config, settings)
    _print_rows(preview.rows())
    if preview.refusal is not None:
        console.print(f"[red]refused[/] {escape(str(preview.refusal))}", highlight=False)
        raise typer.Exit(1)
    console.print("[green]this node would take part[/]")


@models_app.command("list")
def models_list(
    node: NodeOption,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="A registered dataset whose shape and classes the hashes are for (default: the "
            "first served one; with none, each model's example input).",
        ),
    ] = None,
) -> None:
    """Every installed model: distribution, version, architecture hash, and the policy's answer.

    A model is an entry point of consortia.models in an installed
    distribution (consortia's own logreg, mlp and cnn included). Its hash is
    for its default settings on the dataset's shape; a job's own settings
    give the hash `consortia node check-job` prints, the one to pin in the
    policy's `architectures`. `model_distributions` pins distributions and
    versions (docs/models.md).
    """
    from consortia.client.model_admission import node_models
    from consortia.client.onboarding.registry import DatasetRegistry
    from consortia.common.model_plugins import ModelContext

    config = _node(node)
    registry = DatasetRegistry(config.state_dir)
    registered = {r.name for r in registry.list()}
    name = dataset or next((n for n in config.serve if n in registered), None)
    context = None
    if name is None:
        console.print("no dataset served: architecture hashes for each model's example input")
    else:
        registration = registry.get(name)
        context = ModelContext(registration.feature_shape, registration.num_classes)
        console.print(
            f"architecture hashes with default settings for dataset {escape(repr(name))}: "
            f"features {registration.feature_shape}, {registration.num_classes} classes",
            highlight=False,
        )
    for row in node_models(config.policy, context):
        installed = row.installed
        built = row.architecture if row.problem is None else f"not buildable [{row.problem.code}]"
        answer = "accepted" if row.refusal is None else f"refused [{row.refusal.code}]"
        # One line per model, never wrapped: the full hash is what goes into the policy.
        console.print(
            escape(f"{installed.name}  {installed.distribution} {installed.version}  {built}  ")
            + escape(answer),
            highlight=False,
            soft_wrap=True,
        )
        for refusal in (row.problem, row.refusal):
            if refusal is not None:
                console.print(f"    {escape(refusal.reason)}", highlight=False, soft_wrap=True)


def _print_rows(rows: list[tuple[str, str]]) -> None:
    table = Table("", "", show_header=False, box=None)
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)


@node_app.command("audit")
def audit(
    model: Annotated[
        Path, typer.Argument(help="The global model: a run's model/round-NNN.safetensors.")
    ],
    job: Annotated[Path, typer.Option("--job", help="The job file the model was trained with.")],
    node: NodeOption,
    shadows: Annotated[
        int,
        typer.Option("--shadows", min=2, help="Shadow models for the likelihood-ratio attack."),
    ] = 8,
) -> None:
    """Membership-inference attacks on a global model with this node's records; nothing leaves.

    Members: the job dataset's train split; non-members: its test split.
    The ε the attacks prove stands beside the dataset's ε in the ledger.
    Writes <state_dir>/privacy-audits/ and an audit-log entry.
    """
    from consortia.cli.audit import print_audit
    from consortia.client.node_privacy_audit import audit_on_node

    result, path = audit_on_node(_node(node), _load_job(job), model, shadows)
    print_audit(console, result.audit, f"{result.node} / {result.dataset}: {result.audit.run}")
    members = result.audit.attacks[0].members
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    console.print(
        f"claimed ε: the dataset's in this node's ledger (every release ever made from it); "
        f"{members} members (train split) vs {members} non-members (test split); "
        f"written to {escape(str(path))}",
        soft_wrap=True,
    )


@keys_app.command("init")
def keys_init(
    node: NodeOption,
    force: Annotated[
        bool, typer.Option(help="Replace an existing key; the coordinator must enroll the new one.")
    ] = False,
) -> None:
    """Create the node's key pair; print the public key to send to the coordinator.

    The private key (`[superlink] auth_private_key`, default
    <state_dir>/keys/node.key, mode 0600) never leaves this machine.
    """
    from consortia.common.node_keys import write_node_keys

    config = _node(node)
    private_key = _auth_private_key(config)
    keys = write_node_keys(private_key, force, comment=f"consortia-node-{config.name}")
    console.print(f"wrote {escape(str(keys.private_key))} (private key, 0600: never share it)")
    console.print(f"wrote {escape(str(keys.public_key))} (public key)")
    _print_public_key(keys.public)
    console.print(
        "Send the public key line to the coordinator and read them the fingerprint over "
        "the phone (or another channel): they must see the same one before enrolling it."
    )


@keys_app.command("show")
def keys_show(node: NodeOption) -> None:
    """Print the node's public key and its fingerprint (derived from the private key)."""
    from consortia.common.node_keys import (
        load_node_private_key,
        loose_mode,
        parse_node_public_key,
        public_key_path,
    )

    config = _node(node)
    private_key = _auth_private_key(config)
    public = load_node_private_key(private_key)
    pub_path = public_key_path(private_key)
    if pub_path.is_file():
        stored = parse_node_public_key(pub_path.read_text(encoding="utf-8"), str(pub_path))
        if stored.fingerprint != public.fingerprint:
            raise ConfigError(
                f"{pub_path}: does not match the private key {private_key} (fingerprints "
                f"{stored.fingerprint} and {public.fingerprint}); the private key is what "
                f"the node uses: delete {pub_path.name} and run `consortia node keys show` again"
            )
        public = stored  # with its comment
    console.print(f"private key: {escape(str(private_key))}")
    _print_public_key(public)
    mode = loose_mode(private_key)
    if mode is not None:
        console.print(
            f"[yellow]warning:[/] {escape(str(private_key))} is readable by other users "
            f"(mode {mode:04o}); chmod 600 it"
        )


def _auth_private_key(config: NodeConfig) -> Path:
    from consortia.client.node_config import DEFAULT_AUTH_PRIVATE_KEY

    key = config.superlink.auth_private_key
    return key if key is not None else config.state_dir / DEFAULT_AUTH_PRIVATE_KEY


def _print_public_key(public: NodePublicKey) -> None:
    console.print("public key (send this line to the coordinator):")
    typer.echo(public.line)  # plain: one unwrapped line to copy whole, no markup or emoji codes
    typer.echo(f"fingerprint: {public.fingerprint}")


def _checked_auth_key(config: NodeConfig, node: Path) -> Path:
    """The node's private key, checked the way flower-supernode will read it."""
    from consortia.common.node_keys import load_node_private_key, loose_mode

    key = _auth_private_key(config)
    if not key.exists():
        raise ConfigError(
            f"{key}: no node key. The coordinator admits only nodes whose public key it "
            f"enrolled: run `consortia node keys init --node {node}`, send the public key "
            "it prints to the coordinator and compare the fingerprint with them"
        )
    load_node_private_key(key)
    mode = loose_mode(key)
    if mode is not None:
        console.print(
            f"[yellow]warning:[/] {escape(str(key))} is readable by other users "
            f"(mode {mode:04o}); chmod 600 it"
        )
    return key


def _load_job(path: Path) -> JobConfig:
    """A job as the node reads it: a model not installed here is a refusal, not an error."""
    from consortia.common.config_io import load_job
    from consortia.common.model_plugins import deferred_lookup

    return load_job(path, deferred_lookup()).config


@node_app.command("doctor")
def doctor(
    node: NodeOption,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="The training device the node's jobs use: auto (the default of a job), cuda "
            "(a GPU is required) or cpu (the GPU check is skipped).",
        ),
    ] = "auto",
) -> None:
    """Check what the node needs before its first job; one line per finding, with the fix.

    Certificates (trust chain, expiry within 30 days), the node key and its
    enrollment (asks the coordinator), the clock, free disk, the ledger,
    every registered dataset (readable, unchanged), the GPU, and the
    consortia, Flower and torch versions against the coordinator's.
    Exit code 1 if any problem was found.
    """
    from consortia.client.node_doctor import Device, Verdict, diagnose

    try:
        wanted = Device(device)
    except ValueError:
        raise ConfigError(f"--device {device!r}: use auto, cuda or cpu") from None
    config = _node(node)
    findings = diagnose(config, node, wanted)
    styles = {Verdict.PROBLEM: "red", Verdict.WARNING: "yellow", Verdict.OK: "green"}
    for finding in findings:
        style = styles.get(finding.verdict, "dim")
        label = escape(f"{finding.verdict:<8}")
        console.print(
            f"[{style}]{label}[/]{escape(finding.check)}: {escape(finding.text)}",
            soft_wrap=True,
            highlight=False,
        )
    problems = sum(f.verdict == Verdict.PROBLEM for f in findings)
    warnings = sum(f.verdict == Verdict.WARNING for f in findings)
    summary = f"node {config.name}: {problems} problem(s), {warnings} warning(s)"
    console.print(escape(summary), highlight=False)
    if problems:
        raise typer.Exit(1)


@node_app.command("start")
def start(
    node: NodeOption,
    stock: Annotated[
        bool,
        typer.Option(
            "--stock",
            help="Benchmarking and debugging only: run Flower's own node path (a SuperExec "
            "starting one flwr-clientapp process per message, 3 s idle sleeps) instead of "
            "consortia's long-lived ClientApp worker.",
        ),
    ] = False,
) -> None:
    """Start the node: Flower's SuperNode with consortia's ClientApp worker beside it."""
    from consortia.client.supernode_service import node_commands, supervise
    from consortia.common.ports import check_port_free

    config = _node(node)
    link = config.superlink
    key = None if link.insecure else _checked_auth_key(config, node)
    commands = node_commands(config, node, key, stock=stock)
    # A SuperNode that cannot bind its runtime API would only say so in its own output.
    check_port_free("127.0.0.1", config.runtime_port, f"node {config.name} (runtime_port)")
    console.print(f"node {config.name}: connecting to {link.address}", highlight=False)
    if config.metrics is not None:
        url = config.metrics.url
        console.print(f"node {config.name}: Prometheus metrics at {url}", highlight=False)
    sys.stdout.flush()
    # Runs only installed code (codeguard, no `uv sync`) and audits the connection.
    raise typer.Exit(supervise(config, commands))
