"""What each decoder layer is called with, so that any layer can be run on its own.

The model's own forward builds the attention masks, rotary position embeddings and cache positions
before its decoder loop; `layer_calls` runs that forward with every layer replaced by a catcher
that records its call and passes the hidden states on, and ends the pass at the last layer. The
result is the embedding's output and each layer's keyword arguments, which hold for any batch of
windows of the same length without padding (masks and rotary tables broadcast over the batch).
Used by compress's streamed calibration and by fedrecover's split training."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .arch import adapter_for, base_model


class _StackDone(Exception):
    """Raised by the last catcher: nothing after the decoder stack needs to run."""


class _Catcher(nn.Module):
    """Stands in for decoder layer `index` and records its call. Returns a 1-tuple: where the
    stack's loop takes `[0]` of what a layer returned (Gemma-3 under transformers 4.5x) the next
    catcher gets the hidden states, where it passes the result on as it is (5.x, the other
    families) the next catcher gets the tuple; either way only the catcher of layer 0 keeps what
    it receives (the embedding's output), and the last catcher ends the pass before anything
    else reads a layer's output."""

    def __init__(self, index: int, attention_type: str | None, last: bool, store: dict):
        super().__init__()
        self.index, self.attention_type, self.last, self.store = index, attention_type, last, store

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to take keyword arguments after hidden_states")
        if self.index == 0:
            self.store["hidden"] = hidden_states
        captured = self.store.setdefault("kwargs", {})
        if self.index not in captured:  # the first call: broadcastable arguments
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
            kwargs["use_cache"] = False
            captured[self.index] = kwargs
        if self.last:
            raise _StackDone
        return (hidden_states,)


@contextmanager
def _catchers(model: nn.Module, store: dict):
    base = base_model(model)
    original = base.layers
    adapter = adapter_for(model)
    types = adapter.layer_types(model.config)
    base.layers = nn.ModuleList(
        _Catcher(i, types[i] if types else adapter.attention_kind(layer), i == len(original) - 1, store)
        for i, layer in enumerate(original)
    )
    try:
        yield
    finally:
        base.layers = original


def layer_calls(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, dict]]:
    """The embedding's output for `input_ids` (full windows, no padding) and each decoder layer's
    keyword arguments (layer index -> kwargs, `use_cache=False`). Gradients flow into the
    embedding's output when grad mode is on; the arguments carry none."""
    store: dict = {}
    with _catchers(model, store):
        try:
            base_model(model)(input_ids=input_ids, use_cache=False)
        except _StackDone:
            pass
    return store["hidden"], store["kwargs"]
