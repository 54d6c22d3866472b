"""The coordinator's random number generators, captured and restored across a resume.

Consortia draws nothing from these after the model is built (cohorts use
their own seeded generators, nodes their own seeds), but Flower, a strategy
or a future feature may: a resumed run continues with the generators exactly
where the interrupted run left them after the checkpointed round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

PYTHON_KEY = "rng/python"
NUMPY_KEY = "rng/numpy"
TORCH_KEY = "rng/torch"


class RngScalars(BaseModel):
    """The non-array parts of the generators' states (the arrays travel as tensors)."""

    model_config = ConfigDict(extra="forbid")

    python_version: int
    python_gauss_next: float | None
    numpy_pos: int
    numpy_has_gauss: int
    numpy_cached_gaussian: float


@dataclass(frozen=True)
class RngState:
    """Python's `random`, NumPy's global and torch's CPU generator."""

    scalars: RngScalars
    python: np.ndarray  # uint32[625]: 624 Mersenne Twister words and the position
    numpy: np.ndarray  # uint32[624]
    torch: np.ndarray  # uint8: torch's serialised CPU generator

    def tensors(self) -> dict[str, np.ndarray]:
        return {PYTHON_KEY: self.python, NUMPY_KEY: self.numpy, TORCH_KEY: self.torch}

    @classmethod
    def from_tensors(cls, scalars: RngScalars, tensors: dict[str, np.ndarray]) -> RngState:
        return cls(
            scalars=scalars,
            python=tensors[PYTHON_KEY],
            numpy=tensors[NUMPY_KEY],
            torch=tensors[TORCH_KEY],
        )


def capture_rng() -> RngState:
    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert name == "MT19937"
    return RngState(
        scalars=RngScalars(
            python_version=version,
            python_gauss_next=gauss_next,
            numpy_pos=int(pos),
            numpy_has_gauss=int(has_gauss),
            numpy_cached_gaussian=float(cached),
        ),
        python=np.asarray(words, dtype=np.uint32),
        numpy=np.asarray(keys, dtype=np.uint32),
        torch=torch.get_rng_state().numpy().copy(),
    )


def restore_rng(state: RngState) -> None:
    s = state.scalars
    random.setstate((s.python_version, tuple(int(w) for w in state.python), s.python_gauss_next))
    np.random.set_state(
        ("MT19937", state.numpy, s.numpy_pos, s.numpy_has_gauss, s.numpy_cached_gaussian)
    )
    torch.set_rng_state(torch.from_numpy(np.ascontiguousarray(state.torch, dtype=np.uint8)))
