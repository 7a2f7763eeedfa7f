"""How a (pruned) checkpoint maps onto a llama.cpp architecture, and the zero-padding that makes a
non-uniform model uniform without changing what it computes.

llama.cpp reads per-layer head counts and feed-forward lengths for every architecture, but its
Llama, Qwen and Gemma-3 graphs create each layer's tensors from the global sizes; only `deci`
honours per-layer widths. So a checkpoint whose layers all have one MLP width and one query-head
count is written as its own architecture; a non-uniform Llama-family model as `deci`; any other
non-uniform model is padded to its widest layer: the extra MLP neurons get zero gate/up rows and
zero down columns, the extra query heads (appended inside each KV group) zero q rows and zero o
columns, so every padded unit adds exactly 0 (act(0)·0 = 0; a zero query attends uniformly but its
o_proj columns are zero). Exact, at the compute cost of the widest layer."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.arch import adapter_for
from llmprune.errors import LLMPruneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchRule:
    """What llama.cpp calls a model type and what its graph needs."""

    uniform: str                 # the llama.cpp architecture of a uniform-width model
    non_uniform: str | None      # the one taking per-layer widths (None: pad to the widest layer)
    permute_qk: bool             # llama.cpp's Llama graph uses interleaved RoPE: q/k rows are reordered
    norm_offset: float = 0.0     # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
    output_biases: bool = False  # whether the graph adds o_proj / down_proj biases (compress --intercept)


RULES: dict[str, ArchRule] = {
    "llama": ArchRule("llama", "deci", permute_qk=True, output_biases=True),
    "mistral": ArchRule("llama", "deci", permute_qk=True, output_biases=True),
    "qwen2": ArchRule("qwen2", None, permute_qk=False),
    "qwen3": ArchRule("qwen3", None, permute_qk=False),
    "gemma3_text": ArchRule("gemma3", None, permute_qk=False, norm_offset=1.0),
}


@dataclass(frozen=True)
class LayerWidths:
    """One decoder layer's prunable sizes."""

    intermediate: int
    query_heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class GGUFLayout:
    """The architecture a model is written as and whether its layers are padded first."""

    model_type: str
    arch: str
    rule: ArchRule
    widths: tuple[LayerWidths, ...]
    pad: bool

    @property
    def uniform(self) -> bool:
        return len({(w.intermediate, w.query_heads) for w in self.widths}) <= 1

    def per_layer(self, field: str) -> list[int]:
        return [getattr(w, field) for w in self.widths]


def layer_widths(model: nn.Module) -> tuple[LayerWidths, ...]:
    adapter = adapter_for(model)
    widths = []
    for layer in adapter.decoder_layers(model):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        head_dim = int(attn.head_dim)
        widths.append(LayerWidths(int(mlp.down_proj.in_features), int(attn.q_proj.out_features // head_dim),
                                  int(attn.k_proj.out_features // head_dim), head_dim))
    return tuple(widths)


def plan_layout(model: nn.Module) -> GGUFLayout:
    """The llama.cpp architecture for this model; one line naming the fix for what llama.cpp cannot run."""
    model_type = adapter_for(model).model_type
    if model_type not in RULES:
        raise LLMPruneError(f"the GGUF writer does not know architecture '{model_type}'",
                            f"export it as ONNX (--format onnx); GGUF supports {', '.join(RULES)}")
    rule = RULES[model_type]
    widths = layer_widths(model)
    uniform = len({(w.intermediate, w.query_heads) for w in widths}) <= 1
    if not rule.output_biases and _has_output_biases(model):
        raise LLMPruneError(f"this {model_type} checkpoint has output biases on o_proj/down_proj (compress --intercept"
                            f" or --method fluctuation), which llama.cpp's {rule.uniform} graph does not add",
                            "re-run compress without --intercept (or with another --method), or export ONNX (--format onnx)")
    arch = rule.uniform if uniform or rule.non_uniform is None else rule.non_uniform
    return GGUFLayout(model_type, arch, rule, widths, pad=not uniform and rule.non_uniform is None)


def _has_output_biases(model: nn.Module) -> bool:
    adapter = adapter_for(model)
    return any(adapter.attention(layer).o_proj.bias is not None or adapter.mlp(layer).down_proj.bias is not None
               for layer in adapter.decoder_layers(model))


# --- zero padding -----------------------------------------------------------------------------------

def _grown(old: nn.Linear, out_features: int, in_features: int, place_out=None, place_in=None) -> nn.Linear:
    """A copy of `old` with zero rows/columns added; `place_out`/`place_in` say where the old ones go."""
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, dtype=old.weight.dtype,
                    device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        rows = place_out if place_out is not None else torch.arange(old.out_features)
        cols = place_in if place_in is not None else torch.arange(old.in_features)
        new.weight[rows[:, None], cols[None, :]] = old.weight
        if old.bias is not None:
            new.bias.zero_()
            new.bias[rows] = old.bias
    return new


def _head_slots(kv_heads: int, groups: int, widest: int, head_dim: int) -> torch.Tensor:
    """Where each of a layer's query-head channels goes when every KV group grows from `groups` to
    `widest` heads (a query head h belongs to KV head h // groups: padding goes at each group's end)."""
    heads = torch.arange(kv_heads * groups)
    slots = (heads // groups) * widest + heads % groups
    return (slots[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def pad_to_widest(model: nn.Module) -> list[LayerWidths]:
    """Pad every decoder layer in place to the widest MLP and the most query heads per KV group
    (exact: the added units contribute zero). Returns the new widths; updates config.llmprune."""
    adapter = adapter_for(model)
    widths = layer_widths(model)
    width = max(w.intermediate for w in widths)
    groups = max(w.query_heads // w.kv_heads for w in widths)
    for layer, w in zip(adapter.decoder_layers(model), widths):
        mlp, attn = adapter.mlp(layer), adapter.attention(layer)
        if w.intermediate < width:
            mlp.gate_proj = _grown(mlp.gate_proj, width, mlp.gate_proj.in_features)
            mlp.up_proj = _grown(mlp.up_proj, width, mlp.up_proj.in_features)
            mlp.down_proj = _grown(mlp.down_proj, mlp.down_proj.out_features, width)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = width
        if w.query_heads < w.kv_heads * groups:
            slots = _head_slots(w.kv_heads, w.query_heads // w.kv_heads, groups, w.head_dim)
            total = w.kv_heads * groups * w.head_dim
            attn.q_proj = _grown(attn.q_proj, total, attn.q_proj.in_features, place_out=slots)
            attn.o_proj = _grown(attn.o_proj, attn.o_proj.out_features, total, place_in=slots)
            attn.num_key_value_groups = groups
    new = layer_widths(model)
    spec = getattr(model.config, "llmprune", None)
    if isinstance(spec, dict) and spec.get("layers"):
        spec["layers"] = [{**s, "intermediate_size": n.intermediate, "num_attention_heads": n.query_heads}
                          for s, n in zip(spec["layers"], new)]
    return list(new)


def pad_for_llama_cpp(model: nn.Module) -> GGUFLayout:
    """Pad the model in place where its llama.cpp architecture needs one width (exact); returns
    the layout the model had before."""
    layout = plan_layout(model)
    if layout.pad:
        widths = pad_to_widest(model)
        log.info("padded the layers to %d MLP neurons and %d query heads (exact; llama.cpp's %s graph takes one width)",
                 widths[0].intermediate, widths[0].query_heads, layout.arch)
    return layout


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Hugging Face's rotate-half RoPE layout (the first half of a
    head's channels pairs with the second) to llama.cpp's interleaved one (channel 2i with 2i+1)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))
