"""A real consortium: `consortia coordinator start` (TLS, node authentication) and nodes.

Everything as operators would do it: `consortia provision` certificates,
node key pairs made on the nodes, `consortia coordinator nodes add` with the
public key only, `consortia node start`, `consortia job submit`. Processes
are ended by `stop()` (inherited from `Federation`).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from conftest import CliRunner
from federation import Federation, add_site, free_port
from sklearn.datasets import load_breast_cancer

from consortia.common.node_keys import NodeKeys, init_node_keys
from consortia.common.pki import create_ca, issue_server_certificate

CLI = [sys.executable, "-m", "consortia.cli.main"]


class Consortium(Federation):
    """A coordinator service with its own CA, and helpers to enroll and run.

    With `metrics`, the coordinator serves its Prometheus endpoint at
    `metrics_port` (127.0.0.1).
    """

    def __init__(self, root: Path, *, metrics: bool = False) -> None:
        super().__init__(root)
        self.metrics_port = free_port() if metrics else None
        pki = root / "pki"
        create_ca(pki / "ca")
        issue_server_certificate(pki / "ca", pki / "coordinator", ["localhost"], ["127.0.0.1"])
        self.ca = pki / "coordinator" / "ca.crt"
        self.config = root / "coordinator.toml"
        self.config.write_text(
            f'name = "test-coordinator"\nstate_dir = "coordinator-state"\n'
            f'host = "127.0.0.1"\nport = {self.port}\n\n'
            '[tls]\ncertfile = "pki/coordinator/server.crt"\n'
            'keyfile = "pki/coordinator/server.key"\nca_certfile = "pki/coordinator/ca.crt"\n'
            + ("" if self.metrics_port is None else f"\n[metrics]\nport = {self.metrics_port}\n")
        )
        self.state = root / "coordinator-state"

    @property
    def audit_log(self) -> Path:
        return self.state / "audit.jsonl"

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        """`consortia coordinator start`, waiting until it says it listens."""
        log = self.root / "coord"
        before = log.read_text(errors="replace").count("listening on") if log.exists() else 0
        process = self.spawn([*CLI, "coordinator", "start", "--config", str(self.config)], "coord")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if log.read_text(errors="replace").count("listening on") > before:
                return process
            if process.poll() is not None:
                raise AssertionError(log.read_text(errors="replace"))
            time.sleep(0.3)
        raise AssertionError("the coordinator did not come up:\n" + log.read_text())

    def consortia(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            capture_output=True,
            text=True,
            env={**self.env, "COLUMNS": "200"},
            timeout=timeout,
            check=False,
            cwd=self.root,
        )

    def enroll(self, name: str, node_toml: Path) -> NodeKeys:
        """The node makes its key pair; the coordinator enrolls the public key only."""
        keys = init_node_keys(node_toml.parent / "state" / "keys")
        added = self.consortia(
            "coordinator", "nodes", "add", name, str(keys.public_key), "--config", str(self.config)
        )
        assert added.returncode == 0, added.stdout + added.stderr
        return keys

    def submit(self, job: Path) -> subprocess.CompletedProcess[str]:
        """`consortia job submit --wait` over TLS, trusting the consortium CA."""
        return self.consortia(
            "job",
            "submit",
            str(job),
            "--coordinator",
            f"127.0.0.1:{self.port}",
            "--root-certificates",
            str(self.ca),
            "--wait",
        )

    def audit_events(self, path: Path | None = None) -> list[dict[str, object]]:
        import json

        lines = (path or self.audit_log).read_text().splitlines()
        return [json.loads(line) for line in lines]


def cancer_sites(
    fed: Consortium,
    names: tuple[str, ...],
    budget: float,
    *,
    seed: int = 0,
    cli: CliRunner | None = None,
    policies: Mapping[str, str] | None = None,
    metrics: bool = False,
) -> dict[str, Path]:
    """One hospital per name, each with its share of breast cancer as a CSV and its node.toml.

    The nodes speak TLS to `fed`'s coordinator and trust its CA; nothing is
    enrolled or started yet. `policies` adds `[policy]` lines per node name;
    with `metrics` each node serves its Prometheus endpoint on a free port.
    """
    data = load_breast_cancer()
    columns = [f"f{i:02d}" for i in range(data.data.shape[1])]
    order = np.random.default_rng(seed).permutation(len(data.target))
    parts = np.array_split(order, len(names))
    return {
        name: add_site(
            fed.root / name,
            name,
            data.data[part],
            data.target[part],
            columns,
            superlink_port=fed.port,
            budget=budget,
            cli=cli,
            root_certificates=fed.ca,
            policy=(policies or {}).get(name, ""),
            metrics_port=free_port() if metrics else None,
        )
        for name, part in zip(names, parts, strict=True)
    }


def start_consortium(fed: Consortium, node_tomls: dict[str, Path]) -> None:
    """Start the coordinator, enroll every node by its public key, start the nodes."""
    fed.start_coordinator()
    for name, node_toml in node_tomls.items():
        fed.enroll(name, node_toml)
        fed.start_node(node_toml, name)


def run_id_of(submitted: subprocess.CompletedProcess[str]) -> int:
    """The run id `consortia job submit` printed."""
    for line in submitted.stdout.splitlines():
        if line.startswith("submitted job") and " as run " in line:
            return int(line.rsplit(" as run ", 1)[1].split()[0])
    raise AssertionError(submitted.stdout + submitted.stderr)
