"""Image scaling: public constants where declared, else the fixed [0, 1] scale; never MNIST's
for other data; recorded in the run manifest and the node's registration."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consortia.client.onboarding import DatasetRegistry, load_spec, prepare
from consortia.common.config import DataConfig, ImageNormalization, ScenarioConfig
from consortia.common.config_io import load_scenario
from consortia.common.errors import ConfigError
from consortia.common.idx import read_idx
from consortia.common.scaling import ScalingKind
from consortia.server.outputs.manifest import build_manifest
from consortia.server.outputs.run_outputs import RunOutputs
from consortia.server.rounds.roster import NodeEntry, Roster
from consortia.simulations.lab import LAB
from consortia.simulations.node_data import scenario_with_data
from consortia.simulations.sources import load_source, source_scaling

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # Fashion-MNIST's published pixel mean and std
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _idx_bytes(values: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, values.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in values.shape)
    return header + values.tobytes()


def _idx_folder(folder: Path, n: int = 200) -> np.ndarray:
    """A small MNIST-style folder of bright images (mean far from MNIST's); returns them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    images = rng.integers(120, 256, size=(n, 6, 6), dtype=np.uint8)
    labels = (np.arange(n) % 4).astype(np.uint8)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    return images


def _manifest(config: ScenarioConfig, folder: Path) -> dict[str, object]:
    roster = Roster(
        nodes=(
            NodeEntry(node_id=1, name="a", data_fingerprint="0", feature_shape=(1,), num_classes=2),
        )
    )
    scaling = LAB.feature_scaling(config)  # what the lab hands the coordinator
    manifest = build_manifest(
        folder.name, config, "scenario.toml", "0" * 64, roster, "arch", feature_scaling=scaling
    )
    RunOutputs(folder).write_manifest(manifest)
    written: dict[str, object] = json.loads((folder / "manifest.json").read_text())
    return written


def _scenario(path: Path, normalize: dict[str, float] | None) -> ScenarioConfig:
    data: dict[str, object] = {"source": "idx", "path": str(path)}
    if normalize is not None:
        data["normalize"] = normalize
    return ScenarioConfig.model_validate({"simulation": {"nodes": 2, "data": data}})


# ------------------------------------------------------------------- simulation


def test_idx_without_constants_keeps_the_fixed_scale(tmp_path: Path) -> None:
    """An IDX folder that is not MNIST is no longer standardised with MNIST's constants."""
    images = _idx_folder(tmp_path / "idx")
    config = _scenario(tmp_path / "idx", None)
    source = load_source(config.simulation.data)
    np.testing.assert_array_equal(source.pool.x[:, 0], images.astype(np.float32) / 255.0)
    assert source.ranges == {"gray": (0.0, 1.0)}
    manifest = _manifest(config, tmp_path / "run")
    assert manifest["feature_scaling"] == {
        "kind": "fixed",
        "detail": "uint8 pixels / 255 onto [0, 1]; no public mean or std declared",
        "mean": [0.0],
        "std": [1.0],
    }


def test_idx_with_declared_constants_uses_them_and_records_them(tmp_path: Path) -> None:
    images = _idx_folder(tmp_path / "idx")
    config = _scenario(tmp_path / "idx", {"mean": FASHION_MEAN, "std": FASHION_STD})
    source = load_source(config.simulation.data)
    expected = (images.astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD
    np.testing.assert_allclose(source.pool.x[:, 0], expected, rtol=1e-6)
    low, high = source.ranges["gray"]
    assert (low, high) == pytest.approx(
        (-FASHION_MEAN / FASHION_STD, (1 - FASHION_MEAN) / FASHION_STD)
    )
    scaling = _manifest(config, tmp_path / "run")["feature_scaling"]
    assert scaling == {
        "kind": "public",
        "detail": "uint8 pixels / 255 onto [0, 1], then (x - mean) / std with the declared "
        "public constants",
        "mean": [FASHION_MEAN],
        "std": [FASHION_STD],
    }


def test_fashion_mnist_gets_its_own_constants_not_mnists(tmp_path: Path) -> None:
    """The real Fashion-MNIST: standardised with its own public constants its pixels centre on
    0 (MNIST's constants, used for any IDX data before, put them at +0.5); undeclared, they
    stay on [0, 1]. Either way the manifest says which constants were used."""
    if not FASHION_DIR.is_dir():
        pytest.fail(
            f"Fashion-MNIST is expected in {FASHION_DIR} (apt-get install dataset-fashion-mnist)"
        )
    declared = _scenario(FASHION_DIR, {"mean": FASHION_MEAN, "std": FASHION_STD})
    source = load_source(declared.simulation.data)
    assert source.pool.x.shape == (60_000, 1, 28, 28) and source.test is not None
    assert abs(float(source.pool.x.mean())) < 0.01 and abs(float(source.pool.x.std()) - 1) < 0.01
    recorded = _manifest(declared, tmp_path / "declared")["feature_scaling"]
    assert isinstance(recorded, dict)
    assert (recorded["kind"], recorded["mean"], recorded["std"]) == (
        "public",
        [FASHION_MEAN],
        [FASHION_STD],
    )
    assert recorded["mean"] != [MNIST_MEAN]

    plain = load_source(_scenario(FASHION_DIR, None).simulation.data)
    assert float(plain.pool.x.min()) == 0.0 and float(plain.pool.x.max()) == 1.0
    assert float(plain.pool.x.mean()) == pytest.approx(FASHION_MEAN, abs=1e-3)


def test_mnist_with_its_declared_constants_is_unchanged(mnist_dir: Path) -> None:
    """The bundled MNIST scenarios declare MNIST's constants: bit for bit the inputs (and so
    the results) MNIST runs had when those constants were hard-coded."""
    for name in ("mnist-10-nodes-dirichlet", "mnist-10-nodes-dp-table", "mnist-1000-nodes"):
        data = scenario_with_data(load_scenario(name), mnist_dir).config.simulation.data
        assert data.normalize == ImageNormalization(mean=(MNIST_MEAN,), std=(MNIST_STD,))
    source = load_source(data)
    images = read_idx(mnist_dir / "train-images-idx3-ubyte.gz")
    before = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD  # the old formula
    np.testing.assert_array_equal(source.pool.x[:, 0], before)


def test_normalize_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"takes no \[simulation\.data\.normalize\]"):
        DataConfig(source="digits", normalize=ImageNormalization(mean=(0.5,), std=(0.2,)))
    with pytest.raises(ValueError, match="grayscale"):
        DataConfig(source="idx", normalize=ImageNormalization(mean=(0.1, 0.2, 0.3), std=(1, 1, 1)))
    with pytest.raises(ValueError, match="greater than 0"):
        ImageNormalization(mean=(0.1,), std=(0.0,))
    with pytest.raises(ValueError, match="'mean' gives 2 values and 'std' 1"):
        ImageNormalization(mean=(0.1, 0.2), std=(0.3,))


def test_bundled_sources_record_their_fixed_public_scales() -> None:
    assert source_scaling(DataConfig(source="breast_cancer")).kind == ScalingKind.PUBLIC_RANGE
    digits = source_scaling(DataConfig(source="digits"))
    assert (digits.kind, digits.mean, digits.std) == (ScalingKind.FIXED, (0.0,), (1.0,))


# ------------------------------------------------------------------- deployment


def _idx_dataset(folder: Path, normalize: str = "", extra: str = "") -> Path:
    _idx_folder(folder, n=60)
    schema = folder / "dataset.toml"
    schema.write_text(
        f'{extra}\n[source]\nformat = "idx"\nimages = "train-images-idx3-ubyte.gz"\n'
        f'labels = "train-labels-idx1-ubyte.gz"\n{normalize}\n',
        encoding="utf-8",
    )
    return schema


def test_deployed_idx_uses_declared_constants_and_registers_them(tmp_path: Path) -> None:
    schema = _idx_dataset(tmp_path, f"[normalize]\nmean = {FASHION_MEAN}\nstd = {FASHION_STD}")
    spec = load_spec(schema)
    prepared = prepare(spec)
    fixed = prepare(load_spec(_idx_dataset(tmp_path / "plain")))
    np.testing.assert_allclose(
        prepared.train.x, (fixed.train.x - FASHION_MEAN) / FASHION_STD, rtol=1e-6
    )
    assert prepared.mean is not None and prepared.mean.tolist() == [FASHION_MEAN]
    registry = DatasetRegistry(tmp_path / "state")
    registration = registry.add("fashion", schema)
    assert registration.scaling is not None
    assert registration.scaling.kind == ScalingKind.PUBLIC
    assert registration.scaling.mean == (FASHION_MEAN,) and registration.scaling.std == (
        FASHION_STD,
    )
    stored = json.loads((registry.path("fashion") / "registration.json").read_text())
    assert stored["scaling"]["mean"] == [FASHION_MEAN]

    plain = DatasetRegistry(tmp_path / "state-plain").add(
        "plain", tmp_path / "plain" / "dataset.toml"
    )
    assert plain.scaling is not None and plain.scaling.kind == ScalingKind.FIXED
    assert float(fixed.train.x.min()) >= 0.0 and float(fixed.train.x.max()) <= 1.0


def test_deployed_rgb_folder_takes_one_constant_per_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for k in range(6):
            pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(tmp_path / "images" / label / f"{k}.png")
    source = '[source]\nformat = "image_folder"\npath = "images"\nmode = "rgb"\nsize = [4, 4]\n'
    schema = tmp_path / "dataset.toml"
    schema.write_text(source + "[normalize]\nmean = [0.5, 0.4, 0.3]\nstd = [0.2, 0.25, 0.5]\n")
    spec = load_spec(schema)
    scaling = spec.feature_scaling()
    assert scaling.mean == (0.5, 0.4, 0.3) and scaling.std == (0.2, 0.25, 0.5)
    prepared = prepare(spec)
    assert prepared.feature_shape == (3, 4, 4)
    schema.write_text(source + "[normalize]\nmean = [0.5, 0.4]\nstd = [0.2, 0.25]\n")
    with pytest.raises(ConfigError, match="2 values for images of 3 channels"):
        load_spec(schema)


@pytest.mark.parametrize(
    ("normalize", "extra", "match"),
    [
        ("[normalize]\nmean = 0.5\nstd = 0.2", "standardize = true", "keep one"),
        ("[normalize]\nmean = 0.5\nstd = -1", "", "greater than 0"),
    ],
)
def test_deployed_normalize_settings_are_checked(
    tmp_path: Path, normalize: str, extra: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        load_spec(_idx_dataset(tmp_path, normalize, extra))


def test_normalize_on_a_table_is_refused(tmp_path: Path) -> None:
    schema = tmp_path / "dataset.toml"
    schema.write_text(
        '[normalize]\nmean = 0.5\nstd = 0.2\n\n[source]\nformat = "csv"\npath = "d.csv"\n\n'
        '[[columns]]\nname = "x"\ntype = "float"\n\n[[columns]]\nname = "y"\ntype = "int"\n'
        "label = true\n"
    )
    with pytest.raises(ConfigError, match="a csv source takes none"):
        load_spec(schema)
