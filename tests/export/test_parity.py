"""PyTorch's side of the parity checks, taken once: the margins kept for near ties, and an export
that frees the model's weights once that side is taken."""

from __future__ import annotations

import torch

from llmprune.export import export_onnx
from llmprune.export.parity import TOP_LOGITS, torch_greedy

from .conftest import fast_config, pruned_tiny_model


def test_tie_gap_is_pytorchs_margin_at_the_step():
    torch.manual_seed(0)
    model = pruned_tiny_model("llama").eval()
    prompt = [1, 7, 9, 11]
    greedy = torch_greedy(model, prompt, 4)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + greedy.tokens[:2]])).logits[0, -1]
    order = torch.argsort(logits, descending=True).tolist()
    assert order[0] == greedy.tokens[2]
    runner_up, outside = order[1], order[TOP_LOGITS + 5]
    assert abs(greedy.tie_gap(2, runner_up) - float(logits[order[0]] - logits[runner_up])) < 1e-4
    assert greedy.tie_gap(2, outside) is None          # not among PyTorch's largest logits: no near tie
    assert greedy.tie_gap(len(greedy.tokens), runner_up) is None


def test_an_export_that_owns_the_model_frees_its_weights(tmp_path):
    model = pruned_tiny_model("gemma3_text")
    result = export_onnx(model, fast_config(), tmp_path / "onnx", release_model=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    fp32 = result.report["variants"]["fp32"]
    assert fp32["logits"]["max_abs_logit_diff"] < 1e-4 and fp32["generation"]["all_equal"]
    assert fp32["perplexity"]["torch"] > 1
