"""A deployed job trains a plugin's model: the example plugin on real SuperLink and SuperNodes.

`consortia coordinator start` (TLS, node authentication) and three
`consortia node start` nodes on 127.0.0.1 (tests/consortium.py), each with
its share of breast cancer. Two nodes' policies allow the example plugin's
`tabular_embeddings` and pin its distribution version and its architecture
hash; the third pins another version of the distribution and refuses with
`model-version-mismatch`, a reason naming the distribution, and spends
nothing. The job's file never names the distribution: the coordinator pins
the one it built the model from in the task it sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliRunner
from consortium import Consortium, cancer_sites, run_id_of, start_consortium
from federation import ledger_history

from consortia.common.config import ModelConfig
from consortia.common.models import architecture_hash, build_model
from consortia.common.protocol import RefusalCode

pytestmark = pytest.mark.slow

EXAMPLE = "consortia-example-models"
TRAINING = ("st-mary", "riverside")
OTHER_VERSION = "northgate"  # its policy pins version 0.0.9 of the plugin
MODEL = {"name": "tabular_embeddings", "hidden": [16]}


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, consortia_cli: CliRunner
) -> Iterator[tuple[Consortium, dict[str, Path]]]:
    consortium = Consortium(tmp_path_factory.mktemp("plugin-deployment"))
    reviewed = architecture_hash(build_model(ModelConfig.model_validate(MODEL), (30,), 2, 0))
    allowed = 'models = ["tabular_embeddings"]\n'
    policies = {
        name: f'{allowed}model_distributions = {{"{EXAMPLE}" = "0.1.0"}}\n'
        f'architectures = ["{reviewed}"]\n'
        for name in TRAINING
    }
    policies[OTHER_VERSION] = f'{allowed}model_distributions = {{"{EXAMPLE}" = "0.0.9"}}\n'
    node_tomls = cancer_sites(
        consortium, (*TRAINING, OTHER_VERSION), 1.0, cli=consortia_cli, policies=policies
    )
    try:
        start_consortium(consortium, node_tomls)
        yield consortium, node_tomls
    finally:
        consortium.stop()


def test_a_deployed_job_trains_the_plugin_model_where_installed_and_pinned(
    federation: tuple[Consortium, dict[str, Path]],
) -> None:
    fed, node_tomls = federation
    job = fed.root / "job.toml"
    job.write_text(
        'name = "plugin-model"\ndataset = "cancer"\nmin_nodes = 3\nseed = 5\nrounds = 2\n'
        '[model]\nname = "tabular_embeddings"\nhidden = [16]\n'
        "[training]\nbatch_size = 64\nlearning_rate = 1.0\n"
        "[privacy]\ntarget_epsilon = 0.8\ndelta = 1e-5\nmax_grad_norm = 1.0\n"
    )
    result = fed.submit(job)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = fed.state / "runs" / f"run-{run_id_of(result)}"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for record in metrics["rounds"]:
        assert sorted(record["participants"]) == sorted(TRAINING)
        refused = [f for f in record["failures"] if f["node"] == OTHER_VERSION]
        assert refused and {f["node"] for f in record["failures"]} == {OTHER_VERSION}
        for failure in refused:  # its training and its evaluation of the round
            assert failure["refusal"] == RefusalCode.MODEL_VERSION_MISMATCH
            assert f"pins {EXAMPLE} 0.0.9, but {EXAMPLE} 0.1.0 is installed" in failure["reason"]
    assert metrics["final"]["accuracy"] > 0.6
    epsilon = metrics["final"]["epsilon"]
    assert all(0 < epsilon[name] <= 0.8 for name in TRAINING)
    assert not epsilon.get(OTHER_VERSION)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    built = build_model(ModelConfig.model_validate(MODEL), (30,), 2, 0)
    assert manifest["model_architecture"] == architecture_hash(built)
    assert manifest["packages"][EXAMPLE] == "0.1.0"
    for name, node_toml in node_tomls.items():
        spent = ledger_history(node_toml, "cancer")
        assert len(spent) == (2 if name in TRAINING else 0)  # a refusal spends nothing
