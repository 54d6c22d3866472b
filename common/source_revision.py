"""Which source made this code: its git revision, from the checkout or recorded at build time.

Every run's manifest names the code that made its model. Code run from a git
checkout (or an editable install of one) asks git, live: it can change after
any build. `pip install .` copies the code into site-packages, where git
finds nothing (or an unrelated repository the environment sits in), so the
build records the revision in `REVISION_FILE` beside this module
(`build_revision.py` at the repository root, a setuptools build step that
loads this file by path: it may import nothing but the standard library).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REVISION_FILE = "source_revision.txt"
DIRTY_SUFFIX = "-dirty"
_REVISION = re.compile(r"[0-9a-f]{40}(-dirty)?")
_HERE = Path(__file__).resolve().parent


def source_revision() -> str | None:
    """`<commit>`, or `<commit>-dirty` when tracked files had changes; None if unknown."""
    return git_revision(_HERE.parent) or recorded_revision(_HERE / REVISION_FILE)


def git_revision(root: Path) -> str | None:
    """The revision of the git checkout whose top folder is `root`, else None.

    Only a checkout *rooted* at `root` counts: an installed copy of the code
    inside some other repository is not that repository's code.
    """
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        if top is None or Path(top).resolve() != root.resolve():
            return None
        commit = _git(root, "rev-parse", "HEAD")
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    if commit is None:
        return None
    return commit + (DIRTY_SUFFIX if changes else "")


def recorded_revision(path: Path) -> str | None:
    """The revision the build wrote to `path`; None without one (or with anything else there)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text if _REVISION.fullmatch(text) else None


def _git(folder: Path, *args: str) -> str | None:
    """git's stripped output, or None if it fails (not a checkout)."""
    result = subprocess.run(
        ["git", *args], cwd=folder, capture_output=True, text=True, timeout=5, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else None
