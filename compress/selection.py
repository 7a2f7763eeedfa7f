"""Condition-aware selection: which columns of an output projection's input to keep.

With X the calibration inputs of an output projection (MLP intermediate activations for
down_proj) and w_j = ‖W[:, j]‖ the norm of column j's output weights, the weighted Gram matrix
G̃ = D XᵀX D (D = diag(w)) holds each neuron's output energy on its diagonal and the overlaps
between neurons off it. Greedy pivoted Cholesky on G̃ picks, at each step, the neuron with the
most output energy not already explained by the ones chosen — so the kept set X_S is large *and*
well conditioned, which is what the least-squares mask tuning that follows needs."""

from __future__ import annotations

import numpy as np
import torch


def weighted_gram(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """D G D for D = diag(weights), in the Gram's precision."""
    w = weights.to(gram.dtype)
    return gram * torch.outer(w, w)


def pivot_order(gram: torch.Tensor, out_weight: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, np.ndarray]:
    """Greedy pivot order of the weighted Gram (LAPACK pivoted Cholesky, dpstrf) and the error curve
    of that order: curve[k] = ‖X Wᵀ − X_S V*ᵀ‖² / ‖X Wᵀ‖² for S the first k pivots and V* the
    least-squares refit on S. With G̃ = UᵀU in pivot order, the part of X no fit on S can explain
    is U[k:]ᵀU[k:], so the whole curve is one matrix product.

    A ridge of `ridge`·mean(diag) keeps the factorisation full-rank when there are fewer
    calibration tokens than columns; past the data's rank the order follows the diagonal."""
    from scipy.linalg import lapack

    w = out_weight.to(gram.dtype).norm(dim=0).clamp_min(1e-30)
    g = weighted_gram(gram, w).numpy().copy()
    n = g.shape[0]
    g[np.diag_indices(n)] += ridge * max(float(np.mean(np.diag(g))), 1e-30)
    pstrf = lapack.dpstrf if g.dtype == np.float64 else lapack.spstrf
    u, piv, rank, _ = pstrf(g, lower=0, tol=-1.0, overwrite_a=True)
    del g
    order = (piv - 1).astype(np.int64)
    u = np.triu(u)
    if rank < n:  # rank-deficient even with the ridge: the tail is left unfactored by LAPACK
        u[rank:, rank:] = 0.0
        diag = (gram.diagonal() * w * w).numpy()
        rest = order[rank:][np.argsort(-diag[order[rank:]], kind="stable")]
        order = np.concatenate([order[:rank], rest])
    scaled = (out_weight.to(gram.dtype) / w).numpy()[:, order]  # W D⁻¹ in pivot order
    energy = ((u @ scaled.T) ** 2).sum(1).astype(np.float64)
    curve = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return torch.from_numpy(order), curve / max(curve[0], 1e-300)


def select_neurons(gram: torch.Tensor, out_weight: torch.Tensor, keep: int, ridge: float = 1e-6) -> torch.Tensor:
    """Indices (sorted) of the `keep` columns chosen by pivoted selection on the weighted Gram."""
    return pivot_order(gram, out_weight, ridge)[0][:keep].sort().values


def top_k(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (sorted) of the `keep` largest scores; ties broken by index for determinism."""
    order = np.lexsort((np.arange(scores.numel()), -scores.double().numpy()))
    return torch.from_numpy(order[:keep].astype(np.int64)).sort().values


def condition_number(gram: torch.Tensor, out_weight: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """κ(X_S D_S): square root of the eigenvalue ratio of the weighted Gram of the kept set."""
    g = weighted_gram(gram, out_weight.double().norm(dim=0))
    if keep is not None:
        g = g[keep][:, keep]
    eig = torch.linalg.eigvalsh(g)
    low = float(eig[0])
    return float("inf") if low <= 0 else float(np.sqrt(float(eig[-1]) / low))


def energy_order(gram: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """Columns by their output energy ‖x_j‖²·‖W[:, j]‖² — the diagonal of the weighted Gram, i.e.
    the first step of the pivoted selection without its redundancy updates (the same ranking as
    Wanda-SP); ties by index."""
    energy = gram.diagonal().double().clamp_min(0) * out_weight.double().norm(dim=0) ** 2
    return torch.from_numpy(np.lexsort((np.arange(energy.numel()), -energy.numpy())).astype(np.int64))


def refit_error_curve(gram: torch.Tensor, out_weight: torch.Tensor, order: torch.Tensor, ridge: float = 1e-6) -> np.ndarray:
    """curve[k] = relative refit error ‖XWᵀ − X_S V*ᵀ‖²/‖XWᵀ‖² when S is the first k columns of
    `order`: one Cholesky factorisation of the Gram in that order (G_p = UᵀU; what a fit on the
    first k columns cannot explain is U[k:]ᵀU[k:])."""
    # In the Gram's precision (float32 for wide layers) and factorised in place: at 7B shape
    # each extra copy of the Gram is half a gigabyte. With fewer calibration tokens than columns
    # the Gram is singular; the ridge grows tenfold until the factorisation succeeds.
    scale = float(gram.diagonal().mean().clamp_min(1e-30))
    info = torch.zeros((), dtype=torch.int32)
    while True:
        g = gram.index_select(0, order).index_select(1, order)
        g.diagonal().add_(ridge * scale)
        torch.linalg.cholesky_ex(g, upper=True, out=(g, info))
        if int(info) == 0 or ridge >= 1.0:
            break
        del g
        ridge *= 10.0
    energy = ((g @ out_weight.to(g.dtype)[:, order].T) ** 2).sum(1).double().numpy()  # g is now U (lower part zeroed)
    curve = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return curve / max(curve[0], 1e-300)
