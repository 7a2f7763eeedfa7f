"""The real packaged Gemma-3-270M, structurally pruned (a layer dropped, an MLP narrowed, query
heads pruned), exported fp32 + int4 (marked integration; a few minutes on two cores)."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune.compress.checkpoint import record_shapes
from llmprune.compress.surgery import drop_layers, prune_mlp_neurons, prune_query_heads
from llmprune.export import ExportConfig, OnnxCausalLM, export_onnx

pytestmark = pytest.mark.integration


def test_pruned_gemma_exports_fp32_and_int4(shared_data, tmp_path):
    model, tok = llmprune.load("gemma-3-270m")
    kept = drop_layers(model, [8])  # the layer of lowest block influence
    layers = model.model.layers
    prune_mlp_neurons(layers[3], torch.arange(1536))
    prune_query_heads(layers[5], torch.tensor([0, 1]))
    record_shapes(model, kept, original_num_layers=18)
    with (shared_data / "wikitext2" / "wiki.test.raw").open(encoding="utf-8") as f:
        text = f.read(20_000)

    config = ExportConfig(quantize="int4", parity_tokens=8, eval_windows=2, eval_seq_len=64)
    result = export_onnx(model, config, tmp_path / "onnx", tokenizer=tok, eval_texts=[text])
    report = result.report
    print(json.dumps({k: report[k] for k in ("dedupe", "export_seconds", "seconds")}, indent=1))
    fp32, int4 = report["variants"]["fp32"], report["variants"]["int4"]
    for name, v in report["variants"].items():
        print(name, v["sizes"]["onnx_bytes"], v["logits"]["max_abs_logit_diff"], v["perplexity"],
              [r["equal"] for r in v["generation"]["prompts"]], v.get("quantize_seconds"), v["check_seconds"])

    assert report["model"]["num_hidden_layers"] == 17
    assert fp32["logits"]["max_abs_logit_diff"] < 1e-3
    assert fp32["generation"]["all_equal_or_near_tie"]
    # The 168M-parameter tied table is stored once: about 1.07 GB instead of the exporter's 1.7 GB.
    table = 262144 * 640 * 4
    assert report["dedupe"]["raw_bytes"] - report["dedupe"]["bytes"] > 0.95 * table
    assert fp32["sizes"]["onnx_bytes"] < 1.15e9
    # int4 with the embedding quantized too: at most 30% of fp32, and still a language model.
    assert int4["size_vs_fp32"] < 0.30
    # 2 short windows of WikiText after pruning (measured 69; a broken export gives thousands).
    assert fp32["perplexity"]["onnx"] < 150
    # Measured +70% (69.2 -> 117.9) with the defaults (symmetric RTN, accuracy_level 4, the tied
    # table in 4 bits): too lossy, an open problem (docs/export.md); a broken int4 file gives x10+.
    assert int4["perplexity"]["change"] < 1.0
    lm = OnnxCausalLM(result.path / "int4")
    ids = tok("The capital of France is")["input_ids"]
    text_out = tok.decode(lm.generate(ids, 6))
    assert text_out.strip()
