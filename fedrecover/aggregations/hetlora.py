"""hetlora: zero-pad each client's A (rows) and B (columns) to the global rank and average; a
client of rank r gets the first r rows/columns back (truncation)."""

from __future__ import annotations

from .base import Aggregation, Arrays, ClientUpdate, all_modules, holders, pad_rank, register, weighted_sum, weights


def hetlora(updates: list[ClientUpdate], previous: Arrays, rank: int) -> Arrays:
    out = dict(previous)
    for module in all_modules(updates):
        group = holders(updates, module)
        w = weights(group)
        padded = [pad_rank(u.arrays[f"{module}.A"], u.arrays[f"{module}.B"], rank) for u in group]
        out[f"{module}.A"] = weighted_sum([p[0] for p in padded], w)
        out[f"{module}.B"] = weighted_sum([p[1] for p in padded], w)
    return out


register(Aggregation("hetlora", hetlora, secagg=True, help="mixed ranks: zero-pad to the largest rank, weighted mean"))
