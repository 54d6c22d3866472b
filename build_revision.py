"""setuptools build steps: record the source's git revision in what is built.

pyproject.toml's `[tool.setuptools.cmdclass]` runs these instead of
setuptools' own `build_py` and `sdist`. A build writes
`consortia/common/source_revision.txt` into the build (never into the
source tree), so a wheel or a `pip install .` names the code that made
every model (manifest.json's `git_commit`) with no git or network at run
time. An sdist carries the file in its `common/` (it has no `.git`), and a
build from it copies the revision on. Editable installs skip it: they run
the checkout itself, whose revision `consortia.common.source_revision` asks
git for, live.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent


def _source_revision() -> ModuleType:
    """common/source_revision.py, loaded by path: consortia is not installed yet."""
    path = ROOT / "common" / "source_revision.py"
    spec = importlib.util.spec_from_file_location("_consortia_source_revision", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_revision(common: Path) -> None:
    """Write the source's revision into the `common` package folder of a build or sdist.

    From a git checkout: git's answer. From an unpacked sdist: the revision
    its own build recorded. Neither: no file (the revision is unknown).
    """
    revision = _source_revision()
    target = common / revision.REVISION_FILE
    commit = revision.git_revision(ROOT) or revision.recorded_revision(
        ROOT / "common" / revision.REVISION_FILE
    )
    if commit is None:
        target.unlink(missing_ok=True)
        return
    target.write_text(commit + "\n", encoding="utf-8")


class BuildPyWithRevision(build_py):
    """setuptools' build_py, plus the revision file of a non-editable build."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            _record_revision(Path(self.build_lib) / "consortia" / "common")


class SdistWithRevision(sdist):
    """setuptools' sdist, plus the revision file (an sdist has no `.git` to ask)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        _record_revision(Path(base_dir) / "common")
