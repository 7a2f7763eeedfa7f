"""The traced decoder (export/decoder_graph.py): its masks equal transformers' own on every real
position, and the ONNX file it writes equals the PyTorch model with left padding, an empty past
and a past longer than Gemma's sliding window, on whichever transformers is installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from llmprune.export.decoder_graph import cache_tensors, flat_forward, io_names, trace_to_onnx
from llmprune.testing import tiny_model

from .conftest import ARCHS

PAD = 3  # left padding of the second row


def _inputs(model, past: int, new: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    ids = torch.randint(3, config.vocab_size, (2, new), generator=generator)
    mask = torch.ones(2, past + new, dtype=torch.int64)
    mask[1, :PAD] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    shape = (2, config.num_key_value_heads, past, config.head_dim)
    cache = [torch.randn(shape, generator=generator) for _ in range(2 * config.num_hidden_layers)]
    return ids, mask, positions, cache


def _stock(model, ids, mask, positions, cache) -> torch.Tensor:
    """The logits of the model's own forward (transformers builds the masks)."""
    past = DynamicCache()
    for i in range(model.config.num_hidden_layers):
        past.update(cache[2 * i], cache[2 * i + 1], i)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past).logits


def _real(logits: torch.Tensor, past: int) -> list[torch.Tensor]:
    """The rows whose query is a real token (fully padded query rows are never read)."""
    return [logits[0], logits[1, max(0, PAD - past):]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("past,new", [(0, 9), (20, 3), (30, 1)])  # Gemma's window is 16
def test_flat_forward_equals_the_stock_forward(arch, past, new):
    model = tiny_model(arch)
    ids, mask, positions, cache = _inputs(model, past, new)
    expected = _stock(model, ids, mask, positions, cache)
    with flat_forward(model), torch.no_grad():
        out = model(ids, mask, positions, *cache)
    assert len(out) == 1 + 2 * model.config.num_hidden_layers
    for got, want in zip(_real(out[0], past), _real(expected, past)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert out[1].shape[2] == past + new  # present = past + new
    assert type(model).forward is model.forward.__func__  # the class's forward is back


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_traced_file_equals_pytorch_on_other_shapes(arch, tmp_path):
    """Traced once (batch 2, past 4, 3 new tokens); run at other batch sizes and lengths."""
    import onnxruntime as ort

    model = tiny_model(arch)
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        trace_to_onnx(model, str(path), 18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = io_names(model.config.num_hidden_layers)
    assert [i.name for i in session.get_inputs()] == inputs
    assert [o.name for o in session.get_outputs()] == outputs
    for past, new in [(0, 9), (20, 1), (30, 4)]:
        ids, mask, positions, cache = _inputs(model, past, new, seed=past)
        expected = _stock(model, ids, mask, positions, cache)
        feed = dict(zip(inputs, [t.numpy() for t in (ids, mask, positions, *cache)]))
        got = torch.from_numpy(session.run(None, feed)[0])
        for a, b in zip(_real(got, past), _real(expected, past)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


def test_cache_tensors_reads_each_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 9]]), use_cache=True)
    pairs = cache_tensors(out.past_key_values)
    assert len(pairs) == model.config.num_hidden_layers
    assert all(k.shape == v.shape == (1, 2, 3, 16) for k, v in pairs)
