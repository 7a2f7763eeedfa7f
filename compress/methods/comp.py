"""comp: neurons in the order of the condition-aware selection (energy or pivoted Cholesky on the
weighted Gram), heads by their output energy; least-squares tuning; auto layer split."""

from __future__ import annotations

import torch

from ..importance import head_output_energy
from . import PruningMethod


def neuron_order(layer, stats, cfg, index: int) -> torch.Tensor:
    # Cached on the LayerStats: every keep count and split candidate shares one order per layer.
    return stats.pivots(layer.mlp.down_proj.weight.detach(), cfg.selection)[0]


def head_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    attn = layer.self_attn
    return head_output_energy(stats.attn, attn.o_proj.weight.detach(), attn.head_dim)


METHOD = PruningMethod(
    name="comp", summary="block-influence layer removal + condition-aware neuron selection + least-squares tuning",
    neuron_order=neuron_order, head_scores=head_scores, layer_share="auto", allocation="error", tunes=True,
    intercept="option",
)
