"""Gradient-free mask tuning: least squares on calibration statistics, folded into the output
projection.

For an output projection y = W x (+ b) whose inputs are restricted to a kept set S, we fit the
pruned layer to the dense one's output Y = X W_fullᵀ + b:
- `scales`: one multiplier m_j per kept input, min ‖Y − X_S diag(m) W_Sᵀ − 1cᵀ‖² + λ‖m − 1‖²,
  then W_S ← W_S diag(m);
- `refit`: the whole kept projection, min ‖Y − X_S Vᵀ − 1cᵀ‖² + λ‖V − W_S‖² over V.
The ridge shrinks towards plain pruning rather than towards zero, so the fit stays safe when
the calibration set has fewer tokens than the projection has inputs.
Both only need the Gram matrix XᵀX, the input sum and the token count, so no activations are
kept. The intercept c becomes an output bias, which also absorbs the mean of what was removed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibration import GramCollector


@dataclass
class FitResult:
    weight: torch.Tensor  # [out, k]
    bias: torch.Tensor | None  # [out]
    error_before: float  # relative output error of plain pruning (no tuning)
    error_after: float  # relative output error after the fit


def _stats(stats: GramCollector, intercept: bool):
    """Centered Gram and mean when fitting an intercept, else the raw Gram and zeros."""
    if intercept:
        return stats.covariance(), stats.mean
    return stats.gram, torch.zeros_like(stats.sum)


def _energy(gram: torch.Tensor, w: torch.Tensor) -> float:
    """‖X Wᵀ‖² from the Gram: tr(W G Wᵀ)."""
    return float(((w @ gram) * w).sum())


def _solve_scales(gram: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """One multiplier per kept column; the ridge pulls each scale towards 1 (plain pruning), not 0."""
    rows = gram.index_select(0, keep)  # G[S, :]
    ws = w[:, keep]
    rhs = (rows * (ws.T @ w)).sum(1)
    m_mat = rows[:, keep] * (ws.T @ ws)
    reg = ridge * m_mat.diagonal().mean().clamp_min(1e-30)
    m_mat.diagonal().add_(reg)
    m = torch.linalg.solve(m_mat, rhs + reg)
    return ws * m


def _solve_refit(gram: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """The whole kept projection. The ridge pulls V towards the plainly pruned W_S, not towards 0:
    directions the calibration data does not cover (fewer tokens than inputs) keep their weights."""
    rows = gram.index_select(0, keep)
    rhs = rows @ w.T
    g_ss = rows[:, keep]
    del rows
    reg = ridge * g_ss.diagonal().mean().clamp_min(1e-30)
    rhs += reg * w[:, keep].T
    g_ss.diagonal().add_(reg)
    return torch.linalg.solve(g_ss, rhs).T


def _relative_errors(gram: torch.Tensor, w: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> tuple[float, float]:
    """Relative output error of plain pruning and of the fit V, from the Gram."""
    ref = max(_energy(gram, w), 1e-30)
    removed = torch.ones(w.shape[1], dtype=torch.bool)
    removed[keep] = False
    removed = removed.nonzero().squeeze(1)
    # W minus its plainly pruned version is W on the removed columns alone: their block of the Gram suffices
    err_plain = _energy(gram.index_select(0, removed).index_select(1, removed), w.index_select(1, removed))
    full_v = torch.zeros_like(w)
    full_v[:, keep] = v
    full_v.neg_().add_(w)  # W − V over all inputs
    return err_plain / ref, _energy(gram, full_v) / ref


_SOLVERS = {"none": lambda gram, w, keep, ridge: w[:, keep], "scales": _solve_scales, "refit": _solve_refit}


def fit_output_projection(
    stats: GramCollector,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    mode: str = "scales",
    ridge: float = 1e-3,
    intercept: bool = True,
) -> FitResult:
    """Least-squares tuning of an output projection restricted to input columns `keep`.
    `mode` is 'none' (plain pruning, plus the intercept when asked), 'scales' or 'refit'."""
    if mode not in _SOLVERS:
        raise ValueError(f"unknown fit mode {mode!r}")
    gram, mu = _stats(stats, intercept)
    w = weight.to(gram.dtype)
    v = _SOLVERS[mode](gram, w, keep, ridge)
    base = w.new_zeros(w.shape[0]) if bias is None else bias.to(w.dtype)
    new_bias = None
    if intercept:
        # Output means match: b' = b + W μ − V μ_S.
        new_bias = base + w @ mu - v @ mu[keep]
    elif bias is not None:
        new_bias = base
    error_before, error_after = _relative_errors(gram, w, v, keep)
    dtype = weight.dtype
    return FitResult(weight=v.to(dtype), bias=None if new_bias is None else new_bias.to(dtype),
                     error_before=error_before, error_after=error_after)
