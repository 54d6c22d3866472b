"""The model registry's architecture hash: what a node operator pins in its policy."""

from __future__ import annotations

import subprocess
import sys

from consortia.client.policy import NodePolicy, check_architecture
from consortia.common.config import ModelConfig
from consortia.common.models import architecture_hash, build_model

SHAPE = (1, 8, 8)


def _hash(name: str, hidden: tuple[int, ...] = (64,), shape: tuple[int, ...] = SHAPE) -> str:
    return architecture_hash(build_model(ModelConfig(name=name, hidden=hidden), shape, 10, 0))


def test_hash_ignores_weights_but_sees_every_architectural_change() -> None:
    config = ModelConfig(name="mlp")
    assert architecture_hash(build_model(config, SHAPE, 10, 1)) == architecture_hash(
        build_model(config, SHAPE, 10, 2)
    )
    hashes = {
        _hash("logreg"),
        _hash("mlp"),
        _hash("mlp", hidden=(32,)),
        _hash("mlp", hidden=(64, 64)),
        _hash("mlp", shape=(1, 8, 9)),
        _hash("cnn"),
    }
    assert len(hashes) == 6 and all(len(h) == 64 for h in hashes)


def test_hash_is_the_same_in_another_process() -> None:
    code = (
        "from consortia.common.config import ModelConfig\n"
        "from consortia.common.models import architecture_hash, build_model\n"
        f"print(architecture_hash(build_model(ModelConfig(name='cnn'), {SHAPE}, 10, 5)))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == _hash("cnn")


def test_policy_pins_architectures() -> None:
    assert check_architecture(_hash("mlp"), NodePolicy()) is None  # nothing pinned: names rule
    pinned = NodePolicy(architectures=(_hash("mlp"),))
    assert check_architecture(_hash("mlp"), pinned) is None
    refusal = check_architecture(_hash("mlp", hidden=(128,)), pinned)
    assert refusal is not None and refusal.code == "architecture-not-allowed"
