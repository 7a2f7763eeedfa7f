"""Split training's maths (MergeSFL on a U-shaped split), as small functions over one model.

A `Cut` divides the global model's decoder stack in three: the device runs the embedding and the
layers below `front`, the server the layers from `front` up to `back`, and the device again the
layers from `back` on, the final norm, the (tied) head and the loss. Token ids and labels therefore
never leave the device; the server sees the features at the first cut and the gradient at the
second.

Feature merging: the server runs one batch for all devices. Devices may cut at different layers,
so a device's features join the merged batch at its own cut (`merged_forward`): every decoder layer
treats each window on its own, which makes the merged pass equal to the devices' separate passes,
and the gradient that comes back to each device is exactly its own (`MergedPass.backward`). The
merged loss is the mean over all merged windows: each device's own loss gradient is weighted by its
share of the merged batch on the server, and each device gets back the gradient of its own mean loss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.arch import adapter_for, base_model
from llmprune.errors import LLMPruneError
from llmprune.layer_calls import layer_calls

from .submodels import Submodel


@dataclass(frozen=True)
class Cut:
    """Where one device's model is split: it holds global layers [0, front) and [back, num_layers)."""

    num_layers: int
    front: int
    back: int

    def __post_init__(self) -> None:
        if not 1 <= self.front < self.back <= self.num_layers:
            raise LLMPruneError(
                f"split cut ({self.front}, {self.back}) does not fit a {self.num_layers}-layer model",
                f"the device needs 1 <= front < back <= {self.num_layers} (at least one layer each side of the server)")

    @property
    def device_layers(self) -> tuple[int, ...]:
        return tuple(range(self.front)) + tuple(range(self.back, self.num_layers))

    @property
    def server_layers(self) -> tuple[int, ...]:
        return tuple(range(self.front, self.back))

    def submodel(self) -> Submodel:
        """The layers a device loads (its front and its tail)."""
        return Submodel.of_layers(self.num_layers, self.device_layers)

    def device_modules(self, shapes: dict[str, tuple[int, int]]) -> list[str]:
        held = set(self.device_layers)
        return [m for m in shapes if int(m.split(".", 1)[0]) in held]

    def to_dict(self) -> dict:
        return {"front": self.front, "back": self.back}

    def to_json(self) -> str:
        return json.dumps({"num_layers": self.num_layers, "front": self.front, "back": self.back})

    @classmethod
    def from_json(cls, text: str) -> Cut:
        try:
            data = json.loads(text)
            return cls(int(data["num_layers"]), int(data["front"]), int(data["back"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise LLMPruneError(f"malformed split cut ({exc})", "the server sends it; check the versions") from None


def window_calls(model: nn.Module, seq_len: int) -> dict[int, dict]:
    """Each decoder layer's keyword arguments for windows of `seq_len` tokens without padding; they do
    not depend on the token ids, so the server builds them without seeing any."""
    with torch.no_grad():
        return layer_calls(model, torch.zeros(1, seq_len, dtype=torch.long))[1]


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The embedding's output as the first decoder layer receives it (Gemma's scale included)."""
    return layer_calls(model, input_ids)[0]


def run_layers(model: nn.Module, hidden: torch.Tensor, layers: Sequence[int], calls: dict[int, dict]) -> torch.Tensor:
    """`hidden` through the model's decoder layers `layers` (its own indices), in order."""
    stack = adapter_for(model).decoder_layers(model)
    for i in layers:
        out = stack[i](hidden, **calls[i])
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def head_loss(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, vocab_chunk: int = 16384) -> torch.Tensor:
    """Mean next-token loss of the last layer's output: the final norm, the head a vocabulary slice
    at a time (client_model.chunked_vocab_loss's memory), the labels being the device's own ids."""
    from .client_model import hidden_state_loss

    normed = base_model(model).norm(hidden)
    return hidden_state_loss(model, normed[:, :-1], input_ids[:, 1:], vocab_chunk)


@dataclass
class MergedPass:
    """The server's part run once on the merged features of several devices: `outputs[key]` is the
    device's slice of the features at the second cut; `backward` takes each device's gradient of its
    own mean loss there and returns, per device, the gradient of its own mean loss at its first cut
    (the server's LoRA accumulates the merged batch's gradient on the way)."""

    inputs: dict
    outputs: dict
    merged: torch.Tensor
    slices: dict

    def backward(self, grads: dict) -> dict:
        """`grads` may lack devices that dropped out after the forward: their windows leave the
        merged mean (their slice gets no gradient)."""
        total = sum(self.slices[key].stop - self.slices[key].start for key in grads)
        weighted = torch.zeros_like(self.merged)
        for key in grads:                            # the merged loss: the mean over every merged window
            where = self.slices[key]
            weighted[where] = grads[key].to(weighted.dtype) * ((where.stop - where.start) / total)
        self.merged.backward(weighted)
        return {key: self.inputs[key].grad * (total / (self.slices[key].stop - self.slices[key].start))
                for key in grads}


def merged_forward(model: nn.Module, features: dict, cuts: dict, back: int, calls: dict[int, dict]) -> MergedPass:
    """The server's layers on every device's features at once: device `key`'s features
    (`features[key]`, its first cut's output) join the merged batch at layer `cuts[key]` and all
    leave at `back`. Devices join in the order of `features`, which fixes each one's slice."""
    stack = adapter_for(model).decoder_layers(model)
    inputs = {key: h.detach().requires_grad_(True) for key, h in features.items()}
    start = min(cuts.values())
    if not 0 < start < back <= len(stack) or any(c >= back for c in cuts.values()):
        raise LLMPruneError(f"split cuts {sorted(set(cuts.values()))} and back {back} do not fit the server's "
                            f"{len(stack)} layers", "cut every device below the second cut")
    merged, slices = None, {}
    for i in range(start, back):
        joining = [key for key in inputs if cuts[key] == i]
        if joining:
            offset = 0 if merged is None else merged.shape[0]
            for key in joining:
                slices[key] = slice(offset, offset + inputs[key].shape[0])
                offset += inputs[key].shape[0]
            merged = torch.cat(([] if merged is None else [merged]) + [inputs[key] for key in joining])
        out = stack[i](merged, **calls[i])
        merged = out[0] if isinstance(out, tuple) else out
    outputs = {key: merged[where].detach() for key, where in slices.items()}
    return MergedPass(inputs, outputs, merged, slices)


def server_steps(passes: list, grads: list[dict], params: list, optimizer, max_grad_norm: float = 1.0) -> dict:
    """The server's part of a step: each pass's backward (`grads[i]`: the devices' gradients at the
    second cut for `passes[i]`), all at the weights the passes ran with, then one optimiser step per
    pass in order with that pass's gradient alone (clipped as a device clips). One merged pass is
    one step; without merging, one step per device. Returns each device's gradient at its first cut."""
    back, per_pass = {}, []
    for p, g in zip(passes, grads):
        if not g:
            continue
        back.update(p.backward(g))
        per_pass.append([q.grad for q in params])
        for q in params:
            q.grad = None
    for taken in per_pass:
        for q, g in zip(params, taken):
            q.grad = g
        torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return back
