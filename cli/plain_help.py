"""Help texts are plain text: escape them before typer renders them as Rich markup.

typer's rich help parses every help string as Rich markup, in which
`[simulation.data]` or `[statistics]` is a style tag: the words vanished
from `--help` ("overrides  path"). consortia writes no markup in help, so
every help text of the command tree is escaped once, where the tree is built
(`consortia.cli.main.command`), and no author has to remember it.
"""

from __future__ import annotations

import click
from rich.markup import escape
from typer.core import TyperArgument


def escape_help(command: click.Command) -> None:
    """Escape, in place, the help of `command`, its parameters and all its subcommands."""
    command.help = _escaped(command.help)
    command.short_help = _escaped(command.short_help)
    command.epilog = _escaped(command.epilog)
    for param in command.params:
        if isinstance(param, click.Option | TyperArgument):
            param.help = _escaped(param.help)
    if isinstance(command, click.Group):
        for subcommand in command.commands.values():
            escape_help(subcommand)


def _escaped(text: str | None) -> str | None:
    return None if text is None else escape(text)
