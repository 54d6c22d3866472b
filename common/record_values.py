"""Typed reads of one number from a Flower `ConfigRecord` or `MetricRecord`.

A record's values are typed as a union (numbers, strings, bytes, lists); the
coordinator and the nodes know which keys hold numbers. These read one as
such: a missing key raises `KeyError` as `record[key]` does, a value that is
not a number `TypeError` as `float(...)` of it would.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, MetricRecord


def number(record: ConfigRecord | MetricRecord, key: str, default: float | None = None) -> float:
    """`record[key]` as a float; `default` when given and the key is absent."""
    value = record[key] if default is None or key in record else default
    if not isinstance(value, int | float):
        raise TypeError(f"record value '{key}' is not a number: {value!r}")
    return float(value)


def whole_number(record: ConfigRecord | MetricRecord, key: str) -> int:
    """`record[key]` as an int (a float is truncated, as `int(...)` does)."""
    value = record[key]
    if not isinstance(value, int | float):
        raise TypeError(f"record value '{key}' is not a number: {value!r}")
    return int(value)
