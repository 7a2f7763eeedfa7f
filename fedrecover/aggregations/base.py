"""What every aggregation shares: the `Aggregation` entry, the registry, one client's upload, and
the per-module helpers (holders, weights, rank padding).

Pure functions over dicts of canonical arrays (see lora.py). Every module is averaged over the
clients that hold it this round, weighted by their example counts; a module nobody held keeps
its previous value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmprune.errors import LLMPruneError

Arrays = dict[str, np.ndarray]


@dataclass
class ClientUpdate:
    """One client's uploaded adapter and its aggregation weight (its number of examples)."""

    arrays: Arrays
    weight: float
    client: str = ""


def truncate_view(global_arrays: Arrays, modules: list[str], rank: int, init: Arrays) -> Arrays:
    """What a client of `rank` holding `modules` receives: the first `rank` rows of A and columns
    of B; rank the global adapter lacks comes from `init` (A) and zeros (B)."""
    out = {}
    for module in modules:
        a, b = fill_rank(global_arrays[f"{module}.A"], global_arrays[f"{module}.B"], rank, init[f"{module}.A"])
        out[f"{module}.A"] = np.ascontiguousarray(a[:rank], dtype=np.float32)
        out[f"{module}.B"] = np.ascontiguousarray(b[:, :rank], dtype=np.float32)
    return out


def fill_rank(a: np.ndarray, b: np.ndarray, rank: int, init_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A and B of at least `rank`: missing rows of A from the seeded init, missing columns of B zero."""
    if a.shape[0] < rank:
        a = np.concatenate([a, init_a[a.shape[0]:rank]], axis=0)
        b = np.concatenate([b, np.zeros((b.shape[0], rank - b.shape[1]), np.float32)], axis=1)
    return a, b


@dataclass(frozen=True)
class Aggregation:
    """One server-side aggregation: everything the config, the fleet planner, SecAgg+ and the
    strategy need to know about it.

    aggregate(updates, previous, rank) -> the new global adapter (`rank`: the global rank);
    client_view(global_arrays, modules, rank, init) -> what a client of `rank` holding `modules`
    receives (`init`: the seeded rank-R start);
    mixed_ranks: whether clients may train different ranks in one round;
    secagg: whether SecAgg+ can carry it, i.e. the new adapter is the per-module weighted mean of
    the uploads zero-padded to the global rank (a masked sum gives exactly that)."""

    name: str
    aggregate: Callable[[list[ClientUpdate], Arrays, int], Arrays]
    client_view: Callable[[Arrays, list[str], int, Arrays], Arrays] = truncate_view
    mixed_ranks: bool = True
    secagg: bool = False
    help: str = ""


AGGREGATIONS: dict[str, Aggregation] = {}


def register(aggregation: Aggregation) -> Aggregation:
    """Add an aggregation to the registry (its name becomes an --aggregation choice)."""
    AGGREGATIONS[aggregation.name] = aggregation
    return aggregation


def get_aggregation(name: str) -> Aggregation:
    try:
        return AGGREGATIONS[name]
    except KeyError:
        raise LLMPruneError(f"unknown aggregation '{name}'", f"use {names_text(AGGREGATIONS)}") from None


def names_text(names, last: str = "or") -> str:
    """'a, b or c'."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def mixed_rank_names() -> list[str]:
    return [name for name, agg in AGGREGATIONS.items() if agg.mixed_ranks]


def secagg_names() -> list[str]:
    return [name for name, agg in AGGREGATIONS.items() if agg.secagg]


# -- helpers the aggregations share ------------------------------------------------------------------
def holders(updates: list[ClientUpdate], module: str) -> list[ClientUpdate]:
    return [u for u in updates if f"{module}.A" in u.arrays]


def weights(group: list[ClientUpdate]) -> np.ndarray:
    w = np.array([u.weight for u in group], dtype=np.float64)
    if (w <= 0).any() or not np.isfinite(w).all():
        raise LLMPruneError("a client reported a non-positive example count", "clients must train on at least one example")
    return w / w.sum()


def pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A [r, in] and B [out, r] zero-padded to `rank` (HetLoRA); B_pad @ A_pad == B @ A."""
    r = a.shape[0]
    if r > rank:
        raise LLMPruneError(f"a client sent rank {r}, above the global rank {rank}", "assign ranks up to --lora-rank")
    a_pad = np.zeros((rank, a.shape[1]), dtype=np.float32)
    b_pad = np.zeros((b.shape[0], rank), dtype=np.float32)
    a_pad[:r], b_pad[:, :r] = a, b
    return a_pad, b_pad


def all_modules(updates: list[ClientUpdate]) -> list[str]:
    from ..lora import modules_of  # lazily: the registry is read by the CLI parser, before torch is needed

    seen: dict[str, None] = {}
    for u in updates:
        for m in modules_of(u.arrays):
            seen.setdefault(m)
    return list(seen)


def weighted_sum(arrays: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    total = np.zeros(arrays[0].shape, dtype=np.float64)
    for wi, arr in zip(w, arrays):
        total += wi * arr
    return total.astype(np.float32)
