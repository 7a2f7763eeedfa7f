# Written by llmprune into every pruned checkpoint as modeling_llmprune.py; needs only torch and
# transformers. A pruned model keeps the stock architecture but each decoder layer may have its
# own MLP width and query-head count (and an output bias on down_proj / o_proj from the
# least-squares fit); dropped layers are simply absent (config.num_hidden_layers, layer_types).
# The shapes are read from config.llmprune["layers"].
from torch import nn
from transformers import PreTrainedModel as _Base  # LLMPRUNE_BASE_IMPORT


def _linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def apply_pruned_shapes(model: nn.Module, config) -> None:
    """Resize every decoder layer of a freshly built stock model to the recorded pruned shapes."""
    spec = getattr(config, "llmprune", None) or {}
    layers = model.model.layers
    shapes = spec.get("layers", [])
    if shapes and len(shapes) != len(layers):
        raise ValueError(f"config.llmprune lists {len(shapes)} layers but the model has {len(layers)}")
    for layer, shape in zip(layers, shapes):
        mlp, attn = layer.mlp, layer.self_attn
        width = int(shape["intermediate_size"])
        out_bias = bool(shape.get("mlp_out_bias", False))
        if mlp.down_proj.in_features != width or (mlp.down_proj.bias is not None) != out_bias:
            hidden = mlp.down_proj.out_features
            mlp.gate_proj = _linear(hidden, width, mlp.gate_proj.bias is not None, mlp.gate_proj)
            mlp.up_proj = _linear(hidden, width, mlp.up_proj.bias is not None, mlp.up_proj)
            mlp.down_proj = _linear(width, hidden, out_bias, mlp.down_proj)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = width
        heads = int(shape["num_attention_heads"])
        kv_heads = attn.k_proj.out_features // attn.head_dim
        attn_bias = bool(shape.get("attn_out_bias", False))
        if attn.q_proj.out_features != heads * attn.head_dim or (attn.o_proj.bias is not None) != attn_bias:
            hidden = attn.o_proj.out_features
            attn.q_proj = _linear(hidden, heads * attn.head_dim, attn.q_proj.bias is not None, attn.q_proj)
            attn.o_proj = _linear(heads * attn.head_dim, hidden, attn_bias, attn.o_proj)
        attn.num_key_value_groups = heads // kv_heads


class PrunedCausalLM(_Base):
    """The stock causal LM with per-layer pruned shapes."""

    def __init__(self, config):
        super().__init__(config)
        apply_pruned_shapes(self, config)
