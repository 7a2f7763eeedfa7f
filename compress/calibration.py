"""Streamed calibration: the model runs one decoder layer at a time over the calibration windows.

The inputs of layer 0 and the keyword arguments every layer receives (attention masks, rotary
position embeddings, cache positions) are captured once by running the decoder stack with each
layer replaced by a pass-through catcher; after that any layer can be run on its own:
hidden states enter layer ℓ, leave it and feed layer ℓ+1. Peak memory is one layer plus the
calibration activations."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.layer_calls import layer_calls


@dataclass
class LayerStream:
    """Calibration activations entering the current layer, and what each layer is called with."""

    hidden: torch.Tensor  # [windows, tokens, hidden]
    layer_kwargs: dict[int, dict] = field(default_factory=dict)
    batch_size: int = 4


def capture_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> LayerStream:
    """Embed the calibration windows and capture every layer's call arguments (for one window:
    masks and rotary embeddings broadcast over the batch)."""
    with torch.inference_mode():
        first, kwargs = layer_calls(model, input_ids[:1])
        hidden = [first]
        for start in range(1, input_ids.shape[0], batch_size):
            hidden.append(layer_calls(model, input_ids[start : start + batch_size])[0])
    return LayerStream(hidden=torch.cat(hidden).clone(), layer_kwargs=kwargs, batch_size=batch_size)


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int = 4) -> torch.Tensor:
    """One decoder layer over all windows, in mini-batches; returns its output hidden states."""
    out = torch.empty_like(hidden)
    with torch.inference_mode():
        for start in range(0, hidden.shape[0], batch_size):
            result = layer(hidden[start : start + batch_size], **kwargs)
            out[start : start + batch_size] = result[0] if isinstance(result, tuple) else result
    return out


def token_cosine(h_in: torch.Tensor, h_out: torch.Tensor, skip_first: bool = True) -> torch.Tensor:
    """Per-token cosine similarity between a layer's input and output (BOS excluded: its
    attention-sink activations are outliers unrelated to the text)."""
    if skip_first and h_in.shape[1] > 1:
        h_in, h_out = h_in[:, 1:], h_out[:, 1:]
    return torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """ShortGPT's block influence: 1 − mean cosine(h_in, h_out); low means the layer changes little."""
    return float(1.0 - token_cosine(h_in, h_out).mean())


WIDE = 4096  # inputs wider than this keep their statistics in float32 (a 7B MLP: 0.5 GB, not 1 GB)


class GramCollector:
    """Accumulates XᵀX, Σx and the count of the inputs to a linear layer (float64, or float32 for
    inputs wider than WIDE), via a forward pre-hook. These are all that selection and
    least-squares fitting need."""

    def __init__(self, module: nn.Linear):
        n = module.in_features
        dtype = torch.float64 if n <= WIDE else torch.float32
        self.gram = torch.zeros(n, n, dtype=dtype)
        self.sum = torch.zeros(n, dtype=dtype)
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        self.gram += (x.T @ x).to(self.gram.dtype)
        self.sum += x.sum(0).to(self.sum.dtype)
        self.count += x.shape[0]

    @classmethod
    def of(cls, x: torch.Tensor) -> "GramCollector":
        """Exact float64 statistics of the rows of x, as the hook would accumulate them."""
        stats = cls.__new__(cls)
        x = x.double()
        stats.gram, stats.sum, stats.count, stats._handle = x.T @ x, x.sum(0), x.shape[0], None
        return stats

    @classmethod
    def from_tensors(cls, gram: torch.Tensor, total: torch.Tensor, count: int) -> "GramCollector":
        """Statistics restored from storage (no hook)."""
        stats = cls.__new__(cls)
        stats.gram, stats.sum, stats.count, stats._handle = gram, total, int(count), None
        return stats

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """Centered second moment (times count): XᵀX − n·μμᵀ."""
        mu = self.mean
        return self.gram - self.count * torch.outer(mu, mu)


@contextmanager
def collect_grams(modules: dict[str, nn.Linear]):
    """Gram collectors on the inputs of several linear layers for the duration of the block."""
    collectors = {name: GramCollector(m) for name, m in modules.items()}
    try:
        yield collectors
    finally:
        for c in collectors.values():
            c.remove()
