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
