"""Weighted averaging: exact against a float64 reference and against Flower's own."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from consortia.common.errors import FederationError
from consortia.server.rounds.aggregation import array_view, weighted_average

SHAPES = {"w1": (17, 9), "b1": (9,), "w2": (9, 3), "scalar": ()}


def _records(count: int, seed: int = 0) -> list[ArrayRecord]:
    rng = np.random.default_rng(seed)
    return [
        ArrayRecord(
            {k: Array(rng.standard_normal(s).astype(np.float32)) for k, s in SHAPES.items()}
        )
        for _ in range(count)
    ]


def test_matches_float64_reference() -> None:
    records = _records(7)
    weights = [1.0, 2.0, 0.5, 3.0, 1.0, 1.0, 4.0]
    averaged = weighted_average(records, weights)
    for key in SHAPES:
        stacked = np.stack([r[key].numpy().astype(np.float64) for r in records])
        expected = np.tensordot(np.array(weights) / sum(weights), stacked, axes=1)
        assert averaged[key].numpy().dtype == np.float32
        np.testing.assert_allclose(averaged[key].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_matches_flower_aggregate_arrayrecords() -> None:
    records = _records(5, seed=3)
    weights = [10.0, 20.0, 30.0, 5.0, 1.0]
    contents = [
        RecordDict({"arrays": r, "metrics": MetricRecord({"w": w})})
        for r, w in zip(records, weights, strict=True)
    ]
    flower = aggregate_arrayrecords(contents, "w")
    ours = weighted_average(records, weights)
    for key in SHAPES:
        np.testing.assert_allclose(ours[key].numpy(), flower[key].numpy(), rtol=1e-5, atol=1e-6)


def test_same_order_same_bytes() -> None:
    records = _records(6, seed=1)
    first = weighted_average(records, [1.0] * 6)
    second = weighted_average(records, [1.0] * 6)
    assert all(first[k].data == second[k].data for k in SHAPES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.float16])
@pytest.mark.parametrize("order", ["C", "F"])
def test_array_view_equals_numpy_deserialisation(dtype: type, order: str) -> None:
    values = np.asarray(np.arange(24).reshape(2, 3, 4), dtype=dtype, order=order)
    array = Array(values)
    view = array_view(array)
    np.testing.assert_array_equal(view, array.numpy())
    assert view.dtype == values.dtype and view.shape == values.shape


def test_rejects_bad_weights_and_mismatched_inputs() -> None:
    records = _records(2)
    with pytest.raises(FederationError, match="positive"):
        weighted_average(records, [0.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        weighted_average(records, [1.0])
    with pytest.raises(ValueError, match="nothing"):
        weighted_average([], [])
