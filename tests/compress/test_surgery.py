"""Shape-changing surgery keeps every module and the config consistent, on every architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from llmprune.arch import adapter_for
from llmprune.checkpoint import layer_shape
from llmprune.compress.surgery import drop_layers, install_layers, prune_mlp_neurons, prune_query_heads
from llmprune.params import parameter_breakdown
from llmprune.testing import tiny_model

from .conftest import ARCHS


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def check_cache_consistency(model, ids):
    """Decoding the last token from the KV cache gives the full forward's last logits: every
    layer_idx matches its place in the stack and the cache has one slot per layer."""
    with torch.inference_mode():
        full = model(input_ids=ids, use_cache=False).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    layers = model.model.layers
    assert [l.self_attn.layer_idx for l in layers] == list(range(len(layers)))
    assert model.config.num_hidden_layers == len(layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_zeroed_neurons_and_heads_changes_nothing(arch, token_ids):
    """Removing neurons whose down columns are zero, and heads whose o_proj columns are zero,
    leaves the logits exactly as they were: the right rows and columns are kept."""
    model = tiny_model(arch)
    layer = model.model.layers[1]
    keep = torch.tensor([0, 3, 4, 10, 50, 77, 100, 127])
    drop = torch.tensor([i for i in range(128) if i not in keep.tolist()])
    keep_heads = torch.tensor([1, 2])  # one per KV group (heads 0-1 share KV head 0, heads 2-3 KV head 1)
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, drop] = 0.0
        for h in (0, 3):
            layer.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0.0
    before = logits(model, token_ids)
    prune_mlp_neurons(layer, keep)
    prune_query_heads(layer, keep_heads)
    torch.testing.assert_close(logits(model, token_ids), before, rtol=1e-5, atol=1e-5)
    assert layer.mlp.gate_proj.weight.shape == (8, 64) and layer.mlp.up_proj.weight.shape == (8, 64)
    assert layer.mlp.down_proj.weight.shape == (64, 8)
    assert layer.self_attn.q_proj.weight.shape == (32, 64) and layer.self_attn.o_proj.weight.shape == (64, 32)
    assert layer.self_attn.num_key_value_groups == 1
    assert layer_shape(layer) == {"intermediate_size": 8, "num_attention_heads": 2, "mlp_out_bias": False, "attn_out_bias": False}
    if hasattr(layer.mlp, "intermediate_size"):
        assert layer.mlp.intermediate_size == 8
    check_cache_consistency(model, token_ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_shape_is_consistent_after_all_surgeries(arch, token_ids):
    model = tiny_model(arch)
    original = copy.deepcopy(model.model.layers)
    types = list(model.config.layer_types) if getattr(model.config, "layer_types", None) else None
    g = torch.Generator().manual_seed(0)
    widths = [128, 100, 64, 17]
    for layer, width in zip(model.model.layers, widths):
        keep = torch.randperm(128, generator=g)[:width]
        new_down = torch.randn(64, width, generator=g)
        prune_mlp_neurons(layer, keep, down_weight=new_down, down_bias=torch.zeros(64))
        assert torch.equal(layer.mlp.down_proj.weight, new_down)
        assert layer.mlp.down_proj.bias is not None
    prune_query_heads(model.model.layers[2], torch.tensor([0, 3]), o_bias=torch.zeros(64))
    kept = drop_layers(model, [1])
    assert kept == [0, 2, 3]
    layers = model.model.layers
    assert len(layers) == 3
    assert [l.mlp.down_proj.in_features for l in layers] == [128, 64, 17]
    assert [l.self_attn.q_proj.out_features // 16 for l in layers] == [4, 2, 4]
    assert layers[1].self_attn.o_proj.bias is not None
    for new, old_index in zip(layers, kept):  # the survivors are the original modules, in order
        assert torch.equal(new.self_attn.k_proj.weight, original[old_index].self_attn.k_proj.weight)
    if types:
        assert model.config.layer_types == [types[i] for i in kept]
    if arch == "gemma3_text":
        assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
        assert [adapter_for(model).attention_kind(l) for l in layers] == model.config.layer_types
    out = logits(model, token_ids)
    assert out.shape == (2, 40, 320) and torch.isfinite(out).all()
    breakdown = parameter_breakdown(model)
    assert breakdown["total"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    check_cache_consistency(model, token_ids)
    # Generation with the cache works on the pruned stack.
    with torch.inference_mode():
        generated = model.generate(token_ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def test_drop_layers_rejects_layer_zero_and_everything():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layer 0"):
        drop_layers(model, [0, 2])
    assert len(model.model.layers) == 4


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_uneven_head_keep_is_refused(arch):
    layer = tiny_model(arch).model.layers[0]
    q = layer.self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match="evenly"):
        prune_query_heads(layer, torch.tensor([0, 1]))  # both of KV group 0, none of group 1
    with pytest.raises(ValueError, match="evenly"):
        prune_query_heads(layer, torch.tensor([0, 1, 2]))  # 2 + 1
    assert torch.equal(layer.self_attn.q_proj.weight, q)  # nothing changed


def test_install_layers_follows_the_kept_layer_types(token_ids):
    model = tiny_model("gemma3_text")
    layers = model.model.layers
    install_layers(model, [layers[0], layers[2]], [0, 2])
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.num_hidden_layers == 2
    check_cache_consistency(model, token_ids)


def test_new_linears_keep_the_requires_grad_flag():
    model = tiny_model("llama").requires_grad_(False)
    layer = model.model.layers[0]
    prune_mlp_neurons(layer, torch.arange(10))
    prune_query_heads(layer, torch.tensor([0, 2]))
    assert not any(p.requires_grad for p in model.parameters())
