"""LoRA on (pruned) models: canonical names, array round trips through peft, and the merged
model (LoRA folded into the weights) computing what the adapter model computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.checkpoint import REPORT_FILE
from llmprune.errors import LLMPruneError
from llmprune.fedrecover import (
    TARGET_MODULES,
    attach_lora,
    detach_lora,
    get_lora_arrays,
    lora_applied,
    merge_lora,
    module_shapes,
    set_lora_arrays,
)
from llmprune.fedrecover.lora import init_arrays, top_layer_modules
from llmprune.fedrecover.server_app import write_recovered
from llmprune.testing import tiny_model

ARCHS = ("llama", "gemma3_text", "qwen3", "mistral")
SCALE = 2.0


def ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 320, (2, 24), generator=g)
    x[:, 0] = 1
    return x


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def trained_like(shapes, modules, rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded LoRA arrays with a non-zero B (as after training), large enough to move the logits."""
    arrays = init_arrays(shapes, modules, rank, seed)
    rng = np.random.default_rng(seed + 1)
    for key in arrays:
        if key.endswith(".B"):
            arrays[key] = (0.1 * rng.standard_normal(arrays[key].shape)).astype(np.float32)
    return arrays


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_canonical_names_and_shapes_of_a_pruned_checkpoint(pruned_ckpt):
    model = llmprune.load_model(pruned_ckpt)
    shapes = module_shapes(model, TARGET_MODULES)
    layers = model.model.layers
    assert len(layers) == 3
    assert list(shapes)[:7] == [f"0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [f"0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert len(shapes) == 7 * len(layers)
    for i, layer in enumerate(layers):
        assert shapes[f"{i}.mlp.down_proj"] == (64, layer.mlp.down_proj.in_features)
        assert shapes[f"{i}.self_attn.q_proj"] == (layer.self_attn.q_proj.out_features, 64)
    widths = [shapes[f"{i}.mlp.gate_proj"][0] for i in range(len(layers))]
    assert min(widths) < 128, "the fixture should have narrowed MLPs"
    assert shapes["0.self_attn.q_proj"][0] < 64, "the fixture should have pruned heads"
    # only some target modules
    only = module_shapes(model, ("q_proj", "v_proj"))
    assert set(only) == {f"{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")}
    with pytest.raises(LLMPruneError, match="no LoRA target modules"):
        module_shapes(model, ("c_attn",))


def test_top_layer_modules_take_the_top_layers():
    shapes = module_shapes(tiny_model("llama"), TARGET_MODULES)
    assert {m.split(".")[0] for m in top_layer_modules(shapes, 1)} == {"3"}
    assert {m.split(".")[0] for m in top_layer_modules(shapes, 2)} == {"2", "3"}
    assert len(top_layer_modules(shapes, 4)) == len(top_layer_modules(shapes, 9)) == 28


@pytest.mark.parametrize("arch", ARCHS)
def test_get_and_set_arrays_round_trip_under_canonical_names(arch):
    model = tiny_model(arch)
    before = state(model)
    shapes = module_shapes(model, TARGET_MODULES)
    modules = top_layer_modules(shapes, 2)
    arrays = trained_like(shapes, modules, rank=3)
    peft_model = attach_lora(model, arrays, SCALE)
    got = get_lora_arrays(peft_model)
    assert set(got) == set(arrays) == {f"{m}.{p}" for m in modules for p in "AB"}
    for key in arrays:
        np.testing.assert_array_equal(got[key], arrays[key])
        out_f, in_f = shapes[key[:-2]]
        assert got[key].shape == ((3, in_f) if key.endswith(".A") else (out_f, 3))
    other = trained_like(shapes, modules, rank=3, seed=5)
    set_lora_arrays(peft_model, other)
    for key, value in get_lora_arrays(peft_model).items():
        np.testing.assert_array_equal(value, other[key])
    # only the adapters train
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # wrong shape, missing and unknown modules are refused
    key = next(iter(arrays))
    with pytest.raises(LLMPruneError, match="has shape"):
        set_lora_arrays(peft_model, {**arrays, key: np.zeros((7, 7), np.float32)})
    with pytest.raises(LLMPruneError, match="adapter has no"):
        set_lora_arrays(peft_model, {k: v for k, v in arrays.items() if k != key})
    with pytest.raises(LLMPruneError, match="modules the model lacks"):
        set_lora_arrays(peft_model, {**arrays, "0.self_attn.q_proj.A": np.zeros((3, 64), np.float32)})
    base = detach_lora(peft_model)
    assert not [n for n, _ in base.named_modules() if "lora" in n.lower()]
    after = state(base)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def _check_three_ways(model, arrays, x, atol=2e-5):
    """peft adapter model == lora_applied hooks == merged weights; returns the logits."""
    base_logits = logits(model, x)
    with lora_applied(model, arrays, SCALE):
        hooked = logits(model, x)
    torch.testing.assert_close(logits(model, x), base_logits, rtol=0, atol=0)     # hooks removed again
    peft_model = attach_lora(model, arrays, SCALE)
    peft_model.eval()
    via_peft = logits(peft_model, x)
    detach_lora(peft_model)
    torch.testing.assert_close(logits(model, x), base_logits, rtol=0, atol=0)     # base untouched
    assert (via_peft - base_logits).abs().max() > 1e-2, "the adapter should change the logits"
    torch.testing.assert_close(hooked, via_peft, rtol=0, atol=atol)
    merge_lora(model, arrays, SCALE)
    merged = logits(model, x)
    torch.testing.assert_close(merged, via_peft, rtol=0, atol=atol)
    return via_peft


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_equals_the_adapter_model(arch):
    model = tiny_model(arch)
    shapes = module_shapes(model, TARGET_MODULES)
    arrays = trained_like(shapes, list(shapes), rank=4)
    _check_three_ways(model, arrays, ids())


@pytest.mark.parametrize("depth", [1, 3])
def test_merged_pruned_model_equals_the_adapter_model_and_survives_writing(pruned_ckpt, tok, tmp_path, depth):
    """On the pruned checkpoint (per-layer widths, fitted biases), also after writing the
    recovered checkpoint and loading it back both ways."""
    model = llmprune.load_model(pruned_ckpt)
    shapes = module_shapes(model, TARGET_MODULES)
    arrays = trained_like(shapes, top_layer_modules(shapes, depth), rank=4, seed=depth)
    x = ids(1)
    expected = _check_three_ways(llmprune.load_model(pruned_ckpt), arrays, x)

    metrics = {"rounds": [{}], "initial_eval_perplexity": 10.0, "final_eval_perplexity": 9.0, "aggregation": "fedavg"}
    out = tmp_path / "recovered"
    write_recovered(model, tok, arrays, SCALE, out, metrics, str(pruned_ckpt), overwrite=False)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["recovery"]["modules"] == 7 * depth and report["recovery"]["source"] == str(pruned_ckpt)
    assert report["layer_map"] == json.loads((pruned_ckpt / REPORT_FILE).read_text())["layer_map"]  # compress's report kept
    for loaded in (llmprune.load_model(out),
                   AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()):
        torch.testing.assert_close(logits(loaded, x), expected, rtol=0, atol=2e-5)
        assert [l.mlp.gate_proj.out_features for l in loaded.model.layers] == \
            [l.mlp.gate_proj.out_features for l in model.model.layers]


def test_merge_is_done_in_float64_then_cast(pruned_ckpt):
    model = llmprune.load_model(pruned_ckpt)
    shapes = module_shapes(model, TARGET_MODULES)
    arrays = trained_like(shapes, ["2.mlp.down_proj"], rank=2)
    w = model.model.layers[2].mlp.down_proj.weight.detach().double().clone()
    expected = w + SCALE * (torch.from_numpy(arrays["2.mlp.down_proj.B"]).double()
                            @ torch.from_numpy(arrays["2.mlp.down_proj.A"]).double())
    merge_lora(model, arrays, SCALE)
    torch.testing.assert_close(model.model.layers[2].mlp.down_proj.weight, expected.float(), rtol=0, atol=0)
    # other modules untouched
    fresh = llmprune.load_model(pruned_ckpt)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, fresh.model.layers[1].mlp.down_proj.weight,
                               rtol=0, atol=0)
