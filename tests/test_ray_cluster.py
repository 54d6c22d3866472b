"""`consortia simulate --ray-address`: the virtual nodes run on an existing Ray cluster.

A multi-machine cluster cannot be built on one test machine; what can be
tested here is the part consortia owns: the run joins the cluster it is
given (its ClientApp actors show up in that cluster's GCS) instead of
starting a Ray of its own, and a wrong address fails in seconds with one
clear message instead of Ray's minutes of retries.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliRunner, one_cli_error, ray_head


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A Ray head of this test's own, which reports the actor classes it ran."""
    with ray_head() as head:
        yield head


def test_a_simulation_runs_on_the_cluster_it_is_given(
    ray_cluster: tuple[str, subprocess.Popen[str]], tmp_path: Path, consortia_cli: CliRunner
) -> None:
    address, head = ray_cluster
    out = tmp_path / "run"
    result = consortia_cli(
        "simulate",
        "hospitals-breast-cancer",
        "--rounds",
        "1",
        "--ray-address",
        address,
        "--out",
        str(out),
        "--quiet",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 1
    stdout, _ = head.communicate(input="", timeout=60)  # closes stdin: the head reports
    assert "ClientAppActor" in json.loads(stdout.strip().splitlines()[-1])


def test_an_unreachable_cluster_fails_fast(tmp_path: Path, consortia_cli: CliRunner) -> None:
    args = ["simulate", "hospitals-breast-cancer", "--rounds", "1", "--out", str(tmp_path / "r")]
    refused = one_cli_error(consortia_cli(*args, "--ray-address", "127.0.0.1:1", cwd=tmp_path))
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in refused
    malformed = one_cli_error(consortia_cli(*args, "--ray-address", "headnode", cwd=tmp_path))
    assert "expected HOST:PORT" in malformed
    assert not (tmp_path / "r").exists()
