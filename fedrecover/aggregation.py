"""Server-side aggregation of LoRA adapters of possibly different ranks and depths.

Pure functions over dicts of canonical arrays (see lora.py). Every module is averaged over the
clients that hold it this round, weighted by their example counts; a module nobody held keeps
its previous value.

- fedavg: plain weighted average of A and B (all holders must share a rank).
- hetlora: zero-pad each client's A (rows) and B (columns) to the global rank, average; a client
  of rank r gets the first r rows/columns back (truncation).
- flexlora: average the products dW_i = B_i A_i; the average is kept exactly, as the
  concatenated factors [w_1 B_1 ... w_K B_K] / W and [A_1; ...; A_K]; a client of rank r gets
  the best rank-r factors of it (truncated SVD: B = U_r S_r, A = V_r^T)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmprune.errors import LLMPruneError

from .lora import modules_of


@dataclass
class ClientUpdate:
    """One client's uploaded adapter and its aggregation weight (its number of examples)."""

    arrays: dict[str, np.ndarray]
    weight: float
    client: str = ""


def holders(updates: list[ClientUpdate], module: str) -> list[ClientUpdate]:
    return [u for u in updates if f"{module}.A" in u.arrays]


def _weights(group: list[ClientUpdate]) -> np.ndarray:
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


def fedavg(updates: list[ClientUpdate], previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(previous)
    for module in _all_modules(updates):
        group = holders(updates, module)
        ranks = {u.arrays[f"{module}.A"].shape[0] for u in group}
        if len(ranks) > 1:
            raise LLMPruneError(f"clients sent different LoRA ranks {sorted(ranks)} for {module}",
                                "use --aggregation hetlora or flexlora for mixed ranks")
        w = _weights(group)
        for part in ("A", "B"):
            out[f"{module}.{part}"] = _weighted_sum([u.arrays[f"{module}.{part}"] for u in group], w)
    return out


def hetlora(updates: list[ClientUpdate], previous: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    out = dict(previous)
    for module in _all_modules(updates):
        group = holders(updates, module)
        w = _weights(group)
        padded = [pad_rank(u.arrays[f"{module}.A"], u.arrays[f"{module}.B"], rank) for u in group]
        out[f"{module}.A"] = _weighted_sum([p[0] for p in padded], w)
        out[f"{module}.B"] = _weighted_sum([p[1] for p in padded], w)
    return out


def flexlora(updates: list[ClientUpdate], previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(previous)
    for module in _all_modules(updates):
        group = holders(updates, module)
        w = _weights(group)
        out[f"{module}.B"] = np.concatenate([wi * u.arrays[f"{module}.B"] for wi, u in zip(w, group)], axis=1).astype(np.float32)
        out[f"{module}.A"] = np.concatenate([u.arrays[f"{module}.A"] for u in group], axis=0).astype(np.float32)
    return out


def aggregate(method: str, updates: list[ClientUpdate], previous: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The new global adapter from this round's uploads (see the module docstring)."""
    if not updates:
        return dict(previous)
    if method == "fedavg":
        return fedavg(updates, previous)
    if method == "hetlora":
        return hetlora(updates, previous, rank)
    if method == "flexlora":
        return flexlora(updates, previous)
    raise LLMPruneError(f"unknown aggregation '{method}'", "use fedavg, hetlora or flexlora")


def lowrank_svd(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best rank-`rank` factors (B_r = U_r S_r, A_r = V_r^T) of B @ A and all singular values,
    from thin QRs of the factors, never forming the [out, in] product."""
    qb, rb = np.linalg.qr(b.astype(np.float64))
    qa, ra = np.linalg.qr(a.astype(np.float64).T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    k = min(rank, s.size)
    b_r = (qb @ u[:, :k]) * s[:k]
    a_r = (qa @ vt[:k].T).T
    return b_r.astype(np.float32), a_r.astype(np.float32), s


def client_view(method: str, global_arrays: dict[str, np.ndarray], modules: list[str], rank: int,
                init: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a client of `rank` holding `modules` receives: rank-`rank` A and B per module.
    `init` (the seeded rank-R start) fills rank a flexlora average does not have yet, so every
    component the client trains starts with a non-zero A."""
    out = {}
    for module in modules:
        a, b = global_arrays[f"{module}.A"], global_arrays[f"{module}.B"]
        if method == "flexlora":
            if not b.any():
                a, b = init[f"{module}.A"], np.zeros_like(init[f"{module}.B"])
            else:
                b, a, _ = lowrank_svd(b, a, rank)
        if a.shape[0] < rank:
            a = np.concatenate([a, init[f"{module}.A"][a.shape[0]:rank]], axis=0)
            b = np.concatenate([b, np.zeros((b.shape[0], rank - b.shape[1]), np.float32)], axis=1)
        out[f"{module}.A"] = np.ascontiguousarray(a[:rank], dtype=np.float32)
        out[f"{module}.B"] = np.ascontiguousarray(b[:, :rank], dtype=np.float32)
    return out


def _all_modules(updates: list[ClientUpdate]) -> list[str]:
    seen: dict[str, None] = {}
    for u in updates:
        for m in modules_of(u.arrays):
            seen.setdefault(m)
    return list(seen)


def _weighted_sum(arrays: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    total = np.zeros(arrays[0].shape, dtype=np.float64)
    for wi, arr in zip(w, arrays):
        total += wi * arr
    return total.astype(np.float32)
