"""The aggregation registry: one module per method, each registering one `Aggregation` entry
(aggregate, client_view, mixed ranks, SecAgg+). Adding a method is a module here plus its name
on the import line below (see docs/recover.md, "Adding an aggregation")."""

from __future__ import annotations

from .base import AGGREGATIONS, Aggregation, ClientUpdate, get_aggregation, pad_rank, register, truncate_view

from . import fedavg, hetlora, flexlora  # noqa: E402,F401  (each registers itself, in this order)

__all__ = ["AGGREGATIONS", "Aggregation", "ClientUpdate", "get_aggregation", "pad_rank", "register", "truncate_view"]
