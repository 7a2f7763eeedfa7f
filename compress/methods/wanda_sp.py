"""wanda-sp (structured Wanda): ‖x_j‖·‖W_down[:, j]‖, uniform per layer; heads sum their o_proj columns."""

from __future__ import annotations

import torch

from ..importance import head_scores_from_columns, wanda_sp
from . import PruningMethod


def neuron_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    return wanda_sp(stats.mlp, layer.mlp.down_proj.weight.detach())


def head_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    attn = layer.self_attn
    return head_scores_from_columns(wanda_sp(stats.attn, attn.o_proj.weight.detach()), attn.head_dim)


METHOD = PruningMethod(name="wanda-sp", summary="structured Wanda: ‖x_j‖·‖W_down[:, j]‖",
                       neuron_scores=neuron_scores, head_scores=head_scores)
