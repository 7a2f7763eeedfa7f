"""The compress pipeline on tiny models: exact ratio accounting, determinism, every baseline, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from llmprune.compress import METHODS, CompressConfig, compress
from llmprune.compress.pruner import taylor_gradients
from llmprune.errors import LLMPruneError
from llmprune.testing import TINY_TEXT, tiny_model


def unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def decoder_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.parameters())


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


# --- exact ratio accounting -----------------------------------------------------------------------

RATIO_CASES = [
    # (arch, method, ratio, extra config)
    ("llama", "comp", 0.1, {}),
    ("llama", "comp", 0.3, {"prune_heads": True, "head_ratio": 0.5}),
    ("gemma3_text", "comp", 0.45, {"allocation": "uniform", "fit": "scales", "intercept": True}),
    ("qwen3", "comp", 0.2, {"layer_share": 0.0}),
    ("qwen2", "wanda-sp", 0.25, {}),
    ("mistral", "wanda-sp", 0.4, {"prune_heads": True, "head_ratio": 0.5}),
    ("llama", "fluctuation", 0.2, {}),  # FLAP adds an output bias, paid for from the budget
    ("gemma3_text", "fluctuation", 0.35, {"prune_heads": True, "head_ratio": 0.5}),
    ("llama", "layer-only", 0.25, {}),
    ("qwen2", "layer-only", 0.6, {}),
    ("gemma3_text", "magnitude", 0.15, {}),
    ("qwen3", "random", 0.5, {}),
    ("mistral", "taylor", 0.3, {}),
]


@pytest.mark.parametrize("arch,method,ratio,extra", RATIO_CASES,
                         ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(v) or "default")
def test_ratio_achieved_and_params_after_are_exact(arch, method, ratio, extra, tok, calib_texts, small_config, token_ids):
    model = tiny_model(arch)
    before_decoder, before_total = decoder_params(model), unique_params(model)
    report = compress(model, small_config(ratio=ratio, method=method, **extra), tokenizer=tok, calib=calib_texts).report
    assert abs(report["ratio_achieved"] - ratio) <= 0.01, report["ratio_achieved"]
    assert report["ratio_requested"] == ratio
    # The report's numbers are a recount of the pruned model.
    assert report["params_before"]["total"] == before_total
    assert report["params_before"]["decoder_layers"] == before_decoder
    assert report["params_after"]["total"] == unique_params(model)
    assert report["params_after"]["decoder_layers"] == decoder_params(model)
    assert report["ratio_achieved"] == pytest.approx(1 - decoder_params(model) / before_decoder, abs=1e-12)
    assert report["total_reduction"] == pytest.approx(1 - unique_params(model) / before_total, abs=1e-12)
    assert report["params_after"]["embeddings"] == report["params_before"]["embeddings"]  # never pruned
    # The report's per-layer rows agree with the model.
    kept_rows = [r for r in report["layers"] if not r["dropped"]]
    assert [r["original_index"] for r in kept_rows] == report["layer_map"]
    assert [r["neurons_after"] for r in kept_rows] == [l.mlp.down_proj.in_features for l in model.model.layers]
    assert [r["heads_after"] for r in kept_rows] == [l.self_attn.q_proj.out_features // 16 for l in model.model.layers]
    if extra.get("prune_heads"):
        assert all(r["heads_after"] == 2 for r in kept_rows)
    if method == "fluctuation" or extra.get("intercept"):
        assert all(l.mlp.down_proj.bias is not None for l in model.model.layers)
    out = logits(model, token_ids)
    assert torch.isfinite(out).all()


def test_comp_auto_split_keeps_the_lowest_calibration_loss(tok, calib_texts, small_config):
    model = tiny_model("llama")
    report = compress(model, small_config(ratio=0.3), tokenizer=tok, calib=calib_texts).report
    candidates = report["split_candidates"]
    assert [len(c["layers_dropped"]) for c in candidates] == [0, 1]  # zero layers is always a candidate
    best = min(candidates, key=lambda c: c["calibration_loss"])
    assert report["layers_dropped"] == best["layers_dropped"]
    assert report["calibration_loss"]["pruned"] == best["calibration_loss"]
    losses = report["calibration_loss"]
    assert math.isfinite(losses["dense"]) and math.isfinite(losses["pruned_before_tuning"])
    for row in report["layers"]:
        if not row["dropped"]:
            assert row["mlp_error_after"] < row["mlp_error_before"]
            assert row["kappa_kept"] >= 1.0


@pytest.mark.parametrize("losses, patience, more", [
    ([4.0], 2, True), ([4.0, 4.3], 2, True),            # fewer than N candidates after the best: go on
    ([4.0, 4.3, 4.5], 2, False), ([4.0, 4.3], 1, False),  # N in a row above the best: stop
    ([4.0, 4.3, 3.9], 2, True),                          # the last one lowered it
    ([4.0, 4.3, 4.5, 4.9], 0, True),                     # 0: every count
])
def test_the_split_search_stops_after_patience_candidates_that_do_not_beat_the_best(losses, patience, more):
    from llmprune.compress.pruner import worth_another

    assert worth_another([(None, loss) for loss in losses], patience) is more


def test_split_patience_cuts_the_search_and_keeps_its_best(tok, calib_texts, small_config):
    every = compress(tiny_model("llama"), small_config(ratio=0.5, split_patience=0), tokenizer=tok,
                     calib=calib_texts).report
    losses = [c["calibration_loss"] for c in every["split_candidates"]]
    assert len(losses) >= 3
    first = compress(tiny_model("llama"), small_config(ratio=0.5, split_patience=1), tokenizer=tok,
                     calib=calib_texts).report
    tried = first["split_candidates"]
    # one candidate past the best so far that did not beat it ends the search
    stop = next((i for i in range(1, len(losses)) if losses[i] >= min(losses[:i])), len(losses) - 1)
    assert stop < len(losses) - 1, losses      # the search did stop early (this model's losses rise too)
    assert [c["calibration_loss"] for c in tried] == pytest.approx(losses[:stop + 1])
    assert first["calibration_loss"]["pruned"] == pytest.approx(min(losses[:stop + 1]))


def test_error_allocation_differs_from_uniform(tok, calib_texts, small_config):
    uniform = compress(tiny_model("llama"), small_config(ratio=0.3, layer_share=0.0, allocation="uniform"),
                       tokenizer=tok, calib=calib_texts).report
    error = compress(tiny_model("llama"), small_config(ratio=0.3, layer_share=0.0, allocation="error"),
                     tokenizer=tok, calib=calib_texts).report
    widths_uniform = [r["neurons_after"] for r in uniform["layers"]]
    widths_error = [r["neurons_after"] for r in error["layers"]]
    assert max(widths_uniform) - min(widths_uniform) <= 1
    assert sum(widths_error) == pytest.approx(sum(widths_uniform), abs=1)
    assert widths_error != widths_uniform
    assert min(widths_error) >= 0.25 * 128


def test_layer_only_drops_the_lowest_block_influence(tok, calib_texts, small_config):
    report = compress(tiny_model("qwen2"), small_config(ratio=0.5, method="layer-only"), tokenizer=tok, calib=calib_texts).report
    influence = {r["original_index"]: r["block_influence"] for r in report["layers"]}
    assert len(report["layers_dropped"]) == 2 and 0 not in report["layers_dropped"]
    lowest = sorted((i for i in influence if i != 0), key=influence.get)[:2]
    assert sorted(report["layers_dropped"]) == sorted(lowest)


# --- determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,extra", [("comp", {"prune_heads": True, "head_ratio": 0.5}), ("random", {})])
def test_same_inputs_and_seed_give_identical_weights(method, extra, tok, calib_texts, small_config, compare_state_dicts):
    runs = []
    for _ in range(2):
        model = tiny_model("gemma3_text")
        report = compress(model, small_config(ratio=0.3, method=method, seed=3, **extra), tokenizer=tok, calib=calib_texts).report
        runs.append((model.state_dict(), report))
    (a, ra), (b, rb) = runs
    assert compare_state_dicts(a, b) == []
    assert ra["layer_map"] == rb["layer_map"]
    assert [r.get("kept_heads") for r in ra["layers"]] == [r.get("kept_heads") for r in rb["layers"]]
    if method == "random":  # and the seed matters
        other = tiny_model("gemma3_text")
        compress(other, small_config(ratio=0.3, method=method, seed=4, **extra), tokenizer=tok, calib=calib_texts)
        assert compare_state_dicts(a, other.state_dict()) != []


# --- every method ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_gives_finite_logits(method, tok, calib_texts, small_config, token_ids):
    model = tiny_model("gemma3_text")
    dense = logits(model, token_ids)
    report = compress(model, small_config(ratio=0.4, method=method, prune_heads=True, head_ratio=0.5), tokenizer=tok,
                      calib=calib_texts).report
    assert report["method"] == method
    out = logits(model, token_ids)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, dense)
    assert math.isfinite(report["calibration_loss"]["pruned"])


def test_taylor_uses_gradients_and_leaves_no_grad_behind(tok, calib_texts, small_config):
    model = tiny_model("llama").requires_grad_(False)
    windows = torch.randint(3, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = taylor_gradients(model, windows)
    assert set(grads) == {0, 1, 2, 3}
    for i, layer in enumerate(model.model.layers):
        assert grads[i]["down_proj"].shape == layer.mlp.down_proj.weight.shape
        assert grads[i]["q_proj"].shape == layer.self_attn.q_proj.weight.shape
        assert all(g.abs().sum() > 0 for g in grads[i].values())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())

    compress(model, small_config(ratio=0.3, method="taylor"), tokenizer=tok, calib=calib_texts)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    # Its choice is not the magnitude baseline's.
    magnitude = tiny_model("llama")
    compress(magnitude, small_config(ratio=0.3, method="magnitude"), tokenizer=tok, calib=calib_texts)
    assert any(not torch.equal(a.mlp.up_proj.weight, b.mlp.up_proj.weight)
               for a, b in zip(model.model.layers, magnitude.model.layers))


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_zero_one(ratio):
    with pytest.raises(LLMPruneError, match="--ratio must be between 0 and 1"):
        CompressConfig(ratio=ratio)


@pytest.mark.parametrize("overrides,fragment", [
    ({"method": "obs"}, "unknown method"),
    ({"fit": "exact"}, "unknown fit"),
    ({"allocation": "greedy"}, "unknown allocation"),
    ({"layer_share": "most"}, "--layer-share"),
    ({"layer_share": 1.5}, "--layer-share"),
    ({"head_ratio": 1.0}, "--head-ratio"),
    ({"calib_samples": 0}, "--calib-samples"),
])
def test_bad_config_values(overrides, fragment):
    with pytest.raises(LLMPruneError, match=fragment):
        CompressConfig(**overrides)


def test_too_little_calibration_text_names_the_token_counts(tok, small_config, compare_state_dicts):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = TINY_TEXT
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n_tokens < 400 * 32
    with pytest.raises(LLMPruneError) as info:
        compress(model, small_config(ratio=0.2, calib_samples=400), tokenizer=tok, calib=[text])
    message = str(info.value)
    assert "too little calibration text" in message
    assert f"{n_tokens} tokens" in message and "400×32" in message
    assert compare_state_dicts(before, model.state_dict()) == []


@pytest.mark.parametrize("overrides,fragment", [
    ({"ratio": 0.8, "method": "wanda-sp"}, "no MLP neuron"),  # neurons only: the MLPs are ~2/3 of the layers
    ({"ratio": 0.99, "method": "layer-only"}, "no MLP neuron"),  # 3 layers dropped, the last one emptied
    ({"ratio": 0.7, "layer_share": 0.0, "allocation": "error"}, "minimum kept fraction"),
])
def test_a_ratio_that_leaves_no_neuron_is_refused(overrides, fragment, tok, calib_texts, small_config, compare_state_dicts):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LLMPruneError, match=fragment):
        compress(model, small_config(**overrides), tokenizer=tok, calib=calib_texts)
    assert compare_state_dicts(before, model.state_dict()) == []  # the model is untouched


def test_comp_auto_split_with_no_feasible_split_is_a_clear_error(tok, calib_texts, small_config):
    with pytest.raises(LLMPruneError):
        compress(tiny_model("llama"), small_config(ratio=0.95), tokenizer=tok, calib=calib_texts)


def test_unsupported_architecture(gpt2_ckpt, calib_texts, small_config):
    with pytest.raises(LLMPruneError, match="unsupported architecture 'gpt2'"):
        compress(str(gpt2_ckpt), small_config(ratio=0.2), calib=calib_texts)


def test_a_loaded_model_needs_its_tokenizer(calib_texts, small_config):
    with pytest.raises(ValueError, match="tokenizer"):
        compress(tiny_model("llama"), small_config(ratio=0.2), calib=calib_texts)
