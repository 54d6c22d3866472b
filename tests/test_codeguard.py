"""A node refuses to import code from the coordinator's app bundle (client/codeguard).

Each test starts a fresh Python process with the environment `consortia node
start` gives the SuperNode, and loads the ClientApp through Flower's own
loader (`load_app`, which puts the bundle first on sys.path), as
flwr-clientapp does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

LOAD = (
    "import sys\n"
    "from flwr.supercore.object_ref import load_app\n"
    "app = load_app(sys.argv[1], RuntimeError, sys.argv[2])\n"
    "print(type(app).__name__, sys.modules[sys.argv[1].split(':')[0]].__file__)\n"
)


def _bundle(apps: Path, files: dict[str, str]) -> Path:
    bundle = apps / "consortia.consortia.0.1.0.abcdef"
    for name, text in files.items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_text(text)
    return bundle


def _load(reference: str, bundle: Path, apps: Path) -> subprocess.CompletedProcess[str]:
    guard = resources.files("consortia.client") / "codeguard"
    env = {**os.environ, "PYTHONPATH": str(guard), "CONSORTIA_REFUSE_CODE_UNDER": str(apps)}
    return subprocess.run(
        [sys.executable, "-c", LOAD, reference, str(bundle)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    return tmp_path / "flwr-home" / "apps"


def test_code_shipped_in_the_bundle_is_never_run(apps: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bundle = _bundle(apps, {"evil.py": f"open({str(marker)!r}, 'w').write('x')\napp = None\n"})
    result = _load("evil:app", bundle, apps)
    assert result.returncode != 0
    assert "refusing to import 'evil'" in result.stderr
    assert not marker.exists()


def test_bundle_cannot_shadow_consortia(apps: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = f"open({str(marker)!r}, 'w').write('x')\n"
    bundle = _bundle(apps, {"consortia/__init__.py": evil, "consortia/client/app.py": evil})
    result = _load("consortia.client.app:app", bundle, apps)
    assert result.returncode != 0 and "refusing to import 'consortia'" in result.stderr
    assert not marker.exists()


def test_installed_client_app_loads_beside_a_bundle_of_the_repository(apps: Path) -> None:
    # What `flwr run .` ships from this repository: folders that are not `consortia`.
    bundle = _bundle(apps, {"pyproject.toml": "", "client/app.py": "raise SystemExit(3)\n"})
    result = _load("consortia.client.app:app", bundle, apps)
    assert result.returncode == 0, result.stderr[-2000:]
    kind, origin = result.stdout.split()
    assert kind == "ClientApp"
    assert not Path(origin).resolve().is_relative_to(apps.resolve())


def test_guard_is_inactive_without_its_variable(apps: Path, tmp_path: Path) -> None:
    bundle = _bundle(apps, {"harmless.py": "app = 42\n"})
    guard = resources.files("consortia.client") / "codeguard"
    env = {k: v for k, v in os.environ.items() if k != "CONSORTIA_REFUSE_CODE_UNDER"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD, "harmless:app", str(bundle)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(guard)},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("int")
