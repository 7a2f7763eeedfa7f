"""fluctuation (FLAP): var(x_j)·‖W_down[:, j]‖², with its bias compensation (the removed neurons'
mean output becomes an output bias)."""

from __future__ import annotations

import torch

from ..importance import fluctuation, head_scores_from_columns
from . import PruningMethod


def neuron_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    return fluctuation(stats.mlp, layer.mlp.down_proj.weight.detach())


def head_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    attn = layer.self_attn
    return head_scores_from_columns(fluctuation(stats.attn, attn.o_proj.weight.detach()), attn.head_dim)


METHOD = PruningMethod(name="fluctuation", summary="FLAP: output fluctuation, with bias compensation",
                       neuron_scores=neuron_scores, head_scores=head_scores, intercept="always")
