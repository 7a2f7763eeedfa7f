"""compress on the real packaged Gemma-3-270M at a small calibration size (marked integration)."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune.compress import CompressConfig, compress

pytestmark = pytest.mark.integration


def test_comp_on_gemma_saves_a_checkpoint_that_loads_both_ways(shared_data, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = llmprune.load("gemma-3-270m")  # its own copy: compress prunes in place
    ids = llmprune.token_windows(tok, llmprune.load_texts(shared_data / "wikitext2/wiki.test.raw"), 128, 2)
    dense = llmprune.perplexity(model, ids, progress=False).perplexity

    calib = llmprune.load_texts(shared_data / "wikitext2/wiki.valid.tokens")
    cfg = CompressConfig(ratio=0.2, calib_samples=8, calib_seq_len=128, loss_windows=2)
    result = compress(model, cfg, tokenizer=tok, calib=calib, out=tmp_path / "pruned")
    report = result.report
    assert abs(report["ratio_achieved"] - 0.2) < 0.01
    assert report["params_after"]["embeddings"] == report["params_before"]["embeddings"]
    # The split sweep considered keeping every layer, and every kept layer type survived.
    assert report["split_candidates"][0]["layers_dropped"] == []
    assert model.config.layer_types == [t for i, t in enumerate(["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5
                                                                    + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"])
                                        if i in report["layer_map"]]
    pruned = llmprune.perplexity(model, ids, progress=False).perplexity
    # 8×128 calibration tokens are fewer than Gemma's 2048 MLP neurons, so this is far from the
    # 32×512 benchmark (38.9 on 8×512 windows); a broken model scores in the thousands.
    assert dense < pruned < 6 * dense, (dense, pruned, report["layers_dropped"], report["calibration_loss"])

    folder = tmp_path / "pruned"
    saved = json.loads((folder / "pruning_report.json").read_text())
    assert saved["calibration_loss"]["pruned"] < saved["calibration_loss"]["pruned_before_tuning"]
    with torch.inference_mode():
        expected = model(ids[:1, :64]).logits
        ours = llmprune.load_model(folder)(ids[:1, :64]).logits
        stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()(ids[:1, :64]).logits
    assert torch.allclose(ours, expected, atol=1e-4)
    assert torch.allclose(stock, expected, atol=1e-4)
    # The llama.cpp-exact tokenizer travels with the checkpoint.
    assert llmprune.load_tokenizer(folder)("Robert Boulter is an English film actor", add_special_tokens=False).input_ids == \
        [34326, 151936, 589, 563, 614, 5422, 4103, 13387]
