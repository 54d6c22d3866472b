"""Weighted averaging of model updates, straight from Flower's wire format.

Flower's `aggregate_arrayrecords` deserialises every array with `np.load`
(a copy), then builds a scaled temporary per reply (another pass) before
adding it. Here each array's `.npy` payload is viewed in place (no copy) and
accumulated with one fused multiply-add per reply, in a fixed order so the
result is reproducible bit for bit.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from consortia.common.errors import FederationError

_NUMPY_STYPE = "numpy.ndarray"


def array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of a Flower `Array`'s payload, without copying it."""
    data = array.data
    if array.stype != _NUMPY_STYPE or data[:6] != b"\x93NUMPY":
        return array.numpy()
    width = 2 if data[6] == 1 else 4  # .npy v1 stores the header length in 2 bytes, v2+ in 4
    offset = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    shape, fortran_order, dtype = _parse_npy_header(bytes(data[:offset]))
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


@lru_cache(maxsize=4096)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse a .npy header once; every reply of a round repeats the same few headers."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = read(stream)
    if dtype.hasobject:
        raise FederationError("refusing an array of Python objects in a model update")
    return tuple(shape), bool(fortran_order), dtype


def weighted_average(records: Sequence[ArrayRecord], weights: Sequence[float]) -> ArrayRecord:
    """Σ wᵢ·xᵢ / Σ wᵢ per array, accumulated in `records` order.

    All records must hold the same array names, shapes and dtypes (the
    coordinator validates replies before calling this).
    """
    if not records:
        raise ValueError("nothing to average")
    if len(records) != len(weights):
        raise ValueError(f"{len(records)} records but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise FederationError(f"aggregation weights must sum to a positive number, got {total}")
    factors = [float(w) / total for w in weights]
    averaged: dict[str, Array] = {}
    with warnings.catch_warnings():
        # Views over immutable `bytes` are read-only; torch warns but only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key in records[0]:
            first = array_view(records[0][key])
            accumulator = torch.zeros(first.shape, dtype=_accumulator_dtype(first.dtype))
            for record, factor in zip(records, factors, strict=True):
                accumulator.add_(torch.from_numpy(array_view(record[key])), alpha=factor)
            averaged[key] = Array(accumulator.numpy().astype(first.dtype, copy=False))
    return ArrayRecord(averaged)


def _accumulator_dtype(dtype: np.dtype) -> torch.dtype:
    """Accumulate floats in their own precision, integers (e.g. counters) in float64."""
    if dtype == np.float64:
        return torch.float64
    if np.issubdtype(dtype, np.floating):
        return torch.float32
    return torch.float64
