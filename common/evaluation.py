"""Loss and accuracy of a model on labelled data (used by nodes and the coordinator)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from consortia.common.arrays import LabeledArrays


@torch.no_grad()
def evaluate_model(
    model: nn.Module, data: LabeledArrays, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on `data`."""
    model.to(device).eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        features = torch.from_numpy(data.x[start : start + batch_size]).to(device)
        labels = torch.from_numpy(data.y[start : start + batch_size]).to(device)
        logits = model(features)
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    count = max(len(data), 1)
    return loss_sum / count, correct / count


@torch.no_grad()
def predict(
    model: nn.Module, data: LabeledArrays, device: torch.device, batch_size: int = 1024
) -> np.ndarray:
    """The class `model` predicts for each record of `data` (int64)."""
    model.to(device).eval()
    parts = [
        model(torch.from_numpy(data.x[start : start + batch_size]).to(device)).argmax(dim=1)
        for start in range(0, len(data), batch_size)
    ]
    return torch.cat(parts).cpu().numpy() if parts else np.zeros(0, dtype=np.int64)
