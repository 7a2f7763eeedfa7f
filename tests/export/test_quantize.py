"""int4's block fitting: k_quant (the default) against round to nearest, on a tiny model's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmprune.export import ExportConfig, export_onnx
from llmprune.export.parity import fixed_inputs
from llmprune.export.quantize import quantize_int4
from llmprune.export.runtime import OnnxCausalLM
from llmprune.testing import tiny_model, tiny_tokenizer


def test_k_quant_int4_is_closer_to_fp32_than_round_to_nearest(tmp_path):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    export_onnx(model, ExportConfig(), out=tmp_path / "fp32", tokenizer=tiny_tokenizer())
    ids = fixed_inputs(320, 48, 1).numpy()
    with torch.no_grad():
        reference = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    errors = {}
    for algorithm in ("rtn", "k_quant"):
        out = tmp_path / algorithm
        out.mkdir()
        info = quantize_int4(tmp_path / "fp32" / "model.onnx", out / "model.onnx", algorithm=algorithm, wide=())
        assert info["algorithm"] == algorithm
        logits, _ = OnnxCausalLM(out / "model.onnx", threads=1).forward(ids)
        errors[algorithm] = float(np.sqrt(np.mean((logits - reference) ** 2)))
    assert errors["k_quant"] < errors["rtn"], errors
    # same layout, same kernel: the files are the same size to a few bytes of node names
    sizes = {a: (tmp_path / a / "model.onnx").stat().st_size for a in errors}
    assert sizes["k_quant"] == pytest.approx(sizes["rtn"], rel=0.01)
