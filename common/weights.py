"""Moving model weights between PyTorch modules and Flower ArrayRecords."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from consortia.common.errors import FederationError


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """The module's state dict as an ArrayRecord (CPU copies, key order kept)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load `arrays` into `model`, refusing missing, extra or mis-shaped tensors."""
    state = arrays.to_torch_state_dict()
    expected = model.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise FederationError(
            f"model arrays do not match the architecture (missing: {missing}, unexpected: {extra})"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise FederationError(
                f"array '{key}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)


def flatten_update(local: ArrayRecord, global_arrays: ArrayRecord) -> np.ndarray:
    """local − global over every array, in the global model's order, as one float64 vector.

    float64: the difference of two float32 weights is exact there, so the only
    error a secure round adds is its fixed-point step.
    """
    bases = {key: array.numpy() for key, array in global_arrays.items()}  # deserialised once
    out = np.empty(sum(base.size for base in bases.values()), np.float64)
    start = 0
    for key, base in bases.items():
        stop = start + base.size
        np.subtract(
            local[key].numpy(), base, out=out[start:stop].reshape(base.shape), dtype=np.float64
        )
        start = stop
    return out
