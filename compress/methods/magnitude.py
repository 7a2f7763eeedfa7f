"""magnitude: ‖gate_j‖ + ‖up_j‖ + ‖down_j‖ per neuron; ‖q_h‖ + ‖o_h‖ per head."""

from __future__ import annotations

import torch

from ..importance import magnitude_neurons
from . import PruningMethod


def neuron_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    mlp = layer.mlp
    return magnitude_neurons(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())


def head_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    attn = layer.self_attn
    q, o = attn.q_proj.weight.detach(), attn.o_proj.weight.detach()
    heads = q.shape[0] // attn.head_dim
    return q.double().reshape(heads, -1).norm(dim=1) + o.double().T.reshape(heads, -1).norm(dim=1)


METHOD = PruningMethod(name="magnitude", summary="weight norms of each neuron's rows and column",
                       neuron_scores=neuron_scores, head_scores=head_scores)
