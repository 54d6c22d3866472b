"""Every command's `--help` shows its help text whole: `[simulation.data]` is a name, not markup.

typer renders help as Rich markup, where a bracketed word is a style tag
and vanished ("overrides  path"). The test walks the whole command tree as
the source defines it and runs each command's `--help` the way a user does.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import click
import pytest
import typer
from typer.core import TyperArgument

from consortia.cli import main

# A config table or key in brackets: [statistics], [simulation.data], [[columns]].
_BRACKETED = re.compile(r"\[([a-z][a-z0-9_.-]*)\]")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, subcommand in command.commands.items():
            yield from _commands(subcommand, (*path, name))


def _source_help(command: click.Command) -> list[str]:
    texts = [command.help or "", command.epilog or ""]
    for param in command.params:
        if isinstance(param, click.Option | TyperArgument):
            texts.append(param.help or "")
    return texts


def _bracketed_names(command: click.Command) -> set[str]:
    return {f"[{name}]" for text in _source_help(command) for name in _BRACKETED.findall(text)}


# The tree as the source defines it (typer's own build, no escaping applied).
_TREE = list(_commands(typer.main.get_command(main.app)))


def test_the_walk_covers_the_command_tree() -> None:
    paths = {" ".join(path) for path, _ in _TREE}
    assert {"simulate", "node start", "coordinator nodes add", "job submit"} <= paths
    simulate = dict(_TREE)[("simulate",)]
    assert {"[simulation.data]", "[statistics]"} <= _bracketed_names(simulate)


@pytest.mark.parametrize(
    ("path", "names"),
    [(path, sorted(_bracketed_names(command))) for path, command in _TREE],
    ids=[" ".join(path) or "consortia" for path, _ in _TREE],
)
def test_help_shows_every_bracketed_name(
    path: tuple[str, ...],
    names: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one line per option: no name broken by wrapping
    monkeypatch.setattr(sys, "argv", ["consortia", *path, "--help"])
    with pytest.raises(SystemExit) as exited:
        main.run()
    assert exited.value.code == 0
    shown = _ANSI.sub("", capsys.readouterr().out)
    assert "Usage:" in shown
    missing = [name for name in names if name not in shown]
    assert not missing, f"`consortia {' '.join(path)} --help` lost {missing}:\n{shown}"
