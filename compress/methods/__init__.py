"""The pruning-method registry: one `PruningMethod` entry per method, one small module per method.

A method says how to score one layer's MLP neurons and query heads (pure functions of the layer's
weights and calibration statistics, Wanda style; higher = keep) and what it defaults to. The rest
of compress (config validation, the budget, the pipeline) only reads these entries, so adding a
method is one module here plus one `register_method` line below (docs/compress.md shows one)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmprune.errors import LLMPruneError

# (layer, stats: LayerStats, cfg: CompressConfig, index: int) -> scores or order (torch.Tensor)
LayerScore = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class PruningMethod:
    """One pruning method.

    neuron_scores / head_scores: per-neuron / per-query-head importance (higher = keep).
    neuron_order: instead of neuron_scores, the neurons best first (comp: an order that is shared
        by every keep count, computed once per layer).
    layer_share: default share of the budget taken as whole layers ('auto': try each count).
    allocation: default neurons-per-layer rule ('uniform' or 'error').
    tunes: whether `fit` (least-squares tuning of the output projections) applies.
    intercept: 'never', 'option' (with `intercept=True`) or 'always' fits an output bias.
    needs_gradients: calibration also runs a full backward pass (the taylor reference).
    low_memory: works with `--low-memory` (one layer in memory at a time)."""

    name: str
    summary: str
    head_scores: LayerScore
    neuron_scores: LayerScore | None = None
    neuron_order: LayerScore | None = None
    layer_share: float | str = 0.0
    allocation: str = "uniform"
    tunes: bool = False
    intercept: str = "never"
    needs_gradients: bool = False
    low_memory: bool = True

    def __post_init__(self) -> None:
        if (self.neuron_scores is None) == (self.neuron_order is None):
            raise ValueError(f"method {self.name!r}: give exactly one of neuron_scores and neuron_order")
        if self.intercept not in ("never", "option", "always"):
            raise ValueError(f"method {self.name!r}: intercept must be 'never', 'option' or 'always'")


def column_scorers(score: Callable) -> tuple[LayerScore, LayerScore]:
    """Neuron and head scorers of a method that scores the input columns of an output projection
    (`score(stats, weight)`, Wanda style): neurons are down_proj's columns, a head sums its o_proj
    columns."""
    from ..importance import head_scores_from_columns

    def neuron_scores(layer, stats, cfg, index: int) -> torch.Tensor:
        return score(stats.mlp, layer.mlp.down_proj.weight.detach())

    def head_scores(layer, stats, cfg, index: int) -> torch.Tensor:
        attn = layer.self_attn
        return head_scores_from_columns(score(stats.attn, attn.o_proj.weight.detach()), attn.head_dim)

    return neuron_scores, head_scores


METHODS: dict[str, PruningMethod] = {}


def register_method(method: PruningMethod) -> PruningMethod:
    """Add (or replace) a method; `--method NAME` and CompressConfig(method=NAME) accept it."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> PruningMethod:
    if name not in METHODS:
        raise LLMPruneError(f"unknown method '{name}'", f"choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def _register(module: str) -> None:
    register_method(importlib.import_module(f"{__name__}.{module}").METHOD)


# One line per method (this order is the order of --help).
_register("comp")
_register("layer_only")
_register("wanda_sp")
_register("magnitude")
_register("fluctuation")
_register("seeded_random")
_register("taylor")
