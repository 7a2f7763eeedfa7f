"""LoRA on a pruned model: which modules carry it, peft attach/detach, the adapter as plain
arrays under canonical names, and folding it into the base weights.

Canonical names are `"{layer}.{path}.A"` / `"{layer}.{path}.B"` (e.g. `"17.self_attn.q_proj.A"`),
with `layer` the index in the pruned model: the names every client, the server and checkpoints
share, whatever peft calls the modules. A is [rank, in], B is [out, rank]; the weight change is
`scale * B @ A` with one scale for all clients (see RecoverConfig.scale)."""

from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from llmprune.arch import adapter_for
from llmprune.errors import LLMPruneError

_LAYER_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def module_shapes(model: nn.Module, target_modules: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Canonical module name -> (out_features, in_features) of every LoRA target, bottom layer first."""
    adapter = adapter_for(model)
    shapes = {}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        projections = {f"self_attn.{k}": v for k, v in adapter.attention_projections(layer).items()}
        projections.update({f"mlp.{k}": v for k, v in adapter.mlp_projections(layer).items()})
        for path, linear in projections.items():
            if path.rsplit(".", 1)[-1] in target_modules:
                shapes[f"{i}.{path}"] = (linear.out_features, linear.in_features)
    if not shapes:
        raise LLMPruneError(f"no LoRA target modules {target_modules} in the model", "check --target-modules")
    return shapes


def top_layer_modules(shapes: dict[str, tuple[int, int]], depth: int) -> list[str]:
    """The modules of the top `depth` layers: LoRA near the output needs no backward pass through
    the lower layers, which is what makes shallow adapters cheap on small devices."""
    layers = sorted({int(name.split(".", 1)[0]) for name in shapes})
    keep = set(layers[-depth:]) if depth > 0 else set()
    return [name for name in shapes if int(name.split(".", 1)[0]) in keep]


def init_arrays(shapes: dict[str, tuple[int, int]], modules: list[str], rank: int, seed: int) -> dict[str, np.ndarray]:
    """LoRA's usual start, seeded: A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming bound), B = 0."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name in modules:
        out_f, in_f = shapes[name]
        bound = 1.0 / np.sqrt(in_f)
        arrays[f"{name}.A"] = rng.uniform(-bound, bound, size=(rank, in_f)).astype(np.float32)
        arrays[f"{name}.B"] = np.zeros((out_f, rank), dtype=np.float32)
    return arrays


def modules_of(arrays: dict[str, np.ndarray]) -> list[str]:
    return sorted({k[:-2] for k in arrays if k.endswith(".A")}, key=_module_order)


def rank_of(arrays: dict[str, np.ndarray]) -> int:
    ranks = {arrays[k].shape[0] for k in arrays if k.endswith(".A")}
    return max(ranks) if ranks else 0


def _module_order(name: str) -> tuple[int, str]:
    layer, _, path = name.partition(".")
    return int(layer), path


def _canonical(peft_name: str) -> str:
    match = _LAYER_PATH.search(peft_name)
    if not match:
        raise LLMPruneError(f"LoRA module '{peft_name}' is not inside a decoder layer", "target layer projections only")
    return f"{match.group(1)}.{match.group(2)}"


def _full_names(model: nn.Module, modules: list[str]) -> list[str]:
    """peft target names (full module paths) for canonical module names."""
    prefix = "model.layers" if hasattr(model, "model") and hasattr(model.model, "layers") else "layers"
    return [f"{prefix}.{name}" for name in modules]


def attach_lora(model: nn.Module, arrays: dict[str, np.ndarray], scale: float, dropout: float = 0.0):
    """A peft LoRA model over `model` (modified in place) whose adapters hold `arrays`; only the
    adapters are trainable. Undo with `detach_lora`."""
    from peft import LoraConfig, get_peft_model

    modules = modules_of(arrays)
    rank = rank_of(arrays)
    config = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=dropout, bias="none",
                        target_modules=_full_names(model, modules), init_lora_weights=True)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, config)
    set_lora_arrays(peft_model, arrays)
    return peft_model


def detach_lora(peft_model) -> nn.Module:
    """The base model with the LoRA layers taken out again (weights untouched)."""
    return peft_model.unload()


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            yield _canonical(name), module


def get_lora_arrays(peft_model) -> dict[str, np.ndarray]:
    out = {}
    for name, module in _lora_layers(peft_model):
        out[f"{name}.A"] = module.lora_A["default"].weight.detach().float().cpu().numpy().copy()
        out[f"{name}.B"] = module.lora_B["default"].weight.detach().float().cpu().numpy().copy()
    return out


@torch.no_grad()
def set_lora_arrays(peft_model, arrays: dict[str, np.ndarray]) -> None:
    seen = set()
    for name, module in _lora_layers(peft_model):
        for part, holder in (("A", module.lora_A["default"]), ("B", module.lora_B["default"])):
            value = arrays.get(f"{name}.{part}")
            if value is None:
                raise LLMPruneError(f"adapter has no '{name}.{part}'", "send every module the client trains")
            if tuple(value.shape) != tuple(holder.weight.shape):
                raise LLMPruneError(f"adapter '{name}.{part}' has shape {tuple(value.shape)}, the model needs "
                                    f"{tuple(holder.weight.shape)}", "use arrays made for this checkpoint")
            holder.weight.copy_(torch.from_numpy(np.ascontiguousarray(value)))
            seen.add(f"{name}.{part}")
    missing = set(arrays) - seen
    if missing:
        raise LLMPruneError(f"adapter arrays for modules the model lacks: {sorted(missing)[:3]}",
                            "use arrays made for this checkpoint")


def _linear(model: nn.Module, name: str) -> nn.Linear:
    layer, _, path = name.partition(".")
    module = adapter_for(model).decoder_layers(model)[int(layer)]
    for part in path.split("."):
        module = getattr(module, part)
    return module


def delta_weight(arrays: dict[str, np.ndarray], name: str, scale: float) -> torch.Tensor:
    a = torch.from_numpy(np.ascontiguousarray(arrays[f"{name}.A"])).double()
    b = torch.from_numpy(np.ascontiguousarray(arrays[f"{name}.B"])).double()
    return scale * (b @ a)


@torch.no_grad()
def merge_lora(model: nn.Module, arrays: dict[str, np.ndarray], scale: float) -> nn.Module:
    """Fold the adapter into the base weights in place: W += scale * B @ A (computed in float64)."""
    for name in modules_of(arrays):
        linear = _linear(model, name)
        linear.weight.copy_((linear.weight.double() + delta_weight(arrays, name, scale)).to(linear.weight.dtype))
    return model


@contextmanager
def lora_applied(model: nn.Module, arrays: dict[str, np.ndarray], scale: float):
    """The model computes with the adapter (output += scale * x A^T B^T) until the block ends; the
    base weights are never touched, so the server evaluates each round's global adapter for free."""
    handles = []
    for name in modules_of(arrays):
        a = torch.from_numpy(np.ascontiguousarray(arrays[f"{name}.A"]))
        b = torch.from_numpy(np.ascontiguousarray(arrays[f"{name}.B"]))

        def hook(module, inputs, output, a=a, b=b):
            x = inputs[0]
            return output + scale * ((x @ a.to(x.dtype).T) @ b.to(x.dtype).T)

        handles.append(_linear(model, name).register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
