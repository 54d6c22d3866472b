"""Inputs a person can get wrong: refused with one message and an exit code, nothing written.

Non-finite and absurd privacy settings (job, scenario, node policy) are
refused at validation, before an accountant sees them; `node check-job`
writes no ledger, whatever it decides; a relative CA path, an empty scenario
or job file, a data file that is not the schema's table are one message, and
a refused data file's content is never echoed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import CliRunner, one_cli_error
from federation import add_site, write_job
from sklearn.datasets import load_breast_cancer

from consortia.client.ledger import ledger_path
from consortia.client.node_config import NodeConfig
from consortia.common.config import (
    MAX_DELTA,
    MAX_EPSILON,
    MAX_NOISE_MULTIPLIER,
    MIN_DELTA,
    ScenarioConfig,
)
from consortia.common.config_io import load_job_text, load_scenario, validate_model
from consortia.common.errors import ConfigError

# ------------------------------------------------------------------ privacy settings

# (TOML of the job, the key the message must name, what it must say)
BAD_PRIVACY = {
    "ε 1e300": ("[privacy]\ntarget_epsilon = 1e300\n", "privacy.target_epsilon", "≤"),
    "ε inf": ("[privacy]\ntarget_epsilon = inf\n", "privacy.target_epsilon", "finite"),
    "ε nan": ("[privacy]\ntarget_epsilon = nan\n", "privacy.target_epsilon", "finite"),
    "ε -inf": ("[privacy]\ntarget_epsilon = -inf\n", "privacy.target_epsilon", "finite"),
    "σ inf": ("[privacy]\nnoise_multiplier = inf\n", "privacy.noise_multiplier", "finite"),
    "σ 1e6": ("[privacy]\nnoise_multiplier = 1e6\n", "privacy.noise_multiplier", "≤"),
    "δ 0.5": ("[privacy]\ntarget_epsilon = 1.0\ndelta = 0.5\n", "privacy.delta", "≤"),
    "δ 1e-300": ("[privacy]\ntarget_epsilon = 1.0\ndelta = 1e-300\n", "privacy.delta", "≥"),
    "δ nan": ("[privacy]\ntarget_epsilon = 1.0\ndelta = nan\n", "privacy.delta", "finite"),
    "clip inf": (
        "[privacy]\ntarget_epsilon = 1.0\nmax_grad_norm = inf\n",
        "privacy.max_grad_norm",
        "finite",
    ),
    "histogram σ inf": (
        "[label_histogram]\nnoise_multiplier = inf\n",
        "label_histogram.noise_multiplier",
        "finite",
    ),
    "statistics ε 1e9": (
        "[statistics]\ntarget_epsilon = 1e9\n",
        "statistics.target_epsilon",
        "≤",
    ),
    "statistics σ nan": (
        "[statistics]\nnoise_multiplier = nan\n",
        "statistics.noise_multiplier",
        "finite",
    ),
    "timeout inf": ("round_timeout_s = inf\n", "round_timeout_s", "finite"),
}
_SAYS = {
    "finite": "Input should be a finite number",
    "≤": "Input should be less than or equal to",
    "≥": "Input should be greater than or equal to",
}


@pytest.mark.parametrize("case", sorted(BAD_PRIVACY))
def test_non_finite_and_absurd_privacy_settings_are_refused(case: str) -> None:
    text, key, says = BAD_PRIVACY[case]
    job = 'name = "j"\ndataset = "cancer"\n' + text
    with pytest.raises(ConfigError) as job_error:
        load_job_text(job, "job.toml")
    assert f"job.toml: {key}: {_SAYS[says]}" in job_error.value.message
    with pytest.raises(ConfigError) as scenario_error:
        validate_model(ScenarioConfig, tomllib.loads(text), "scenario.toml")
    assert f"scenario.toml: {key}: {_SAYS[says]}" in scenario_error.value.message


def test_the_documented_bounds_are_accepted_and_named_readably() -> None:
    edge = (
        f'name = "j"\n[privacy]\ntarget_epsilon = {MAX_EPSILON}\ndelta = {MIN_DELTA}\n'
        f"[label_histogram]\nnoise_multiplier = {MAX_NOISE_MULTIPLIER}\n"
    )
    assert load_job_text(edge, "job.toml").config.privacy.target_epsilon == MAX_EPSILON
    upper = f'name = "j"\n[privacy]\nnoise_multiplier = 1.0\ndelta = {MAX_DELTA}\n'
    assert load_job_text(upper, "job.toml").config.privacy.delta == MAX_DELTA
    with pytest.raises(ConfigError) as error:
        load_job_text('name = "j"\n[privacy]\ntarget_epsilon = 1\ndelta = 1e-11\n', "job.toml")
    assert error.value.message.endswith("greater than or equal to 1e-10")  # not 0.0000000001


@pytest.mark.parametrize(
    ("policy", "key", "says"),
    [
        ("epsilon_budget = inf", "policy.epsilon_budget", "finite"),
        ("epsilon_budget = 1e300", "policy.epsilon_budget", "≤"),
        ("delta = nan", "policy.delta", "finite"),
        ("delta = 0.9", "policy.delta", "≤"),
        ("min_noise_multiplier = inf", "policy.min_noise_multiplier", "finite"),
        ("max_grad_norm = inf", "policy.max_grad_norm", "finite"),
        ("max_statistics_epsilon = nan", "policy.max_statistics_epsilon", "finite"),
    ],
)
def test_non_finite_and_absurd_node_policies_are_refused(policy: str, key: str, says: str) -> None:
    data = tomllib.loads(f'name = "n"\nstate_dir = "state"\n[policy]\n{policy}\n')
    with pytest.raises(ConfigError) as error:
        validate_model(NodeConfig, data, "node.toml")
    assert f"node.toml: {key}: {_SAYS[says]}" in error.value.message


# ------------------------------------------------------------------ check-job writes no ledger


@pytest.fixture
def node_toml(tmp_path: Path) -> Path:
    """A node serving 'cancer' (registered in-process), its ledger not yet created."""
    data = load_breast_cancer()
    names = [f"f{i:02d}" for i in range(data.data.shape[1])]
    return add_site(
        tmp_path / "site",
        "st-mary",
        data.data,
        data.target,
        names,
        superlink_port=9091,  # never contacted
        budget=1.0,
        policy='models = ["logreg"]\n',
    )


def _no_ledger(node_toml: Path) -> bool:
    return not ledger_path(node_toml.parent / "state").exists()


def test_check_job_with_an_infinite_noise_multiplier_is_one_error_and_writes_nothing(
    tmp_path: Path, node_toml: Path, consortia_cli: CliRunner
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        'name = "j"\ndataset = "cancer"\nrounds = 1\n[model]\nname = "logreg"\n'
        "[privacy]\nnoise_multiplier = inf\n"
    )
    result = consortia_cli("node", "check-job", str(job), "--node", str(node_toml), cwd=tmp_path)
    message = one_cli_error(result, nothing_on_stdout=True)
    assert "privacy.noise_multiplier: Input should be a finite number" in message
    assert _no_ledger(node_toml)


def test_check_job_writes_no_ledger_whether_it_admits_or_refuses(
    tmp_path: Path, node_toml: Path, consortia_cli: CliRunner
) -> None:
    fits = write_job(tmp_path / "fits.toml", 0.8, min_nodes=1, rounds=1)
    greedy = write_job(tmp_path / "greedy.toml", 3.0, min_nodes=1, rounds=1)
    mlp = write_job(tmp_path / "mlp.toml", 0.8, min_nodes=1, rounds=1, model="mlp")
    check = ("node", "check-job")
    admitted = consortia_cli(*check, str(fits), "--node", str(node_toml), cwd=tmp_path)
    assert admitted.returncode == 0, admitted.stdout + admitted.stderr
    assert "would take part" in admitted.stdout
    over = consortia_cli(*check, str(greedy), "--node", str(node_toml), cwd=tmp_path)
    assert over.returncode == 1 and "budget-exhausted" in over.stdout, over.stdout + over.stderr
    model = consortia_cli(*check, str(mlp), "--node", str(node_toml), cwd=tmp_path)
    assert model.returncode == 1 and "model-not-allowed" in model.stdout
    assert _no_ledger(node_toml)


def test_a_node_toml_with_an_infinite_budget_is_one_error(
    tmp_path: Path, node_toml: Path, consortia_cli: CliRunner
) -> None:
    text = node_toml.read_text().replace("epsilon_budget = 1.0", "epsilon_budget = inf")
    node_toml.write_text(text)
    job = write_job(tmp_path / "job.toml", 0.8, min_nodes=1, rounds=1)
    result = consortia_cli("node", "check-job", str(job), "--node", str(node_toml), cwd=tmp_path)
    message = one_cli_error(result, nothing_on_stdout=True)
    assert "policy.epsilon_budget: Input should be a finite number" in message
    assert _no_ledger(node_toml)


# ------------------------------------------------------------------ files and paths


def test_a_relative_root_certificates_path_is_taken_from_the_working_folder(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    from consortia.common.pki import create_ca

    ca = create_ca(tmp_path / "pki")
    (tmp_path / "ca.crt").write_bytes(ca.certificate.read_bytes())
    result = consortia_cli(
        "job", "list", "--coordinator", "127.0.0.1:9", "--root-certificates", "ca.crt", cwd=tmp_path
    )
    message = one_cli_error(result)  # Flower wanted an absolute path: a ValueError traceback
    assert "https://127.0.0.1:9: cannot reach the coordinator" in message


@pytest.mark.parametrize("text", ["", "# a comment, and nothing else\n"])
def test_an_empty_scenario_or_job_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="the file holds no settings, so it would run the"):
        load_scenario(path)
    with pytest.raises(ConfigError, match=r"job\.toml: the file holds no settings"):
        load_job_text(text, "job.toml")


def test_simulate_an_empty_scenario_is_one_error_and_runs_nothing(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    (tmp_path / "empty.toml").write_text("")
    result = consortia_cli("simulate", "empty.toml", "--out", "run", cwd=tmp_path)
    message = one_cli_error(result, nothing_on_stdout=True)
    assert "empty.toml: the file holds no settings" in message
    assert "hospitals-breast-cancer" in message  # what to run instead
    assert not (tmp_path / "run").exists()


SECRET = "root-secret:x:0:0:do-not-echo"


@pytest.mark.parametrize("header", [True, False])
def test_a_data_file_linked_to_another_file_is_refused_without_echoing_it(
    tmp_path: Path, consortia_cli: CliRunner, header: bool
) -> None:
    from test_node_cli import _add, _assert_nothing_registered, _write_node_toml
    from test_onboarding import _csv_dataset

    spec = _csv_dataset(tmp_path)
    if not header:
        text = spec.read_text()
        spec.write_text(text.replace('format = "csv"', 'format = "csv"\nheader = false'))
    system = tmp_path / "etc" / "passwd"  # as a link to /etc/passwd would be
    system.parent.mkdir()
    system.write_text(f"{SECRET}\nbin:x:1:1:nothing-here-either\n")
    (tmp_path / "data.csv").unlink()
    (tmp_path / "data.csv").symlink_to(system)
    node_toml = _write_node_toml(tmp_path)
    message = one_cli_error(_add(consortia_cli, tmp_path, spec, node_toml), nothing_on_stdout=True)
    assert "not the table the schema describes" in message
    assert "root-secret" not in message and "do-not-echo" not in message
    assert "nothing-here" not in message
    _assert_nothing_registered(consortia_cli, tmp_path, node_toml)
