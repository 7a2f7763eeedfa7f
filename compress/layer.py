"""Pruning one decoder layer: choose the kept heads and neurons (scoring/selection), fit the
output projections (mask tuning), then change the shapes (surgery)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .calibration import GramCollector
from .config import CompressConfig
from .mask_tuning import fit_output_projection
from .selection import condition_number, energy_order, pivot_order, refit_error_curve, top_k
from .surgery import head_columns, prune_mlp_neurons, prune_query_heads


@dataclass
class LayerStats:
    """Calibration statistics of one layer, from the streamed pass."""

    mlp: GramCollector
    attn: GramCollector | None = None
    grads: dict[str, torch.Tensor] | None = None  # taylor: accumulated gradients by parameter name
    _orders: dict = field(default_factory=dict, repr=False)

    def pivots(self, down_weight: torch.Tensor, selection: str = "energy") -> tuple[torch.Tensor, np.ndarray]:
        """comp's neuron order (best first) and its refit-error curve, computed once per layer
        and shared by every keep count and split candidate. 'pivot': greedy pivoted Cholesky on
        the weighted Gram (condition-aware); 'energy': its diagonal (output energy)."""
        if selection not in self._orders:
            if selection == "pivot":
                self._orders[selection] = pivot_order(self.mlp.gram, down_weight)
            else:
                order = energy_order(self.mlp.gram, down_weight)
                self._orders[selection] = (order, refit_error_curve(self.mlp.gram, down_weight, order))
        return self._orders[selection]


def select_kept_neurons(layer: nn.Module, stats: LayerStats, cfg: CompressConfig, index: int, keep: int) -> torch.Tensor:
    """Indices (sorted) of the `keep` neurons the method ranks best."""
    width = layer.mlp.down_proj.in_features
    if keep >= width:
        return torch.arange(width)
    method = cfg.pruning_method
    if method.neuron_order is not None:
        return method.neuron_order(layer, stats, cfg, index)[:keep].sort().values
    return top_k(method.neuron_scores(layer, stats, cfg, index), keep)


def select_kept_heads(layer: nn.Module, stats: LayerStats, cfg: CompressConfig, index: int, keep: int) -> torch.Tensor:
    """Best heads within each KV group, the same number per group (heads of a group are consecutive)."""
    attn = layer.self_attn
    hd = attn.head_dim
    heads = attn.q_proj.out_features // hd
    kv = attn.k_proj.out_features // hd
    groups = heads // kv
    per_group = keep // kv
    scores = cfg.pruning_method.head_scores(layer, stats, cfg, index).reshape(kv, groups)
    chosen = [g * groups + top_k(scores[g], per_group) for g in range(kv)]
    return torch.cat(chosen).sort().values


def prune_layer(layer: nn.Module, stats: LayerStats, cfg: CompressConfig, index: int,
                keep_neurons: int | None, keep_heads: int | None, fit_mode: str | None = None,
                release_stats: bool = False, kappa: bool = False) -> dict:
    """Prune one layer in place; returns its report details (kept heads and neuron indices,
    reconstruction errors, with `kappa` the condition number κ of the kept neurons' weighted Gram).
    `release_stats` frees the MLP Gram once fitted (the --low-memory path uses each layer once)."""
    fit_mode = cfg.fit_mode if fit_mode is None else fit_mode
    row: dict = {}
    attn = layer.self_attn
    heads = attn.q_proj.out_features // attn.head_dim
    if keep_heads is not None and keep_heads < heads:
        kept = select_kept_heads(layer, stats, cfg, index, keep_heads)
        cols = head_columns(kept, attn.head_dim)
        fit = fit_output_projection(stats.attn, attn.o_proj.weight.detach(), attn.o_proj.bias, cols,
                                    mode=fit_mode, ridge=cfg.ridge, intercept=cfg.uses_intercept)
        prune_query_heads(layer, kept, fit.weight, fit.bias)
        row.update(kept_heads=kept.tolist(), attn_error_before=fit.error_before, attn_error_after=fit.error_after)
    width = layer.mlp.down_proj.in_features
    if keep_neurons is not None and keep_neurons < width:
        kept = select_kept_neurons(layer, stats, cfg, index, keep_neurons)
        down = layer.mlp.down_proj
        fit = fit_output_projection(stats.mlp, down.weight.detach(), down.bias, kept,
                                    mode=fit_mode, ridge=cfg.ridge, intercept=cfg.uses_intercept)
        if kappa:  # from the dense weights and the Gram, so before either is released
            row["kappa_kept"] = condition_number(stats.mlp.gram, down.weight.detach(), kept)
        if release_stats:  # the caller is done with this layer's statistics: free them before surgery
            stats.mlp.gram = None
        prune_mlp_neurons(layer, kept, fit.weight, fit.bias)
        row.update(kept_neuron_indices=kept, mlp_error_before=fit.error_before, mlp_error_after=fit.error_after)
    return row
