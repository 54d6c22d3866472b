"""The documentation says what ships: scenario tables, ports, the commands of a node's life."""

from __future__ import annotations

import re

import pytest
from conftest import REPO_ROOT

BUNDLED = sorted(path.stem for path in (REPO_ROOT / "simulations").glob("*.toml"))


def _scenario_table(markdown: str) -> list[str]:
    """The scenario names in the first column of the table whose header starts `| scenario |`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| scenario |"))
    names = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        names.extend(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


@pytest.mark.parametrize("document", ["README.md", "docs/simulation-lab.md"])
def test_every_bundled_scenario_is_in_the_scenario_table(document: str) -> None:
    assert BUNDLED, "no bundled scenarios found"
    table = _scenario_table((REPO_ROOT / document).read_text())
    assert sorted(table) == BUNDLED
