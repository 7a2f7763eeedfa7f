"""Server-side aggregation of LoRA adapters of possibly different ranks and depths, by name.

The methods live in the registry `llmprune.fedrecover.aggregations` (one module each); this
module keeps the by-name entry points and the per-method functions importable where they were.

- fedavg: plain weighted average of A and B (all holders must share a rank).
- hetlora: zero-pad each client's A (rows) and B (columns) to the global rank, average; a client
  of rank r gets the first r rows/columns back (truncation).
- flexlora: average the products dW_i = B_i A_i, kept exactly as concatenated factors; a client
  of rank r gets the best rank-r factors of it (truncated SVD)."""

from __future__ import annotations

import numpy as np

from .aggregations import AGGREGATIONS, Aggregation, ClientUpdate, get_aggregation, pad_rank, register
from .aggregations.base import holders
from .aggregations.fedavg import fedavg
from .aggregations.flexlora import flexlora, lowrank_svd
from .aggregations.hetlora import hetlora

__all__ = ["AGGREGATIONS", "Aggregation", "ClientUpdate", "aggregate", "client_view", "fedavg", "flexlora", "hetlora",
           "holders", "lowrank_svd", "pad_rank", "register"]


def aggregate(method: str, updates: list[ClientUpdate], previous: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The new global adapter from this round's uploads (`rank`: the global rank)."""
    entry = get_aggregation(method)
    if not updates:
        return dict(previous)
    return entry.aggregate(updates, previous, rank)


def client_view(method: str, global_arrays: dict[str, np.ndarray], modules: list[str], rank: int,
                init: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a client of `rank` holding `modules` receives: rank-`rank` A and B per module."""
    return get_aggregation(method).client_view(global_arrays, modules, rank, init)
