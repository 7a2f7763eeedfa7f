"""Parameter accounting: the parts sum to the total, tied embeddings counted once."""

from __future__ import annotations

import pytest

from llmprune import LLMPruneError, model_info, parameter_breakdown
from llmprune.params import layer_shapes
from llmprune.testing import tiny_model

PARTS = ("embeddings", "attention", "mlp", "norms", "lm_head")
TIED = {"qwen3", "gemma3_text"}  # as llmprune.testing configures them


def independent_count(model) -> dict:
    """Counts by parameter name; named_parameters() lists a shared (tied) tensor once."""
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            counts["embeddings"] += p.numel()
        elif "lm_head" in name:
            counts["lm_head"] += p.numel()
        elif any(f"self_attn.{x}_proj" in name for x in "qkvo"):
            counts["attention"] += p.numel()
        elif ".mlp." in name:
            counts["mlp"] += p.numel()
        elif "norm" in name:
            counts["norms"] += p.numel()
        else:
            raise AssertionError(f"unclassified parameter {name}")
    return counts


def test_parts_sum_to_total(tiny):
    b = parameter_breakdown(tiny)
    assert sum(b[k] for k in PARTS) == b["total"]
    assert b["total"] == sum(p.numel() for p in tiny.parameters())  # parameters() dedups tied tensors
    assert b["decoder_layers"] == b["attention"] + b["mlp"] + b["norms"] - tiny.model.norm.weight.numel()


def test_parts_match_an_independent_count(tiny):
    b = parameter_breakdown(tiny)
    assert {k: b[k] for k in PARTS} == independent_count(tiny)


def test_tied_embeddings_counted_once(tiny, arch):
    b = parameter_breakdown(tiny)
    vocab_by_hidden = tiny.config.vocab_size * tiny.config.hidden_size
    assert b["embeddings"] == vocab_by_hidden
    if arch in TIED:
        assert b["tied_embeddings"] is True
        assert b["lm_head"] == 0
    else:
        assert b["tied_embeddings"] is False
        assert b["lm_head"] == vocab_by_hidden


def test_tying_removes_one_copy():
    untied = parameter_breakdown(tiny_model("llama", tie_word_embeddings=False))
    tied = parameter_breakdown(tiny_model("llama", tie_word_embeddings=True))
    assert tied["tied_embeddings"] and not untied["tied_embeddings"]
    assert untied["total"] - tied["total"] == 320 * 64
    assert tied["lm_head"] == 0


def test_layer_shapes(tiny, arch):
    rows = layer_shapes(tiny)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert (r["num_heads"], r["num_kv_heads"], r["head_dim"], r["intermediate_size"]) == (4, 2, 16, 128)
        assert r["params"] == r["attention_params"] + r["mlp_params"] + r["norm_params"]
        assert r["mlp_params"] == 3 * 64 * 128
    expected_types = (["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
                      if arch == "gemma3_text" else ["full_attention"] * 4)
    assert [r["layer_type"] for r in rows] == expected_types


def test_layer_shapes_follow_a_narrowed_mlp():
    """Per-layer widths are read from the modules, not the config (pruned layers differ)."""
    import torch
    from torch import nn

    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    mlp.gate_proj, mlp.up_proj = nn.Linear(64, 96, bias=False), nn.Linear(64, 96, bias=False)
    mlp.down_proj = nn.Linear(96, 64, bias=False)
    rows = layer_shapes(model)
    assert [r["intermediate_size"] for r in rows] == [128, 96, 128, 128]
    assert rows[1]["mlp_params"] == 3 * 64 * 96
    with torch.no_grad():
        model(torch.tensor([[1, 5, 7]]))  # still runs


def test_model_info(tiny, arch):
    info = model_info(tiny)
    assert info["architecture"] == arch
    assert info["class"] == type(tiny).__name__
    assert info["num_layers"] == len(info["layers"]) == 4
    assert (info["hidden_size"], info["vocab_size"], info["dtype"]) == (64, 320, "float32")
    assert info["parameters"] == parameter_breakdown(tiny)


def test_unsupported_model_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(LLMPruneError, match="unsupported architecture"):
        parameter_breakdown(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
