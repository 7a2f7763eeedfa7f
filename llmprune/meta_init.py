"""Filling a model built on the meta device (`llmprune.reader.meta_model`) from safetensors one
part at a time: the buffers `to_empty` leaves uninitialised, and module prefixes (state-dict names
of a submodule). Shared by compress --low-memory and the lean federated clients."""

from __future__ import annotations

import torch
from torch import nn


def reset_buffers(module: nn.Module, config) -> None:
    """Recompute the non-persistent buffers that to_empty leaves uninitialised: rotary inverse
    frequencies, and Gemma's embedding scale (√hidden_size)."""
    for child in module.modules():
        if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "config"):
            _rebuild_rotary(child)
        if isinstance(getattr(child, "embed_scale", None), torch.Tensor):
            child.embed_scale = torch.tensor(config.hidden_size**0.5)


def _rebuild_rotary(rotary: nn.Module) -> None:
    """A rotary module's tables and scalars, taken from a new instance of its class built from its
    own config on the CPU (transformers 5 keeps one table per attention kind and no
    `rope_init_fn`; 4.5x one table per module: building anew covers both)."""
    with torch.device("cpu"):
        fresh = type(rotary)(rotary.config)
    for name, buffer in fresh.named_buffers(recurse=False):
        setattr(rotary, name, buffer)
    for name, value in vars(fresh).items():
        if not name.startswith("_") and not isinstance(value, (torch.Tensor, nn.Module)):
            setattr(rotary, name, value)


def prefix_of(model: nn.Module, target: nn.Module) -> str:
    """The state-dict prefix of `target` inside `model` ("model." for the decoder of a *ForCausalLM)."""
    for name, module in model.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("module not found")
