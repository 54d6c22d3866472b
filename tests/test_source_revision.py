"""Every install names the code that made a model: the git revision, live or recorded at build.

`pip install .` copied the code away from the checkout and the manifest said
`git_commit: null`. The build now records the revision; a checkout (or an
editable install) still asks git, live.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from consortia.common.source_revision import REVISION_FILE, git_revision, source_revision

_PIP = [sys.executable, "-m", "pip"]
_PRINT_REVISION = "from consortia.common.source_revision import source_revision as r; print(r())"


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@consortia.invalid", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _expected(folder: Path) -> str:
    """`git rev-parse HEAD`, with `-dirty` when tracked files have changes."""
    dirty = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return _git(folder, "rev-parse", "HEAD") + ("-dirty" if dirty else "")


def test_a_checkout_reports_its_live_revision() -> None:
    assert source_revision() == _expected(REPO_ROOT)


def test_code_inside_another_repository_is_not_that_repositorys(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("x")
    _git(tmp_path, "add", "f")
    _git(tmp_path, "commit", "-qm", "unrelated")
    (tmp_path / "consortia").mkdir()
    assert git_revision(tmp_path) == _expected(tmp_path)
    assert git_revision(tmp_path / "consortia") is None


def _snapshot(destination: Path) -> Path:
    """The working tree (tracked and new files, nothing ignored) as a fresh one-commit checkout."""
    listed = _git(REPO_ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    _git(destination, "init", "-q")
    _git(destination, "add", "-A")
    _git(destination, "commit", "-qm", "snapshot")
    return destination


def _wheel(source: Path, out: Path) -> Path:
    """`pip wheel` of `source` (a folder, built in-tree as `pip install .` does, or an sdist)."""
    built = subprocess.run(
        [*_PIP, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("consortia-*.whl")
    return wheel


def _recorded(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(f"consortia/common/{REVISION_FILE}").decode().strip()


@pytest.mark.slow
def test_a_built_wheel_records_the_revision_and_its_install_reports_it(tmp_path: Path) -> None:
    source = _snapshot(tmp_path / "src")
    clean = _wheel(source, tmp_path / "clean")
    assert _recorded(clean) == _git(source, "rev-parse", "HEAD")

    # `python -m build` builds the wheel from the sdist, which has no .git.
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta as b; b.build_sdist({str(tmp_path / 'sdist')!r})",
        ],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=600,
    )
    (sdist,) = (tmp_path / "sdist").glob("consortia-*.tar.gz")
    assert _recorded(_wheel(sdist, tmp_path / "from-sdist")) == _git(source, "rev-parse", "HEAD")

    with (source / "README.md").open("a") as readme:
        readme.write("\nan uncommitted change\n")
    dirty = _wheel(source, tmp_path / "dirty")
    assert _recorded(dirty) == _git(source, "rev-parse", "HEAD") + "-dirty"

    # Installed inside an unrelated repository: the build's revision, not that repository's.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _git(elsewhere, "init", "-q")
    subprocess.run(
        [*_PIP, "install", "-q", "--no-deps", "--target", str(elsewhere / "site"), str(clean)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    reported = subprocess.run(
        [sys.executable, "-c", _PRINT_REVISION],
        capture_output=True,
        text=True,
        check=True,
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(elsewhere / "site")},
        timeout=60,
    ).stdout.strip()
    assert reported == _git(source, "rev-parse", "HEAD")
