"""Architecture adapters: where each supported decoder keeps its layers, projections and norms."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import LLMPruneError


@dataclass(frozen=True)
class ArchAdapter:
    """Names of the parts of one decoder-only architecture.

    All supported families share the Llama layout (`model.layers[i].self_attn.{q,k,v,o}_proj`,
    `mlp.{gate,up,down}_proj`); they differ in their norms."""

    model_type: str
    layer_norms: tuple[str, ...]
    attention_norms: tuple[str, ...] = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return base_model(model).layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def attention_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = layer.self_attn
        return {name: getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def mlp_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mlp = layer.mlp
        return {name: getattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")}

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        found = {name: getattr(layer, name) for name in self.layer_norms}
        attn = layer.self_attn
        found.update({f"self_attn.{name}": getattr(attn, name) for name in self.attention_norms})
        return found

    def layer_types(self, config) -> list[str] | None:
        return list(config.layer_types) if getattr(config, "layer_types", None) else None

    def attention_kind(self, layer: nn.Module) -> str | None:
        """The attention kind a layer module records for itself (transformers 4.5x keeps it on
        the layer, 5.x on its attention); None for families without kinds."""
        return getattr(layer, "attention_type", None) or getattr(layer.self_attn, "layer_type", None)


def rope_parameters(config, kind: str = "full_attention") -> dict:
    """The RoPE settings of one attention kind: `rope_theta`, `rope_type` and the scaling fields.
    transformers 5 keeps them in `config.rope_parameters` (keyed by attention kind for Gemma-3);
    4.5x in `rope_theta`, `rope_scaling` and Gemma-3's `rope_local_base_freq` (its local layers
    unscaled)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if any(isinstance(v, dict) for v in params.values()):
            params = params.get(kind) or params.get("full_attention") or {}
        found = dict(params)
    elif kind == "sliding_attention" and getattr(config, "rope_local_base_freq", None):
        found = {"rope_theta": config.rope_local_base_freq}
    else:
        found = dict(getattr(config, "rope_scaling", None) or {})
        found["rope_theta"] = config.rope_theta
    found.setdefault("rope_type", found.get("type", "default"))
    return found


_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", _LLAMA_NORMS),
    "mistral": ArchAdapter("mistral", _LLAMA_NORMS),
    "qwen2": ArchAdapter("qwen2", _LLAMA_NORMS),
    "qwen3": ArchAdapter("qwen3", _LLAMA_NORMS, ("q_norm", "k_norm")),
    "gemma3_text": ArchAdapter(
        "gemma3_text",
        ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
        ("q_norm", "k_norm"),
    ),
}
SUPPORTED_ARCHITECTURES = tuple(ADAPTERS)


def adapter_for(config_or_model) -> ArchAdapter:
    """The adapter for a config or model; a clear error for any other architecture."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise LLMPruneError(
            f"unsupported architecture '{model_type}'",
            f"llmprune supports {', '.join(SUPPORTED_ARCHITECTURES)} decoder-only causal LMs",
        )
    return ADAPTERS[model_type]


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) under a *ForCausalLM head."""
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


def install_layers(model: nn.Module, new_layers: list[nn.Module], kept: list[int]) -> None:
    """Replace the decoder stack by `new_layers` (the layers of current indices `kept`), updating
    num_hidden_layers, layer_types, llmprune's per-layer shapes and every layer_idx (the KV cache
    and the attention masks are indexed by position in the stack). Compress cuts with it; DevFT
    stacks its fused layers with it."""
    adapter = adapter_for(model)
    config = model.config
    types = adapter.layer_types(config)
    base_model(model).layers = nn.ModuleList(new_layers)
    config.num_hidden_layers = len(new_layers)
    if types:
        config.layer_types = [types[i] for i in kept]
    spec = getattr(config, "llmprune", None)
    if isinstance(spec, dict) and spec.get("layers"):
        config.llmprune = {**spec, "layers": [spec["layers"][i] for i in kept]}
    for new_idx, layer in enumerate(new_layers):
        layer.layer_idx = new_idx
        adapter.attention(layer).layer_idx = new_idx
