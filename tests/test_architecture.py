"""The package map of docs/architecture.md, enforced: who may import whom, and no cycles.

Read from the source (every `import` statement, lazy and TYPE_CHECKING ones
included), not from what a run happens to load, so that an import tucked into
a function body counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO_ROOT

# Top-level folder -> the consortia package it installs as (pyproject's package-dir).
FOLDERS = {
    "common": "consortia.common",
    "client": "consortia.client",
    "server": "consortia.server",
    "simulations": "consortia.simulations",
    "cli": "consortia.cli",
}

# The import rule: what each package may import of ours (itself always).
ALLOWED = {
    "consortia.common": set(),
    "consortia.client": {"consortia.common"},
    "consortia.server": {"consortia.common"},
    "consortia.simulations": {"consortia.common", "consortia.client", "consortia.server"},
    "consortia.cli": set(FOLDERS.values()),
}


def _modules() -> dict[str, Path]:
    """Every module of ours by its installed name."""
    modules: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _imported(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(dotted name, line) of everything `path` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            yield base, node.lineno
            for alias in node.names:  # `from pkg import module`
                yield f"{base}.{alias.name}", node.lineno


def _edges() -> dict[str, dict[str, int]]:
    """module -> {module of ours it imports: line}."""
    modules = _modules()
    edges: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        targets = edges.setdefault(name, {})
        for target, line in _imported(name, path):
            if target in modules and target != name:
                targets.setdefault(target, line)
    return edges


def _package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_modules_are_found() -> None:
    """The checks below can only fail if they see the code: guard against an empty walk."""
    edges = _edges()
    assert len(edges) > 100
    assert "consortia.client.app" in edges["consortia.simulations.virtual_node"]


def test_every_import_follows_the_package_rule() -> None:
    modules = _modules()
    broken = [
        f"{modules[source].relative_to(REPO_ROOT)}:{line} imports {target}"
        for source, targets in _edges().items()
        for target, line in targets.items()
        if _package_of(target) != _package_of(source)
        and _package_of(target) not in ALLOWED[_package_of(source)]
    ]
    assert not broken, "imports against docs/architecture.md's rule:\n" + "\n".join(broken)


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_lazy_imports_included() -> None:
    cycles = _cycles(_edges())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail() -> None:
    edges = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_every_package_folder_is_installed() -> None:
    """A sub-package missing from pyproject's list would be absent from a non-editable install."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = config["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {
        ".".join([package, *init.parent.relative_to(REPO_ROOT / folder).parts])
        for folder, package in FOLDERS.items()
        for init in (REPO_ROOT / folder).rglob("__init__.py")
    }
    assert folders == listed
    assert all(name.startswith("consortia.") for name in listed)  # no top-level `server` etc.
    for folder, package in FOLDERS.items():
        assert setuptools["package-dir"][package] == folder
