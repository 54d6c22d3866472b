"""Choice of the compute device: the GPU when one is present, unless told otherwise."""

from __future__ import annotations

import torch

from consortia.common.errors import ConfigError


def resolve_device(preference: str) -> torch.device:
    """Map 'auto' | 'cpu' | 'cuda' to a torch device; 'cuda' without a GPU is an error."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device = 'cuda' but this machine has no usable CUDA GPU")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
