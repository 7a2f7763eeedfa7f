"""Prune⇄tune: the schedule, the ratio arithmetic, the LoRA re-mapping after a cut, and one server
step (fold the LoRA in, cut with compress, keep the survivors' LoRA, take it back out) on tiny
llamas: the step must compute exactly what the pruned merged model computes, keep the surviving
modules' LoRA as it was, land on the target ratio to within one MLP neuron and be deterministic."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.fedrecover.lora import lora_applied, merge_lora, module_shapes
from llmprune.fedrecover.prune_tune import (
    PruneStep,
    compress_config_for,
    current_ratio,
    decoder_params,
    dense_decoder_params,
    prune_schedule,
    prune_step,
    relative_ratio,
    remap_lora,
)
from llmprune.testing import tiny_model

from .conftest import varied_text

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCALE = 2.0
# 8 query heads in 2 KV groups of 4 (head_dim 8), so a step can prune heads evenly within the groups
HEADS = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
NEURON = 3 * 64  # parameters of one MLP neuron of the tiny llamas: gate row + up row + down column


# --- the schedule and the ratio arithmetic --------------------------------------------------------

@pytest.mark.parametrize("start, target, rounds, every, expected", [
    (0.0, 0.4, 4, 2, {1: 0.2, 3: 0.4}),
    (0.0, 0.5, 10, 3, {1: 0.125, 4: 0.25, 7: 0.375, 10: 0.5}),
    (0.2, 0.5, 6, 2, {1: 0.3, 3: 0.4, 5: 0.5}),
    (0.1, 0.7, 5, 1, {1: 0.22, 2: 0.34, 3: 0.46, 4: 0.58, 5: 0.7}),
    (0.2, 0.5, 5, 5, {1: 0.5}),  # every == rounds: prune once, then tune
    (0.2, 0.5, 3, 10, {1: 0.5}),  # every > rounds: the same
    (0.0, 0.3, 1, 1, {1: 0.3}),
])
def test_prune_schedule(start, target, rounds, every, expected):
    schedule = prune_schedule(start, target, rounds, every)
    assert list(schedule) == list(expected)
    assert list(schedule.values()) == pytest.approx(list(expected.values()), abs=1e-12)
    assert schedule[max(schedule)] == target  # exactly, not up to float rounding


def test_prune_schedule_last_step_is_exactly_the_target_even_where_floats_drift():
    for start, target in ((0.1, 0.7), (1 / 3, 0.9), (0.123456, 0.654321)):
        for every in (1, 2, 3, 7):
            schedule = prune_schedule(start, target, 20, every)
            assert schedule[max(schedule)] == target
            ratios = list(schedule.values())
            assert all(a < b for a, b in zip(ratios, ratios[1:]))
            assert ratios[0] > start


def test_prune_schedule_refuses_a_target_below_the_checkpoint():
    with pytest.raises(LLMPruneError) as err:
        prune_schedule(0.2, 0.1, 4, 2)
    assert "--target-ratio 0.1 is below the checkpoint's ratio 0.2" in str(err.value)
    assert "\n" not in str(err.value.args[0])


@pytest.mark.parametrize("target", [0.0, -0.1, 1.0, 1.5])
def test_prune_schedule_refuses_a_target_outside_0_1(target):
    with pytest.raises(LLMPruneError, match="--target-ratio must be between 0 and 1"):
        prune_schedule(0.0, target, 4, 2)


def test_prune_schedule_at_the_target_prunes_nothing():
    assert prune_schedule(0.3, 0.3, 4, 2) == {}
    assert prune_schedule(0.40052, 0.4, 4, 2) == {}  # the tiny checkpoint compress cut "at 0.4", to whole neurons
    assert prune_schedule(0.4, 0.4005, 4, 2) == {}
    assert prune_schedule(0.4, 0.402, 4, 4) == {1: 0.402}


def test_ratio_arithmetic_on_a_tiny_llama():
    model = tiny_model("llama")
    dense = decoder_params(model)
    assert dense == 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64)
    assert dense_decoder_params(model, None) == dense
    assert current_ratio(model, dense) == 0.0
    assert relative_ratio(model, dense, 0.3) == pytest.approx(0.3)
    # a model at 0.2 of a dense twice as large as 5/4 of it: 0.5 of the dense is 0.375 of it
    assert relative_ratio(model, int(dense * 1.25), 0.5) == pytest.approx(1 - 0.5 * 1.25)
    assert current_ratio(model, int(dense * 1.25)) == pytest.approx(0.2)


def test_dense_decoder_params_from_the_report():
    model = tiny_model("llama")
    own = decoder_params(model)
    assert dense_decoder_params(model, {"params_before": {"decoder_layers": own + 1000}}) == own + 1000
    # a prune-tune checkpoint: params_before is the model before that step, the dense count is recorded
    assert dense_decoder_params(model, {"params_before": {"decoder_layers": own + 10},
                                        "dense_decoder_params": own + 500}) == own + 500
    assert dense_decoder_params(model, {"recovery": {}}) == own  # a report without sizes
    assert dense_decoder_params(model, {"params_before": {"decoder_layers": own - 1}}) == own  # not this model's


def test_dense_decoder_params_of_a_compressed_checkpoint(pruned_ckpt):
    from llmprune.checkpoint import REPORT_FILE
    from llmprune.models import load_model

    report = json.loads((pruned_ckpt / REPORT_FILE).read_text())
    model = load_model(str(pruned_ckpt))
    dense = dense_decoder_params(model, report)
    assert dense == decoder_params(tiny_model("llama"))
    assert current_ratio(model, dense) == pytest.approx(report["ratio_achieved"], abs=1e-12)


def test_compress_config_for_keeps_the_method_and_leaves_the_step_its_own():
    saved = {"ratio": 0.4, "of": "total", "vocab": 100, "method": "wanda-sp", "prune_heads": True, "head_ratio": 0.5,
             "layer_share": 0.7, "intercept": True, "low_memory": True, "seed": 5, "calib_samples": 8,
             "calib_seq_len": 64, "loss_windows": 3, "not_a_field": 1}
    cfg = compress_config_for({"config": saved}, seed=1, calib_seq_len=32)
    assert (cfg.method, cfg.prune_heads, cfg.layer_share, cfg.intercept, cfg.loss_windows) == ("wanda-sp", True, 0.7,
                                                                                              True, 3)
    assert (cfg.of, cfg.vocab, cfg.low_memory, cfg.head_ratio, cfg.seed) == ("decoder", None, False, None, 1)
    assert (cfg.calib_samples, cfg.calib_seq_len) == (8, 32)
    plain = compress_config_for(None, seed=3)
    assert (plain.method, plain.prune_heads, plain.seed, plain.calib_samples) == ("comp", False, 3, None)


# --- re-mapping the LoRA after a cut -------------------------------------------------------------

def _random_lora(shapes: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A LoRA with non-zero A and B on every module (a tuned adapter, not a fresh one)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (out_f, in_f) in shapes.items():
        arrays[f"{name}.A"] = rng.normal(0, 0.1, size=(rank, in_f)).astype(np.float32)
        arrays[f"{name}.B"] = rng.normal(0, 0.1, size=(out_f, rank)).astype(np.float32)
    return arrays


def _constructed():
    """A 3-layer LoRA (hidden 12, MLP 6, 4 heads of 3) and the report of a cut that keeps neurons
    0, 2, 5 and heads 0, 2 of layer 0, drops layer 1 and leaves layer 2 (now 1) as it was."""
    shapes = {}
    for i in range(3):
        shapes.update({f"{i}.self_attn.q_proj": (12, 12), f"{i}.self_attn.k_proj": (6, 12),
                       f"{i}.self_attn.v_proj": (6, 12), f"{i}.self_attn.o_proj": (12, 12),
                       f"{i}.mlp.gate_proj": (6, 12), f"{i}.mlp.up_proj": (6, 12), f"{i}.mlp.down_proj": (12, 6)})
    report = {"layers": [
        {"dropped": False, "neurons_before": 6, "heads_before": 4, "kept_neuron_indices": [5, 0, 2],
         "kept_heads": [0, 2]},
        {"dropped": True, "neurons_before": 6, "heads_before": 4},
        {"dropped": False, "neurons_before": 6, "heads_before": 4},
    ], "layer_map": [0, 2]}
    return _random_lora(shapes, rank=2), report


def test_remap_lora_slices_exactly():
    arrays, report = _constructed()
    out = remap_lora(arrays, report)
    assert not any(k.startswith("2.") for k in out)
    assert {k.split(".", 1)[0] for k in out} == {"0", "1"}
    neurons, cols = [0, 2, 5], [0, 1, 2, 6, 7, 8]
    np.testing.assert_array_equal(out["0.mlp.gate_proj.B"], arrays["0.mlp.gate_proj.B"][neurons])
    np.testing.assert_array_equal(out["0.mlp.up_proj.B"], arrays["0.mlp.up_proj.B"][neurons])
    np.testing.assert_array_equal(out["0.mlp.down_proj.A"], arrays["0.mlp.down_proj.A"][:, neurons])
    np.testing.assert_array_equal(out["0.self_attn.q_proj.B"], arrays["0.self_attn.q_proj.B"][cols])
    np.testing.assert_array_equal(out["0.self_attn.o_proj.A"], arrays["0.self_attn.o_proj.A"][:, cols])
    for same in ("mlp.gate_proj.A", "mlp.up_proj.A", "mlp.down_proj.B", "self_attn.q_proj.A", "self_attn.o_proj.B",
                 "self_attn.k_proj.A", "self_attn.k_proj.B", "self_attn.v_proj.A", "self_attn.v_proj.B"):
        np.testing.assert_array_equal(out[f"0.{same}"], arrays[f"0.{same}"])
    for key in [k for k in arrays if k.startswith("2.")]:  # the kept layer 2 is layer 1 now, untouched
        np.testing.assert_array_equal(out["1." + key.split(".", 1)[1]], arrays[key])
    assert len(out) == 2 * len(arrays) // 3
    assert all(v.flags["C_CONTIGUOUS"] and v.dtype == np.float32 for v in out.values())


def test_remap_lora_refuses_a_report_of_another_model():
    arrays, report = _constructed()
    report["layers"][0]["kept_neuron_indices"] = [0, 9]
    with pytest.raises(LLMPruneError, match="keeps index 9"):
        remap_lora(arrays, report)
    arrays, report = _constructed()
    with pytest.raises(LLMPruneError, match="had 2 layers"):
        remap_lora(arrays, {"layers": report["layers"][:2]})


# --- one server step on a tiny llama --------------------------------------------------------------

def _setup(seed: int = 0, **overrides):
    from llmprune.testing import tiny_tokenizer

    model = tiny_model("llama", seed=seed, **{**HEADS, **overrides})
    arrays = _random_lora(module_shapes(model, ALL_MODULES), seed=seed)
    return model, tiny_tokenizer(), arrays


def _config(**overrides):
    from llmprune.compress import CompressConfig

    return CompressConfig(**{**dict(of="decoder", prune_heads=True, layer_share=0.7, calib_samples=4, calib_seq_len=32,
                                    loss_windows=2), **overrides})


TEXTS = [varied_text(2000, seed=3)]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reference_cut(model, arrays, cfg, relative: float, tok):
    """compress's cut of a merged deep copy of `model`: what a prune-tune step must compute."""
    import dataclasses

    from llmprune.compress import calibrate, prune

    reference = merge_lora(copy.deepcopy(model), arrays, SCALE)
    cfg = dataclasses.replace(cfg, ratio=relative)
    prune(reference, calibrate(reference, TEXTS, cfg, tokenizer=tok), relative, config=cfg)
    return reference


def _assert_computes_the_reference(pruned, remapped, reference, tok):
    ids = torch.tensor(tok(varied_text(60, seed=9))["input_ids"])[None, :48]
    with lora_applied(pruned, remapped, SCALE):
        torch.testing.assert_close(_logits(pruned, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)
    merged = merge_lora(copy.deepcopy(pruned), remapped, SCALE)
    for (name, p), (_, q) in zip(merged.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_prune_step_computes_the_pruned_merged_model():
    """(a) new base + re-mapped LoRA == compress's cut of the merged model; (b) the survivors keep
    their LoRA, sliced; a layer, query heads and neurons all go in this cut."""
    model, tok, arrays = _setup()
    dense, cfg = decoder_params(model), _config()
    reference = _reference_cut(model, arrays, cfg, relative_ratio(model, dense, 0.4), tok)
    pruned, remapped, step = prune_step(model, tok, arrays, SCALE, TEXTS, 0.4, dense, cfg, before_round=1)
    rows = step.report["layers"]
    assert pruned is model and (step.layers_before, step.layers_after) == (4, 3)
    assert any("kept_heads" in r for r in rows) and any("kept_neuron_indices" in r for r in rows)
    _assert_computes_the_reference(pruned, remapped, reference, tok)
    _assert_survivors_keep_their_lora(arrays, remapped, rows, head_dim=8)


def _assert_survivors_keep_their_lora(arrays, remapped, rows, head_dim: int):
    kept = [i for i, r in enumerate(rows) if not r["dropped"]]
    assert {int(k.split(".", 1)[0]) for k in remapped} == set(range(len(kept)))
    for new, old in enumerate(kept):
        neurons = rows[old].get("kept_neuron_indices", list(range(rows[old]["neurons_before"])))
        heads = rows[old].get("kept_heads", list(range(rows[old]["heads_before"])))
        cols = [h * head_dim + d for h in heads for d in range(head_dim)]
        expect = {"mlp.gate_proj.B": lambda a, n=neurons: a[n], "mlp.up_proj.B": lambda a, n=neurons: a[n],
                  "mlp.down_proj.A": lambda a, n=neurons: a[:, n], "self_attn.q_proj.B": lambda a, c=cols: a[c],
                  "self_attn.o_proj.A": lambda a, c=cols: a[:, c]}
        for key in [k for k in arrays if k.startswith(f"{old}.")]:
            path = key.split(".", 1)[1]
            np.testing.assert_array_equal(remapped[f"{new}.{path}"], expect.get(path, lambda a: a)(arrays[key]))


def test_prune_steps_hit_the_target_ratio_and_record_it():
    """(c), (d): 0 -> 0.2 -> 0.4 of a dense tiny llama, as prune_schedule plans it; each step lands
    within half an MLP neuron of its cumulative target (compress rounds the rest of the budget to
    whole neurons; the second step starts from where the first really landed)."""
    model, tok, arrays = _setup(seed=1)
    dense = dense_decoder_params(model, None)
    schedule = prune_schedule(0.0, 0.4, rounds=4, every=2)
    assert schedule == pytest.approx({1: 0.2, 3: 0.4})
    cfg, steps = _config(), []
    for before, ratio in schedule.items():
        model, arrays, step = prune_step(model, tok, arrays, SCALE, TEXTS, ratio, dense, cfg, before)
        steps.append(step)
        assert abs(step.ratio_achieved - ratio) <= NEURON / 2 / dense
        assert step.ratio_achieved == current_ratio(model, dense)
        assert step.decoder_params == decoder_params(model)
        assert module_shapes(model, ALL_MODULES).keys() == {k[:-2] for k in arrays}
        for name, (out_f, in_f) in module_shapes(model, ALL_MODULES).items():
            assert arrays[f"{name}.A"].shape[1] == in_f and arrays[f"{name}.B"].shape[0] == out_f
    assert steps[-1].ratio_target == 0.4
    assert steps[1].relative_ratio == pytest.approx(1 - 0.6 * dense / steps[0].decoder_params)
    assert model.config.llmprune["layer_map"] == steps[-1].report["layer_map"]
    assert dense_decoder_params(model, steps[-1].report) == dense  # what the saved checkpoint says
    assert set(steps[0].to_dict()) == {f for f in PruneStep.__dataclass_fields__ if f != "report"}
    json.dumps([s.to_dict() for s in steps])


def test_prune_step_is_deterministic():
    runs = []
    for _ in range(2):
        model, tok, arrays = _setup(seed=2)
        model, arrays, _ = prune_step(model, tok, arrays, SCALE, TEXTS, 0.3, decoder_params(model), _config(), 1)
        runs.append((model.state_dict(), arrays))
    (w1, a1), (w2, a2) = runs
    assert a1.keys() == a2.keys() and w1.keys() == w2.keys()
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def test_prune_step_on_a_compressed_checkpoint(pruned_ckpt):
    """The checkpoint compress wrote (a dropped layer, one query head per KV group, output biases)
    pruned further from its own ratio, with its saved compress config."""
    from llmprune.checkpoint import REPORT_FILE
    from llmprune.models import load_model, load_tokenizer

    report = json.loads((pruned_ckpt / REPORT_FILE).read_text())
    model, tok = load_model(str(pruned_ckpt)), load_tokenizer(str(pruned_ckpt))
    dense = dense_decoder_params(model, report)
    start = current_ratio(model, dense)
    (before, target), = prune_schedule(start, 0.55, rounds=3, every=5).items()
    arrays = _random_lora(module_shapes(model, ALL_MODULES), seed=4)
    cfg = compress_config_for(report, seed=0, calib_samples=4, calib_seq_len=32)
    reference = _reference_cut(model, arrays, cfg, relative_ratio(model, dense, target), tok)
    model, remapped, step = prune_step(model, tok, arrays, SCALE, TEXTS, target, dense, cfg, before)
    assert before == 1 and abs(step.ratio_achieved - 0.55) <= NEURON / 2 / dense
    assert step.report["layer_map"] == [report["layer_map"][i] for i, r in enumerate(step.report["layers"])
                                        if not r["dropped"]]
    _assert_computes_the_reference(model, remapped, reference, tok)
    _assert_survivors_keep_their_lora(arrays, remapped, step.report["layers"], head_dim=16)


def test_prune_step_already_at_the_ratio_changes_nothing():
    model, tok, arrays = _setup(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = decoder_params(model)
    model, out, step = prune_step(model, tok, arrays, SCALE, TEXTS, 0.0, dense, _config(), 2)
    assert step.relative_ratio == 0.0 and step.ratio_achieved == 0.0 and step.layers_after == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(np.array_equal(out[k], arrays[k]) for k in arrays)


def test_prune_step_gives_the_base_back_when_the_cut_fails():
    model, tok, arrays = _setup(seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LLMPruneError, match="too little calibration text"):
        prune_step(model, tok, arrays, SCALE, ["too short"], 0.3, decoder_params(model), _config(), 1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
