"""random: seeded random neurons and heads (a different stream per layer)."""

from __future__ import annotations

import torch

from ..importance import random_scores
from . import PruningMethod


def neuron_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    return random_scores(layer.mlp.down_proj.in_features, cfg.seed, index)


def head_scores(layer, stats, cfg, index: int) -> torch.Tensor:
    attn = layer.self_attn
    return random_scores(attn.q_proj.out_features // attn.head_dim, cfg.seed + 7919, index)


METHOD = PruningMethod(name="random", summary="seeded random neurons", neuron_scores=neuron_scores,
                       head_scores=head_scores)
