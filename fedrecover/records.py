"""Adapters as Flower records: the conversions the ServerApp, the ClientApp and SecAgg+ share."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays a record carries (what bytes_up / bytes_down count)."""
    return int(sum(len(arr.data) for arr in record.values()))
