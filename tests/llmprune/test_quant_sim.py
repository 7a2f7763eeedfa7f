"""llmprune.quant_sim: weights rounded in PyTorch as the export stores them, against a real export."""

from __future__ import annotations

import numpy as np
import torch

from llmprune import artifact
from llmprune.quant_sim import round_asymmetric, round_symmetric, simulate
from llmprune.testing import tiny_model, tiny_tokenizer


def test_rounding_keeps_each_block_in_its_grid():
    w = torch.randn(6, 70)
    for bits in (4, 8):
        r = round_asymmetric(w, bits, 32)
        assert r.shape == w.shape and (r - w).abs().max() < (w.max() - w.min()) / (2 ** bits - 1)
        for block in range(0, 70, 32):
            assert len(torch.unique(r[0, block:block + 32])) <= 2 ** bits
    s = round_symmetric(w, 8, 32)
    assert (s - w).abs().max() <= w.abs().max() / 127 / 2 + 1e-6


def test_simulated_int4_runs_like_the_exported_int4(tmp_path):
    """The logits of the PyTorch model rounded as the rtn int4 export stores it are far closer to
    that export's than the fp32 model's are."""
    from llmprune.export import ExportConfig, OnnxCausalLM, export_onnx

    torch.set_num_threads(1)
    model, tok = tiny_model("qwen3", hidden_size=64, intermediate_size=96), tiny_tokenizer()
    export_onnx(model, ExportConfig(quantize="int4", int4_fit="rtn", threads=1), out=tmp_path / "onnx", tokenizer=tok)
    ids = np.array([[1, 40, 41, 42, 43, 44, 45, 46]])
    exported = OnnxCausalLM(tmp_path / "onnx" / "int4", threads=1).forward(ids)[0]
    with torch.no_grad():
        fp32 = model(torch.tensor(ids)).logits.numpy()
        simulate(model, artifact.layout("int4"))
        simulated = model(torch.tensor(ids)).logits.numpy()
    rms = lambda a: float(np.sqrt(np.mean((a - exported) ** 2)))  # noqa: E731
    assert rms(simulated) < rms(fp32) / 4, (rms(simulated), rms(fp32))
