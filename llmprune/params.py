"""Parameter accounting: embeddings / attention / MLP / norms / LM head, tied weights once."""

from __future__ import annotations

from torch import nn

from .arch import adapter_for, base_model


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_shapes(model: nn.Module) -> list[dict]:
    """Per decoder layer: heads, KV heads, head dim, MLP width and parameter counts."""
    adapter = adapter_for(model)
    types = adapter.layer_types(model.config)
    rows = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        proj = adapter.attention_projections(layer)
        head_dim = getattr(adapter.attention(layer), "head_dim", None) or model.config.head_dim
        mlp = adapter.mlp_projections(layer)
        attn_params = sum(_numel(m) for m in proj.values())
        mlp_params = sum(_numel(m) for m in mlp.values())
        rows.append({
            "index": i,
            "layer_type": types[i] if types else "full_attention",
            "num_heads": proj["q_proj"].out_features // head_dim,
            "num_kv_heads": proj["k_proj"].out_features // head_dim,
            "head_dim": head_dim,
            "intermediate_size": mlp["down_proj"].in_features,
            "attention_params": attn_params,
            "mlp_params": mlp_params,
            "norm_params": _numel(layer) - attn_params - mlp_params,
            "params": _numel(layer),
        })
    return rows


def parameter_breakdown(model: nn.Module) -> dict:
    """Counts by part; a tied LM head is counted once (under embeddings) and flagged."""
    base = base_model(model)
    embed = base.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    layers = layer_shapes(model)
    attention = sum(r["attention_params"] for r in layers)
    mlp = sum(r["mlp_params"] for r in layers)
    layer_norms = sum(r["norm_params"] for r in layers)
    final_norm = _numel(base.norm) if hasattr(base, "norm") else 0
    unique_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "total": unique_total,
        "embeddings": _numel(embed),
        "attention": attention,
        "mlp": mlp,
        "norms": layer_norms + final_norm,
        "lm_head": 0 if tied or head is None else _numel(head),
        "tied_embeddings": tied,
        "decoder_layers": attention + mlp + layer_norms,
    }


def model_info(model: nn.Module) -> dict:
    """What `llmprune info` prints."""
    config = model.config
    layers = layer_shapes(model)
    return {
        "architecture": config.model_type,
        "class": type(model).__name__,
        "num_layers": len(layers),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": parameter_breakdown(model),
        "layers": layers,
    }
