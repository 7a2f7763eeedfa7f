"""Architecture adapters: layers, projections and norms of every supported family."""

from __future__ import annotations

import pytest
from torch import nn

from llmprune import SUPPORTED_ARCHITECTURES, LLMPruneError, adapter_for
from llmprune.testing import tiny_config

from ..conftest import ARCHS

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 128, 4, 2, 16, 4


def test_supported_architectures_are_the_five_families():
    assert set(SUPPORTED_ARCHITECTURES) == set(ARCHS)


def test_adapter_accepts_model_or_config(tiny, arch):
    assert adapter_for(tiny).model_type == arch
    assert adapter_for(tiny.config) is adapter_for(tiny)


def test_decoder_layers_are_the_models_layers(tiny):
    layers = adapter_for(tiny).decoder_layers(tiny)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == LAYERS
    assert layers is tiny.model.layers


def test_attention_projections_have_expected_shapes(tiny):
    adapter = adapter_for(tiny)
    for layer in adapter.decoder_layers(tiny):
        proj = adapter.attention_projections(layer)
        assert list(proj) == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert all(isinstance(m, nn.Linear) for m in proj.values())
        assert (proj["q_proj"].in_features, proj["q_proj"].out_features) == (HIDDEN, HEADS * HEAD_DIM)
        assert (proj["k_proj"].in_features, proj["k_proj"].out_features) == (HIDDEN, KV_HEADS * HEAD_DIM)
        assert (proj["v_proj"].in_features, proj["v_proj"].out_features) == (HIDDEN, KV_HEADS * HEAD_DIM)
        assert (proj["o_proj"].in_features, proj["o_proj"].out_features) == (HEADS * HEAD_DIM, HIDDEN)
        assert adapter.attention(layer) is layer.self_attn


def test_mlp_projections_have_expected_shapes(tiny):
    adapter = adapter_for(tiny)
    for layer in adapter.decoder_layers(tiny):
        mlp = adapter.mlp_projections(layer)
        assert list(mlp) == ["gate_proj", "up_proj", "down_proj"]
        assert (mlp["gate_proj"].in_features, mlp["gate_proj"].out_features) == (HIDDEN, INTER)
        assert (mlp["up_proj"].in_features, mlp["up_proj"].out_features) == (HIDDEN, INTER)
        assert (mlp["down_proj"].in_features, mlp["down_proj"].out_features) == (INTER, HIDDEN)
        assert adapter.mlp(layer) is layer.mlp


EXPECTED_NORMS = {
    "llama": {"input_layernorm", "post_attention_layernorm"},
    "mistral": {"input_layernorm", "post_attention_layernorm"},
    "qwen2": {"input_layernorm", "post_attention_layernorm"},
    "qwen3": {"input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"},
    "gemma3_text": {
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
        "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm",
    },
}


def test_norms_found(tiny, arch):
    adapter = adapter_for(tiny)
    for layer in adapter.decoder_layers(tiny):
        norms = adapter.norms(layer)
        assert set(norms) == EXPECTED_NORMS[arch]
        for name, module in norms.items():
            size = HEAD_DIM if name.startswith("self_attn.") else HIDDEN
            assert module.weight.shape == (size,), name


def test_adapter_covers_every_parameter_of_a_layer(tiny):
    """Projections + norms are all a decoder layer holds: nothing is missed by the adapter."""
    adapter = adapter_for(tiny)
    for layer in adapter.decoder_layers(tiny):
        parts = [*adapter.attention_projections(layer).values(), *adapter.mlp_projections(layer).values(),
                 *adapter.norms(layer).values()]
        found = {id(p) for m in parts for p in m.parameters()}
        assert found == {id(p) for p in layer.parameters()}


def test_layer_types(tiny, arch):
    types = adapter_for(tiny).layer_types(tiny.config)
    if arch == "gemma3_text":
        assert types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    else:
        assert types is None or types == ["full_attention"] * LAYERS


@pytest.mark.parametrize("model_type", ["gpt2", "falcon", "gemma3"])
def test_other_architectures_rejected_naming_supported(model_type):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    with pytest.raises(LLMPruneError) as info:
        adapter_for(config)
    message = str(info.value)
    assert f"'{model_type}'" in message
    for name in SUPPORTED_ARCHITECTURES:
        assert name in message
    assert "\n" not in message


def test_unsupported_model_instance_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(LLMPruneError, match="unsupported architecture 'gpt2'"):
        adapter_for(model)


def test_tiny_config_overrides_are_applied():
    assert tiny_config("llama", num_hidden_layers=2).num_hidden_layers == 2
