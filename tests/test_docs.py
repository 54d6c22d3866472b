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


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL)


def test_a_nodes_life_includes_its_key() -> None:
    """Without `keys init` (and enrollment) the coordinator refuses the node."""
    guide = (REPO_ROOT / "docs" / "node-operator.md").read_text()
    life = _bash_blocks(guide)[0]
    assert "consortia node keys init --node node.toml" in life
    assert life.index("keys init") < life.index("consortia node start")


def test_nodes_are_told_the_port_the_coordinator_listens_on() -> None:
    docs = REPO_ROOT / "docs"
    coordinator_ports = {
        int(port)
        for text in (
            (docs / "coordinator.md").read_text(),
            (docs / "examples" / "coordinator.toml").read_text(),
        )
        for port in re.findall(r"^port = (\d+)", text, flags=re.MULTILINE)
    }
    node_texts = [(docs / "node-operator.md").read_text()]
    node_texts += [path.read_text() for path in (docs / "examples").glob("*/node.toml")]
    node_ports = {
        int(port)
        for text in node_texts
        for port in re.findall(r'^address = "[^"]+:(\d+)"', text, flags=re.MULTILINE)
    }
    assert len(node_texts) == 3
    assert coordinator_ports == node_ports == {9093}
