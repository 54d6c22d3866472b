"""Scenario files: validation, precise messages, and the CLI's exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CliRunner

from consortia.common.config import PrivacyConfig, ScenarioConfig
from consortia.common.config_io import bundled_scenarios, load_scenario
from consortia.common.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


def test_default_scenario_loads_and_is_private() -> None:
    loaded = load_scenario()
    config = loaded.config
    assert config.privacy.enabled and config.privacy.target_epsilon == 1.0
    assert config.privacy.delta == 1e-5
    assert config.simulation.nodes == len(config.simulation.node_names or ())
    assert len(loaded.source_sha256) == 64


def test_every_bundled_scenario_validates() -> None:
    names = bundled_scenarios()
    assert "hospitals-breast-cancer" in names
    for name in names:
        assert isinstance(load_scenario(name).config, ScenarioConfig)


def test_unknown_key_names_key_and_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "[privacy]\ntarget_epsilon = 1.0\nnoise_multiplyer = 2.0\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert str(path) in message
    assert "privacy.noise_multiplyer: unknown key" in message
    assert "noise_multiplier" in message and "max_grad_norm" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "roundz = 3\n")
    with pytest.raises(ConfigError, match=r"roundz: unknown key \(allowed here: .*rounds"):
        load_scenario(path)


def test_wrong_literal_lists_allowed_values(tmp_path: Path) -> None:
    path = _write(tmp_path, '[strategy]\nname = "fedsgd"\n')
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "strategy" in message
    assert "fedavg" in message and "fedprox" in message and "fedadam" in message


def test_wrong_type_and_range(tmp_path: Path) -> None:
    path = _write(tmp_path, 'rounds = "ten"\n[training]\nbatch_size = 0\n')
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "rounds: Input should be a valid integer" in message
    assert "training.batch_size: Input should be greater than or equal to 1" in message


def test_privacy_needs_exactly_one_noise_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyConfig(target_epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        PrivacyConfig()
    assert PrivacyConfig(enabled=False).target_epsilon is None


def test_broken_toml_reports_position(tmp_path: Path) -> None:
    path = _write(tmp_path, "rounds = = 3\n")
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 1"):
        load_scenario(path)


def test_cohort_larger_than_federation_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "clients_per_round = 9\n[simulation]\nnodes = 3\n")
    with pytest.raises(ConfigError, match=r"clients_per_round' \(9\) exceeds the 3 simulated"):
        load_scenario(path)


def test_overrides_are_validated() -> None:
    assert load_scenario(None, {"rounds": 3, "seed": 7}).config.rounds == 3
    with pytest.raises(ConfigError, match="rounds"):
        load_scenario(None, {"rounds": 0})


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_scenario("does-not-exist.toml")
    with pytest.raises(ConfigError, match="neither a file nor a bundled scenario"):
        load_scenario("no-such-scenario")


def test_cli_bad_scenario_exits_2_with_one_message(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    path = _write(tmp_path, "[privacy]\ntarget_epsilon = 1.0\nepsilon = 3\n")
    result = consortia_cli("simulate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "privacy.epsilon: unknown key" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_help_on_every_command(tmp_path: Path, consortia_cli: CliRunner) -> None:
    for args in (["--help"], ["simulate", "--help"]):
        result = consortia_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout


def test_cli_rejects_non_empty_out_dir(tmp_path: Path, consortia_cli: CliRunner) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = consortia_cli("simulate", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert "not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_cli_model_that_does_not_fit_the_data_fails_before_the_engine(
    tmp_path: Path, consortia_cli: CliRunner
) -> None:
    path = _write(tmp_path, '[model]\nname = "cnn"\n')  # the default data is a table
    result = consortia_cli("simulate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "model 'cnn' needs image data" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_idx_folder_is_a_clear_error(tmp_path: Path, consortia_cli: CliRunner) -> None:
    path = _write(tmp_path, '[simulation.data]\nsource = "idx"\npath = "/nonexistent/mnist"\n')
    result = consortia_cli("simulate", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "/nonexistent/mnist: no such folder" in result.stderr


# ------------------------------------------------- strategies and update checks


def test_every_strategy_name_loads_with_its_settings(tmp_path: Path) -> None:
    blocks = {
        "fedyogi": "eta = 0.02\nbeta_1 = 0.8",
        "trimmed_mean": "beta = 0.2",
        "median": "",
        "krum": "num_malicious_nodes = 1",
        "multikrum": "num_malicious_nodes = 1\nnum_nodes_to_select = 3",
    }
    for name, settings in blocks.items():
        text = (
            f'[strategy]\nname = "{name}"\n{settings}\n'
            "[update_checks]\nmax_update_norm = 5.0\nmin_updates = 4\n"
            "[simulation]\nnodes = 6\n"
        )
        config = load_scenario(_write(tmp_path, text)).config
        assert config.strategy.name == name
        assert config.update_checks.max_update_norm == 5.0
        assert config.update_checks.min_updates == 4
        assert config.job().update_checks == config.update_checks  # travels with the job


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[strategy]\nname = "krum"\nnum_malicious_nodes = 2\n[simulation]\nnodes = 6\n',
            r"strategy 'krum' with num_malicious_nodes = 2 needs more than 2·2 \+ 2 = 6 updates "
            r"per round, but a round has 6 nodes \(simulation.nodes\)",
        ),
        (
            'clients_per_round = 5\n[strategy]\nname = "multikrum"\nnum_malicious_nodes = 1\n'
            "num_nodes_to_select = 5\n[simulation]\nnodes = 8\n",
            r"at least num_nodes_to_select \+ num_malicious_nodes = 6, "
            r"but a round has 5 nodes \(clients_per_round\)",
        ),
        (
            '[strategy]\nname = "trimmed_mean"\nbeta = 0.5\n',
            r"strategy.trimmed_mean.beta: Input should be less than 0.5",
        ),
        (
            '[strategy]\nname = "trimmed_mean"\nbeta = 0.1\n[simulation]\nnodes = 5\n',
            r"trims int\(0.1 × 5\) = 0 updates from each end .* raise beta to at least 0.2",
        ),
        (
            "[update_checks]\nmin_updates = 6\n[simulation]\nnodes = 5\n",
            r"update_checks.min_updates \(6\) exceeds the 5 nodes per round",
        ),
        ("[update_checks]\nnorm_slack = 0.5\n", r"update_checks.norm_slack: Input should be"),
        ("[update_checks]\nmax_update_norm = 0\n", r"update_checks.max_update_norm: Input should"),
        ("[update_checks]\nmax_norm = 3.0\n", r"update_checks.max_norm: unknown key"),
    ],
)
def test_strategy_and_update_check_errors_name_the_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_scenario(_write(tmp_path, text))


def test_the_round_timeout_follows_the_job_unless_it_is_set(tmp_path: Path) -> None:
    """A lost reply costs a round its timeout: the default scales with the local epochs."""
    one = load_scenario(_write(tmp_path, "[training]\nlocal_epochs = 1\n")).config
    three = load_scenario(_write(tmp_path, "[training]\nlocal_epochs = 3\n")).config
    assert (one.round_timeout_s, three.round_timeout_s) == (600.0, 1200.0)
    text = "round_timeout_s = 45\n[training]\nlocal_epochs = 3\n"
    explicit = load_scenario(_write(tmp_path, text))
    assert explicit.config.round_timeout_s == 45.0
    # A bad epoch count is the one error reported, not a missing timeout besides it.
    with pytest.raises(ConfigError) as info:
        load_scenario(_write(tmp_path, "[training]\nlocal_epochs = 0\n"))
    assert "local_epochs" in str(info.value) and "round_timeout_s" not in str(info.value)
