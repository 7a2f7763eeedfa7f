"""Neuron and head importance scores of the baseline methods, as small pure functions of one
layer's weights and calibration statistics (Wanda style). Higher = more important."""

from __future__ import annotations

import torch

from .calibration import GramCollector


def magnitude_neurons(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, **_) -> torch.Tensor:
    """Sum of the L2 norms of a neuron's gate row, up row and down column."""
    return gate.double().norm(dim=1) + up.double().norm(dim=1) + down.double().norm(dim=0)


def wanda_sp(stats: GramCollector, down: torch.Tensor, **_) -> torch.Tensor:
    """Structured Wanda: ‖x_j‖·‖W_down[:, j]‖."""
    return stats.gram.diagonal().clamp_min(0).sqrt() * down.double().norm(dim=0)


def fluctuation(stats: GramCollector, down: torch.Tensor, **_) -> torch.Tensor:
    """FLAP: the variance of x_j across tokens times ‖W_down[:, j]‖² (the output fluctuation a
    removed neuron causes; its mean is restored by a bias)."""
    var = stats.covariance().diagonal().clamp_min(0) / max(stats.count - 1, 1)
    return var * down.double().norm(dim=0) ** 2


def random_scores(n: int, seed: int, layer_index: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100003 + layer_index)
    return torch.rand(n, generator=generator, dtype=torch.float64)


def taylor_neurons(gate, up, down, gate_grad, up_grad, down_grad, **_) -> torch.Tensor:
    """LLM-Pruner's first-order Taylor importance of a neuron's weight group: |Σ w·∂L/∂w|."""
    s = (gate.double() * gate_grad.double()).sum(1) + (up.double() * up_grad.double()).sum(1)
    s = s + (down.double() * down_grad.double()).sum(0)
    return s.abs()


def head_output_energy(stats: GramCollector, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """‖Z_h W_o,hᵀ‖²: the energy a head contributes to the attention output, from the Gram of the
    o_proj inputs."""
    heads = o_weight.shape[1] // head_dim
    w = o_weight.double()
    energy = torch.empty(heads, dtype=torch.float64)
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        wh = w[:, cols]
        energy[h] = torch.trace(wh @ stats.gram[cols, cols] @ wh.T)
    return energy


def head_scores_from_columns(column_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A head's score as the sum of its o_proj input columns' scores."""
    return column_scores.reshape(-1, head_dim).sum(1)
