"""Run only code the node's operator installed: no imports from the coordinator's app bundle.

`consortia node start` puts this folder first on the SuperNode's PYTHONPATH,
so every Python process of the node (SuperNode, SuperExec, each
flwr-clientapp) runs it at start-up. Flower installs the app bundle (FAB)
that the coordinator sends under $FLWR_HOME/apps and imports the ClientApp
named in the bundle's pyproject.toml with the bundle first on `sys.path`, so
a coordinator could otherwise ship Python code, or shadow consortia's own
modules, and have the node run it. The finder below refuses any module whose
file lies in that folder; consortia's ClientApp then loads from the installed
package, or the round fails with this message in the node log.

Only `CONSORTIA_REFUSE_CODE_UNDER` (set by `consortia node start`) activates
it; this file must stay import-light (it runs in every process).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from types import ModuleType

ROOT_VARIABLE = "CONSORTIA_REFUSE_CODE_UNDER"


class RefuseShippedCode(MetaPathFinder):
    """A meta-path finder that raises ImportError for modules found under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        spec = PathFinder.find_spec(fullname, path)
        if spec is None:
            return None  # not a file on sys.path: other finders decide
        locations = [spec.origin] if spec.origin else []
        locations += list(spec.submodule_search_locations or [])
        for location in locations:
            if self._inside(location):
                raise ImportError(
                    f"consortia node: refusing to import {fullname!r} from {location}: it was "
                    "shipped by the coordinator in the run's app bundle, and this node runs "
                    "only code its operator installed (pip install consortia)",
                    name=fullname,
                )
        return None  # allowed: let the regular finders load it

    def _inside(self, location: str) -> bool:
        try:
            return Path(location).resolve().is_relative_to(self.root)
        except (OSError, ValueError):
            return False


def install(root: Path) -> RefuseShippedCode:
    """Put the guard first on `sys.meta_path` (idempotent per root)."""
    for finder in sys.meta_path:
        if isinstance(finder, RefuseShippedCode) and finder.root == root.resolve():
            return finder
    guard = RefuseShippedCode(root)
    sys.meta_path.insert(0, guard)
    return guard


if os.environ.get(ROOT_VARIABLE):
    install(Path(os.environ[ROOT_VARIABLE]))
