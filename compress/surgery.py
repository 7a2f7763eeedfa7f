"""Shape-changing operations on a loaded model. Scoring and selection live elsewhere: these take
the indices to keep and the new weights, and keep config and modules consistent."""

from __future__ import annotations

import torch
from torch import nn

from llmprune.arch import adapter_for, base_model, install_layers  # noqa: F401 - install_layers: compress's name too


def _sub_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.requires_grad_(old.weight.requires_grad)  # a frozen model stays frozen
    return new


def drop_layers(model: nn.Module, drop: list[int]) -> list[int]:
    """Remove decoder layers by current index; re-index the survivors and the config.
    Returns the current indices of the kept layers."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    if 0 in drop:
        raise ValueError("layer 0 is never removed")
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    if not keep:
        raise ValueError("dropping every layer")
    base_model(model).layers = nn.ModuleList([layers[i] for i in keep])
    config = model.config
    types = adapter.layer_types(config)
    config.num_hidden_layers = len(keep)
    if types:
        config.layer_types = [types[i] for i in keep]
    for new_idx, layer in enumerate(base_model(model).layers):
        # The KV cache is indexed by layer_idx: keep it equal to the position in the stack.
        layer.layer_idx = new_idx
        adapter.attention(layer).layer_idx = new_idx
    return keep


def prune_mlp_neurons(layer: nn.Module, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                      down_bias: torch.Tensor | None = None, adapter=None) -> None:
    """Keep intermediate neurons `keep` (sorted indices). `down_weight` ([hidden, len(keep)]) and
    `down_bias` replace the output projection when given (mask tuning / refit)."""
    mlp = layer.mlp
    keep = keep.sort().values
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    mlp.gate_proj = _sub_linear(gate, gate.weight[keep], gate.bias[keep] if gate.bias is not None else None)
    mlp.up_proj = _sub_linear(up, up.weight[keep], up.bias[keep] if up.bias is not None else None)
    weight = down.weight[:, keep] if down_weight is None else down_weight
    bias = down_bias if down_bias is not None else down.bias
    mlp.down_proj = _sub_linear(down, weight, bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


def prune_query_heads(layer: nn.Module, keep_heads: torch.Tensor, o_weight: torch.Tensor | None = None,
                      o_bias: torch.Tensor | None = None) -> None:
    """Keep query heads `keep_heads` (indices into the current heads). Each KV group must keep the
    same number of query heads, and heads stay grouped by their KV head (consecutive blocks)."""
    attn = layer.self_attn
    hd = attn.head_dim
    kv = attn.k_proj.out_features // hd
    heads = attn.q_proj.out_features // hd
    keep_heads = keep_heads.sort().values
    groups = heads // kv
    per_group = torch.bincount(keep_heads // groups, minlength=kv)
    if not bool((per_group == per_group[0]).all()) or int(per_group[0]) == 0:
        raise ValueError(f"query heads must be kept evenly across the {kv} KV groups (got {per_group.tolist()})")
    cols = (keep_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
    q, o = attn.q_proj, attn.o_proj
    attn.q_proj = _sub_linear(q, q.weight[cols], q.bias[cols] if q.bias is not None else None)
    weight = o.weight[:, cols] if o_weight is None else o_weight
    attn.o_proj = _sub_linear(o, weight, o_bias if o_bias is not None else o.bias)
    attn.num_key_value_groups = int(per_group[0])


def head_columns(head_indices: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj input columns of the given heads."""
    return (head_indices[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
