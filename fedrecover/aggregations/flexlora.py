"""flexlora: average the products dW_i = B_i A_i; the average is kept exactly, as the concatenated
factors [w_1 B_1 ... w_K B_K] and [A_1; ...; A_K]; a client of rank r gets the best rank-r factors
of it (truncated SVD: B = U_r S_r, A = V_r^T). SecAgg+ cannot carry it: a masked sum of factors
is not the average of their products."""

from __future__ import annotations

import numpy as np

from .base import Aggregation, Arrays, ClientUpdate, all_modules, fill_rank, holders, register, weights


def flexlora(updates: list[ClientUpdate], previous: Arrays, rank: int | None = None) -> Arrays:
    out = dict(previous)
    for module in all_modules(updates):
        group = holders(updates, module)
        w = weights(group)
        out[f"{module}.B"] = np.concatenate([wi * u.arrays[f"{module}.B"] for wi, u in zip(w, group)], axis=1).astype(np.float32)
        out[f"{module}.A"] = np.concatenate([u.arrays[f"{module}.A"] for u in group], axis=0).astype(np.float32)
    return out


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


def flexlora_view(global_arrays: Arrays, modules: list[str], rank: int, init: Arrays) -> Arrays:
    """Rank-`rank` SVD factors of each module's averaged product; before any average exists (B
    all zero) the seeded init, so every component the client trains starts with a non-zero A."""
    out = {}
    for module in modules:
        a, b = global_arrays[f"{module}.A"], global_arrays[f"{module}.B"]
        if not b.any():
            a, b = init[f"{module}.A"], np.zeros_like(init[f"{module}.B"])
        else:
            b, a, _ = lowrank_svd(b, a, rank)
        a, b = fill_rank(a, b, rank, init[f"{module}.A"])
        out[f"{module}.A"] = np.ascontiguousarray(a[:rank], dtype=np.float32)
        out[f"{module}.B"] = np.ascontiguousarray(b[:, :rank], dtype=np.float32)
    return out


register(Aggregation("flexlora", flexlora, client_view=flexlora_view, secagg=False,
                     help="mixed ranks: exact mean of the products B·A, SVD back to each client's rank"))
