"""Streamed calibration: block influence, layer-by-layer replay, Gram statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmprune.arch import adapter_for
from llmprune.compress.calibration import GramCollector, block_influence, capture_inputs, collect_grams, run_layer, token_cosine
from llmprune.testing import tiny_model

from .conftest import ARCHS

# --- block influence on hand-built cases -----------------------------------------------------------

def test_block_influence_identical_is_zero():
    h = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0))
    assert block_influence(h, h.clone()) == pytest.approx(0.0, abs=1e-12)
    # A pure rescaling of every token leaves the direction, so the influence is still zero.
    assert block_influence(h, 3.5 * h) == pytest.approx(0.0, abs=1e-12)


def test_block_influence_orthogonal_is_one():
    h_in = torch.zeros(2, 5, 4)
    h_out = torch.zeros(2, 5, 4)
    h_in[..., 0] = torch.arange(1, 11, dtype=torch.float32).reshape(2, 5)
    h_out[..., 1] = 2.0
    assert block_influence(h_in, h_out) == pytest.approx(1.0, abs=1e-12)
    # Opposite directions: cosine −1, influence 2.
    assert block_influence(h_in, -h_in) == pytest.approx(2.0, abs=1e-12)


def test_block_influence_mixed_tokens_is_the_mean():
    """Half the tokens unchanged (cos 1), half turned orthogonal (cos 0): influence 1/2."""
    h_in = torch.zeros(1, 5, 2)
    h_in[..., 0] = 1.0
    h_out = h_in.clone()
    h_out[0, 1:3] = torch.tensor([0.0, 1.0])  # tokens 1, 2 orthogonal; tokens 3, 4 unchanged; 0 is BOS
    assert block_influence(h_in, h_out) == pytest.approx(0.5, abs=1e-12)


def test_block_influence_excludes_bos_position():
    """Whatever happens at position 0 (the attention sink) does not count."""
    h_in = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    h_out = h_in.clone()
    h_out[:, 0] = -h_in[:, 0]  # BOS flipped: cosine −1 there
    assert block_influence(h_in, h_out) == pytest.approx(0.0, abs=1e-12)
    # Counting position 0 would see it: the cosines then include −1 for every window.
    with_bos = token_cosine(h_in, h_out, skip_first=False)
    assert with_bos.shape == (2, 6)
    assert torch.allclose(with_bos[:, 0], torch.full((2,), -1.0, dtype=torch.float64))
    assert token_cosine(h_in, h_out).shape == (2, 5)
    # Changing any non-BOS token is seen.
    h_out[:, 3] = -h_in[:, 3]
    assert block_influence(h_in, h_out) == pytest.approx(2.0 / 5.0, abs=1e-12)


def test_block_influence_single_token_windows_keep_their_token():
    h = torch.ones(2, 1, 3)
    assert block_influence(h, -h) == pytest.approx(2.0, abs=1e-12)


# --- the streamed pass replays the model exactly -----------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_layers_equal_the_models_hidden_states(arch, token_ids):
    """Layer ℓ run on its own, on the output of layer ℓ−1, with the captured masks / rotary
    embeddings, gives the model's own hidden state ℓ+1 — for sliding and full layers alike."""
    model = tiny_model(arch)
    ids = torch.cat([token_ids, token_ids.flip(0)[:, torch.randperm(40, generator=torch.Generator().manual_seed(0))]])
    ids[:, 0] = 1  # 4 windows, 2 per batch: the captured single-window arguments must broadcast
    with torch.inference_mode():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    stream = capture_inputs(model, ids, batch_size=3)
    layers = adapter_for(model).decoder_layers(model)
    assert len(stream.layer_kwargs) == len(layers)
    torch.testing.assert_close(stream.hidden, reference[0], rtol=0, atol=1e-6)
    hidden = stream.hidden
    for i, layer in enumerate(layers):
        hidden = run_layer(layer, hidden, stream.layer_kwargs[i], batch_size=3)
        if i < len(layers) - 1:
            torch.testing.assert_close(hidden, reference[i + 1], rtol=1e-5, atol=1e-5, msg=f"layer {i}")
    # The last hidden state HF returns is after the final norm.
    torch.testing.assert_close(model.model.norm(hidden), reference[-1], rtol=1e-5, atol=1e-5)
    # The stack is restored after capture.
    assert all(type(l).__name__.endswith("DecoderLayer") for l in adapter_for(model).decoder_layers(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_holds_through_a_deep_stack(arch, token_ids):
    """Eight layers: whatever the stack's loop does with a layer's output (Gemma-3 under
    transformers 4.5x takes `[0]` of it, which would shrink a bare tensor a rank per layer), the
    layer-by-layer run gives the model's own last hidden state."""
    layers = 8
    extra = {"layer_types": (["sliding_attention"] * 3 + ["full_attention"]) * 2} if arch == "gemma3_text" else {}
    model = tiny_model(arch, num_hidden_layers=layers, **extra)
    stream = capture_inputs(model, token_ids, batch_size=2)
    assert sorted(stream.layer_kwargs) == list(range(layers))
    hidden = stream.hidden
    for i, layer in enumerate(adapter_for(model).decoder_layers(model)):
        hidden = run_layer(layer, hidden, stream.layer_kwargs[i])
    with torch.inference_mode():
        expected = model.model(token_ids).last_hidden_state
    torch.testing.assert_close(model.model.norm(hidden), expected, rtol=1e-5, atol=1e-5)


def test_gemma3_sliding_and_full_layers_get_their_own_masks(token_ids):
    """The captured arguments differ between sliding and full layers, and it matters: running a
    sliding layer with a full layer's mask changes its output (40 tokens > window 16). (Under
    transformers 5 the rotary embeddings differ by kind too; the mask is swapped alone here.)"""
    model = tiny_model("gemma3_text")
    types = model.config.layer_types
    sliding, full = types.index("sliding_attention"), types.index("full_attention")
    stream = capture_inputs(model, token_ids, batch_size=2)
    layer = adapter_for(model).decoder_layers(model)[sliding]
    right = run_layer(layer, stream.hidden, stream.layer_kwargs[sliding])
    assert set(stream.layer_kwargs[sliding]) == set(stream.layer_kwargs[full])
    full_mask = dict(stream.layer_kwargs[sliding], attention_mask=stream.layer_kwargs[full]["attention_mask"])
    wrong = run_layer(layer, stream.hidden, full_mask)
    assert not torch.allclose(right[:, 17:], wrong[:, 17:], atol=1e-4)
    # Within the window both masks agree.
    torch.testing.assert_close(right[:, :16], wrong[:, :16], rtol=1e-5, atol=1e-5)


# --- Gram statistics ---------------------------------------------------------------------------------

def test_gram_collector_accumulates_inputs_over_batches():
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 10, 6, generator=torch.Generator().manual_seed(2))
    with collect_grams({"lin": lin}) as grams:
        with torch.no_grad():
            lin(x[:1])
            lin(x[1:])
    stats = grams["lin"]
    flat = x.reshape(-1, 6).double()
    assert stats.count == 40
    torch.testing.assert_close(stats.gram, flat.T @ flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.mean, flat.mean(0), rtol=1e-6, atol=1e-6)
    centered = flat - flat.mean(0)
    torch.testing.assert_close(stats.covariance(), centered.T @ centered, rtol=1e-5, atol=1e-5)
    # The hook is gone afterwards: more calls do not change the statistics.
    with torch.no_grad():
        lin(x)
    assert stats.count == 40
    assert not lin._forward_pre_hooks


def test_gram_collector_remove():
    lin = nn.Linear(2, 2)
    stats = GramCollector(lin)
    with torch.no_grad():
        lin(torch.ones(3, 2))
    stats.remove()
    with torch.no_grad():
        lin(torch.ones(5, 2))
    assert stats.count == 3
    torch.testing.assert_close(stats.gram, torch.full((2, 2), 3.0, dtype=torch.float64))
