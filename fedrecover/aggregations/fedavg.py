"""fedavg: plain weighted average of A and B (all holders of a module must share a rank)."""

from __future__ import annotations

from llmprune.errors import LLMPruneError

from .base import (
    Aggregation,
    Arrays,
    ClientUpdate,
    all_modules,
    holders,
    mixed_rank_names,
    names_text,
    register,
    weighted_sum,
    weights,
)


def fedavg(updates: list[ClientUpdate], previous: Arrays, rank: int | None = None) -> Arrays:
    out = dict(previous)
    for module in all_modules(updates):
        group = holders(updates, module)
        ranks = {u.arrays[f"{module}.A"].shape[0] for u in group}
        if len(ranks) > 1:
            raise LLMPruneError(f"clients sent different LoRA ranks {sorted(ranks)} for {module}",
                                f"use --aggregation {names_text(mixed_rank_names())} for mixed ranks")
        w = weights(group)
        for part in ("A", "B"):
            out[f"{module}.{part}"] = weighted_sum([u.arrays[f"{module}.{part}"] for u in group], w)
    return out


register(Aggregation("fedavg", fedavg, mixed_ranks=False, secagg=True, help="equal ranks: weighted mean of A and of B"))
