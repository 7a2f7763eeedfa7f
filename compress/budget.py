"""Parameter budget: how many layers, heads and neurons a ratio removes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmprune.errors import LLMPruneError


@dataclass(frozen=True)
class LayerBudget:
    """The sizes of one decoder layer that the budget needs (JSON-able, so a saved Calibration can
    resolve plans without the model)."""

    params: int
    width: int  # MLP intermediate neurons (down_proj inputs)
    hidden_out: int  # down_proj outputs
    neuron_params: int  # parameters tied to one neuron
    heads: int
    kv_heads: int
    head_params: int  # parameters tied to one query head
    o_out: int  # o_proj outputs
    mlp_out_bias: bool
    attn_out_bias: bool

    @classmethod
    def of(cls, layer) -> "LayerBudget":
        if isinstance(layer, cls):
            return layer
        mlp, attn = layer.mlp, layer.self_attn
        hd = attn.head_dim
        neuron = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
        neuron += int(mlp.gate_proj.bias is not None) + int(mlp.up_proj.bias is not None)
        head = hd * attn.q_proj.in_features + hd * int(attn.q_proj.bias is not None) + hd * attn.o_proj.out_features
        return cls(params=sum(p.numel() for p in layer.parameters()), width=mlp.down_proj.in_features,
                   hidden_out=mlp.down_proj.out_features, neuron_params=neuron,
                   heads=attn.q_proj.out_features // hd, kv_heads=attn.k_proj.out_features // hd,
                   head_params=head, o_out=attn.o_proj.out_features,
                   mlp_out_bias=mlp.down_proj.bias is not None, attn_out_bias=attn.o_proj.bias is not None)


def layer_params(layer) -> int:
    return LayerBudget.of(layer).params


def neuron_params(layer) -> int:
    """Parameters tied to one MLP intermediate neuron (gate row, up row, down column)."""
    return LayerBudget.of(layer).neuron_params


def head_params(layer) -> int:
    """Parameters tied to one query head (q rows and o_proj columns)."""
    return LayerBudget.of(layer).head_params


@dataclass
class Plan:
    """The structure of one pruned model: dropped layers and per-layer kept counts."""

    drop: list[int]
    keep_neurons: dict[int, int] = field(default_factory=dict)  # layer index -> kept neurons
    keep_heads: dict[int, int] = field(default_factory=dict)  # layer index -> kept query heads


def choose_drop(block_influence: list[float], n_drop: int) -> list[int]:
    """The n_drop layers with the lowest block influence, never layer 0."""
    order = sorted(range(1, len(block_influence)), key=lambda i: (block_influence[i], i))
    return sorted(order[:n_drop])


def heads_to_keep(layer, head_ratio: float) -> int:
    """Query heads kept per layer: a multiple of the KV-head count (even groups), at least one per group."""
    b = LayerBudget.of(layer)
    kv, heads = b.kv_heads, b.heads
    groups = heads // kv
    if groups <= 1:
        return heads
    per_group = max(1, int(round(groups * (1.0 - head_ratio))))
    return per_group * kv


def neuron_counts(widths: dict[int, int], remove: int) -> dict[int, int]:
    """Kept neurons per layer when `remove` neurons are taken uniformly (same fraction per layer;
    rounding remainders go to the largest fractional parts, ties to the lower index)."""
    total = sum(widths.values())
    if remove >= total:
        raise LLMPruneError(
            "this ratio would leave no MLP neuron in the kept layers",
            "lower --ratio, allow whole layers (--layer-share) or prune heads (--prune-heads)",
        )
    frac = remove / total
    exact = {i: w * frac for i, w in widths.items()}
    removed = {i: int(np.floor(x)) for i, x in exact.items()}
    left = remove - sum(removed.values())
    for i in sorted(exact, key=lambda i: (-(exact[i] - removed[i]), i))[:left]:
        removed[i] += 1
    kept = {i: widths[i] - removed[i] for i in widths}
    if min(kept.values()) < 1:
        raise LLMPruneError("this ratio would leave a layer with no MLP neuron", "lower --ratio or use --layer-share")
    return kept


def uniform_width_counts(widths: dict[int, int], remove: int, multiple: int) -> dict[int, int]:
    """Kept neurons per layer when every layer keeps the same width, a multiple of `multiple`,
    removing at least `remove` neurons in all (the width is rounded down)."""
    width = (sum(widths.values()) - remove) // len(widths) // multiple * multiple
    if width < multiple:
        raise LLMPruneError(f"--uniform at this ratio leaves fewer than {multiple} MLP neurons per layer",
                            "lower --ratio, drop more whole layers (--layer-share), or give a smaller --uniform-multiple")
    narrow = {i: w for i, w in widths.items() if w < width}
    if narrow:
        raise LLMPruneError(f"--uniform width {width} is wider than layer {next(iter(narrow))} already is "
                            f"({next(iter(narrow.values()))} neurons)", "prune this model without --uniform")
    return {i: width for i in widths}


def error_allocation(widths: dict[int, int], remove: int, curves: dict[int, np.ndarray], min_keep: float) -> dict[int, int]:
    """Kept neurons per layer minimising Σ_layers curve_ℓ(k_ℓ) (relative refit error) for a total
    of `remove` removed neurons: greedy on the marginal error, each layer keeping at least
    `min_keep` of its width (the curves are near-convex, so greedy is near-optimal)."""
    import heapq

    keep = dict(widths)
    floor = {i: max(1, int(np.ceil(min_keep * w))) for i, w in widths.items()}
    if remove > sum(keep[i] - floor[i] for i in keep):
        raise LLMPruneError(
            "this ratio would prune some layer below the minimum kept fraction of neurons",
            "lower --ratio, allow whole layers (--layer-share) or prune heads (--prune-heads)",
        )
    heap = [(curves[i][keep[i] - 1] - curves[i][keep[i]], i) for i in keep if keep[i] > floor[i]]
    heapq.heapify(heap)
    for _ in range(remove):
        _, i = heapq.heappop(heap)
        keep[i] -= 1
        if keep[i] > floor[i]:
            heapq.heappush(heap, (curves[i][keep[i] - 1] - curves[i][keep[i]], i))
    return keep


def make_plan(layers: list, block_influence: list[float], ratio: float, n_drop: int,
              head_ratio: float | None = None, output_bias: bool = False,
              curves: dict[int, np.ndarray] | None = None, min_keep: float = 0.25,
              uniform_multiple: int | None = None) -> Plan:
    """A plan removing `ratio` of the decoder parameters: n_drop whole layers, then query heads
    (if head_ratio), then MLP neurons for the rest. `output_bias`: the least-squares fit adds a
    bias to each pruned output projection, paid for from the budget. `layers`: modules or
    LayerBudget records. `uniform_multiple`: every kept layer the same width, a multiple of it."""
    layers = [LayerBudget.of(l) for l in layers]
    total = sum(l.params for l in layers)
    target = ratio * total
    drop = choose_drop(block_influence, n_drop)
    kept_layers = [i for i in range(len(layers)) if i not in drop]
    if not kept_layers:
        raise LLMPruneError("this ratio would leave no decoder layer", "lower --ratio or --layer-share")
    remaining = target - sum(layers[i].params for i in drop)
    if remaining < 0:
        raise LLMPruneError(f"dropping {n_drop} layers removes more than --ratio {ratio}", "use a smaller --layer-share")
    plan = Plan(drop=drop)
    if head_ratio:
        for i in kept_layers:
            kept = heads_to_keep(layers[i], head_ratio)
            if kept < layers[i].heads:
                plan.keep_heads[i] = kept
                remaining -= (layers[i].heads - kept) * layers[i].head_params
        if remaining < 0:
            raise LLMPruneError("--head-ratio alone removes more than --ratio", "lower --head-ratio")
    if output_bias:
        for i in kept_layers:
            remaining += layers[i].hidden_out * int(not layers[i].mlp_out_bias)
            if i in plan.keep_heads:
                remaining += layers[i].o_out * int(not layers[i].attn_out_bias)
    widths = {i: layers[i].width for i in kept_layers}
    per_neuron = layers[kept_layers[0]].neuron_params
    remove = int(round(remaining / per_neuron))
    if uniform_multiple:
        plan.keep_neurons = uniform_width_counts(widths, max(remove, 0), uniform_multiple)
    elif curves is not None:
        plan.keep_neurons = error_allocation(widths, remove, curves, min_keep)
    else:
        plan.keep_neurons = neuron_counts(widths, remove)
    return plan


def max_droppable(layers: list, ratio: float) -> int:
    """How many whole layers fit in the budget (never all, never layer 0)."""
    total = sum(layer_params(l) for l in layers)
    per_layer = layer_params(layers[-1])
    return int(min(len(layers) - 1, np.floor(ratio * total / per_layer + 1e-9)))
