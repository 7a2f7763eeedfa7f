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
        if hasattr(child, "inv_freq") and hasattr(child, "rope_init_fn"):
            inv_freq, scaling = child.rope_init_fn(child.config, torch.device("cpu"))
            child.inv_freq = inv_freq
            child.original_inv_freq = inv_freq
            child.attention_scaling = scaling
        if isinstance(getattr(child, "embed_scale", None), torch.Tensor):
            child.embed_scale = torch.tensor(config.hidden_size**0.5)


def prefix_of(model: nn.Module, target: nn.Module) -> str:
    """The state-dict prefix of `target` inside `model` ("model." for the decoder of a *ForCausalLM)."""
    for name, module in model.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("module not found")
