"""taylor (LLM-Pruner): |Σ w·∂L/∂w| over a neuron's (head's) weights, from a full backward pass per
calibration window — the memory-hungry reference, so it has no low-memory path."""

from __future__ import annotations

import torch

from ..importance import taylor_neurons
from . import PruningMethod


def neuron_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    mlp, g = layer.mlp, stats.grads
    return taylor_neurons(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach(),
                          g["gate_proj"], g["up_proj"], g["down_proj"])


def head_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    attn, g = layer.self_attn, stats.grads
    q, o = attn.q_proj.weight.detach(), attn.o_proj.weight.detach()
    heads = q.shape[0] // attn.head_dim
    s = (q.double() * g["q_proj"].double()).reshape(heads, -1).sum(1)
    s = s + (o.double() * g["o_proj"].double()).T.reshape(heads, -1).sum(1)
    return s.abs()


METHOD = PruningMethod(name="taylor", summary="LLM-Pruner: first-order gradient importance (needs gradients)",
                       neuron_scores=neuron_scores, head_scores=head_scores, needs_gradients=True, low_memory=False)
