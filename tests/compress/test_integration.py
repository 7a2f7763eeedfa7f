"""compress on the real packaged Gemma-3-270M (marked integration): the checkpoint the README's
compress example writes (`readme_examples`, run once per session: ratio 0.2, 8x128 calibration)."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune

pytestmark = pytest.mark.integration

GEMMA_LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 3


def test_comp_on_gemma_saves_a_checkpoint_that_loads_both_ways(readme_examples, gemma, shared_data):
    from transformers import AutoModelForCausalLM

    assert readme_examples.returncode == 0, readme_examples.stderr[-4000:]
    folder = readme_examples.work / "pruned-py"
    report = json.loads((folder / "pruning_report.json").read_text())
    assert abs(report["ratio_achieved"] - 0.2) < 0.01
    assert report["params_after"]["embeddings"] == report["params_before"]["embeddings"]
    # The split sweep considered keeping every layer, and every kept layer type survived.
    assert report["split_candidates"][0]["layers_dropped"] == []
    config = llmprune.load_config(folder)
    assert config.layer_types == [t for i, t in enumerate(GEMMA_LAYER_TYPES) if i in report["layer_map"]]
    assert report["calibration_loss"]["pruned"] < report["calibration_loss"]["pruned_before_tuning"]

    model, tok = gemma
    ids = llmprune.token_windows(tok, llmprune.load_texts(shared_data / "wikitext2/wiki.test.raw"), 128, 2)
    dense = llmprune.perplexity(model, ids, progress=False).perplexity
    ours = llmprune.load_model(folder)
    pruned = llmprune.perplexity(ours, ids, progress=False).perplexity
    # 8x128 calibration tokens are fewer than Gemma's 2048 MLP neurons, so this is far from the
    # 32x512 benchmark (38.9 on 8x512 windows); a broken model scores in the thousands.
    assert dense < pruned < 6 * dense, (dense, pruned, report["layers_dropped"], report["calibration_loss"])
    with torch.inference_mode():
        expected = ours(ids[:1, :64]).logits
        stock = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()(ids[:1, :64]).logits
    assert torch.allclose(stock, expected, atol=1e-4)
    # The llama.cpp-exact tokenizer travels with the checkpoint.
    assert llmprune.load_tokenizer(folder)("Robert Boulter is an English film actor", add_special_tokens=False).input_ids == \
        [34326, 151936, 589, 563, 614, 5422, 4103, 13387]
