"""Start-up: what each process imports, and the sweep's one Ray (simulations/ray_head.py).

The sweep's runs on one Ray, with the results of separate runs, are tested
end to end in test_sweep.py (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from consortia.common.errors import FederationError
from consortia.simulations.ray_head import RayHead, ray_head

# Libraries that take seconds to import, none of which the CLI needs to
# answer `--help` or to report a bad scenario.
HEAVY = ("torch", "flwr", "ray", "opacus", "matplotlib", "pandas", "sklearn", "scipy")

# Runs the CLI in this process with the given argv, then prints which HEAVY
# modules it imported (the CLI exits through SystemExit: 0 for help, 2 for
# a user error).
_IMPORTS_AFTER = """
import json, sys
from consortia.cli.main import run
args, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = ["consortia", *args]
try:
    run()
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in heavy if m in sys.modules]}))
"""


def _imports_after(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER, json.dumps(args), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ((), 2),  # no_args_is_help
        (("--help",), 0),
        (("simulate", "--help"), 0),
        (("simulate", "no-such-scenario.toml"), 2),
        (("simulate", "hospitals-breast-cancer", "--quiet", "--json"), 2),
    ],
)
def test_help_and_config_errors_import_no_heavy_library(args: tuple[str, ...], code: int) -> None:
    """`consortia --help` and a typo answer in a blink: no torch, Flower, Ray, matplotlib."""
    result = _imports_after(*args)
    assert result == {"code": code, "heavy": []}


def test_a_virtual_node_imports_no_pandas() -> None:
    """Every node process of every run imports the ClientApp's modules; pandas is only
    for validating a node's table (onboarding), a second of start-up each otherwise."""
    probe = (
        "import sys, consortia.simulations.virtual_node, consortia.simulations.lab; "
        "print('pandas' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.strip() == "False"


def test_a_ray_that_does_not_start_is_one_error() -> None:
    with pytest.raises(FederationError) as caught, ray_head({"no_such_argument": 1}):
        pytest.fail("the head should not have started")
    assert "Ray did not start" in caught.value.message
    assert "no_such_argument" in caught.value.message


def test_a_run_after_the_head_exited_fails_with_one_message() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"], text=True)
    process.wait(timeout=60)
    with pytest.raises(FederationError, match=r"the Ray this sweep started .* exited"):
        RayHead("127.0.0.1:1", process).check_running()
