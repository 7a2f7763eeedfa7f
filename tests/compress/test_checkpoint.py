"""Pruned checkpoints: save -> load both ways -> the same logits; shapes and layer map in config.json;
the pruning report; pruning a pruned model again; atomic output folders."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.arch import adapter_for
from llmprune.checkpoint import MODELING_FILE, REPORT_FILE, atomic_output_dir, check_output_dir, save_pruned
from llmprune.compress import compress
from llmprune.errors import LLMPruneError
from llmprune.testing import tiny_model

from .conftest import ARCHS

# What the issue asks pruning_report.json to hold.
REPORT_KEYS = {
    "method", "seed", "versions", "params_before", "params_after", "ratio_requested", "ratio_achieved",
    "total_reduction", "layers", "layer_map", "layers_dropped", "calibration_loss", "peak_rss_mb", "seconds",
}


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def no_temp_siblings(folder) -> bool:
    return not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_both_ways_gives_the_same_logits(arch, tok, calib_texts, small_config, token_ids, tmp_path):
    """Dropped layer, pruned heads, per-layer widths and fitted output biases all survive."""
    model = tiny_model(arch)
    cfg = small_config(ratio=0.4, layer_share=0.7, prune_heads=True, head_ratio=0.5, intercept=True)
    out = tmp_path / "pruned"
    result = compress(model, cfg, tokenizer=tok, calib=calib_texts, out=out)
    report = result.report
    assert len(report["layers_dropped"]) == 1 and report["layers_dropped"][0] != 0
    expected = logits(model, token_ids)

    loaded = llmprune.load_model(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    for other in (loaded, remote):
        assert type(other).__name__ == "PrunedCausalLM"
        torch.testing.assert_close(logits(other, token_ids), expected, rtol=0, atol=1e-5)
        assert other.config.num_hidden_layers == len(report["layer_map"]) == 3
        if arch == "gemma3_text":
            assert [adapter_for(other).attention_kind(l) for l in other.model.layers] == other.config.layer_types
    # Same tensors, same names.
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", MODELING_FILE, REPORT_FILE, "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= files
    assert no_temp_siblings(out)

    config = json.loads((out / "config.json").read_text())
    spec = config["llmprune"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llmprune.PrunedCausalLM"
    assert config["num_hidden_layers"] == 3
    assert spec["layer_map"] == report["layer_map"] == [i for i in range(4) if i not in report["layers_dropped"]]
    assert spec["original_num_hidden_layers"] == 4
    assert len(spec["layers"]) == 3
    for shape, layer in zip(spec["layers"], model.model.layers):
        assert shape["intermediate_size"] == layer.mlp.down_proj.in_features < 128
        assert shape["num_attention_heads"] == layer.self_attn.q_proj.out_features // 16 == 2
        assert shape["mlp_out_bias"] is True and shape["attn_out_bias"] is True
    if arch == "gemma3_text":
        full = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
        assert config["layer_types"] == [full[i] for i in spec["layer_map"]]

    saved = json.loads((out / REPORT_FILE).read_text())
    assert REPORT_KEYS <= set(saved)
    assert saved["method"] == "comp" and saved["seed"] == 0
    assert {"llmprune", "torch", "transformers"} <= set(saved["versions"])
    assert saved["params_before"]["total"] > saved["params_after"]["total"]
    assert set(saved["calibration_loss"]) >= {"dense", "pruned_before_tuning", "pruned"}
    assert saved["peak_rss_mb"] > 0 and saved["seconds"] > 0
    assert len(saved["layers"]) == 4
    for row in saved["layers"]:
        assert {"original_index", "block_influence", "dropped", "neurons_before", "heads_before"} <= set(row)
        if not row["dropped"]:
            assert {"neurons_after", "heads_after", "kappa_kept", "kept_heads", "mlp_error_before", "mlp_error_after"} <= set(row)
            assert row["kappa_kept"] >= 1.0
            assert len(row["kept_heads"]) == row["heads_after"] == 2


def test_a_pruned_model_can_be_pruned_again(tok, calib_texts, small_config, token_ids, tmp_path):
    """The second layer map gives original indices: each surviving layer is the original one."""
    original = tiny_model("gemma3_text")
    first = tmp_path / "first"
    second = tmp_path / "second"
    r1 = compress(tiny_model("gemma3_text"), small_config(ratio=0.25, method="layer-only"), tokenizer=tok,
                  calib=calib_texts, out=first)
    assert len(r1.report["layers_dropped"]) == 1
    r2 = compress(str(first), small_config(ratio=0.34, method="layer-only"), calib=calib_texts, out=second)
    assert len(r2.report["layers_dropped"]) == 1
    assert r2.report["layers_dropped"][0] in r1.report["layer_map"]
    assert [row["original_index"] for row in r2.report["layers"]] == r1.report["layer_map"]
    expected_map = [i for i in r1.report["layer_map"] if i not in r2.report["layers_dropped"]]
    assert r2.report["layer_map"] == expected_map and len(expected_map) == 2

    spec = json.loads((second / "config.json").read_text())["llmprune"]
    assert spec["layer_map"] == expected_map
    assert spec["original_num_hidden_layers"] == 4
    assert (json.loads((second / "config.json").read_text())["layer_types"]
            == [original.config.layer_types[i] for i in expected_map])
    reloaded = llmprune.load_model(second)
    remote = AutoModelForCausalLM.from_pretrained(second, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(reloaded, token_ids), logits(r2.model, token_ids), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(remote, token_ids), logits(r2.model, token_ids), rtol=0, atol=1e-5)
    # Attention weights are untouched by layer-only's neuron pruning: match them to the originals.
    for layer, index in zip(reloaded.model.layers, expected_map):
        assert torch.equal(layer.self_attn.k_proj.weight, original.model.layers[index].self_attn.k_proj.weight)


def test_original_layer_count_survives_dropping_the_last_layer(tok, calib_texts, small_config, tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "out"
    result = compress(model, small_config(ratio=0.25, method="layer-only"), tokenizer=tok, calib=calib_texts, out=out)
    spec = json.loads((out / "config.json").read_text())["llmprune"]
    assert spec["layer_map"] == result.report["layer_map"]
    assert spec["original_num_hidden_layers"] == 4


def test_save_pruned_of_an_unpruned_model_loads_back(tok, token_ids, tmp_path):
    model = tiny_model("qwen2")
    out = save_pruned(model, tok, tmp_path / "plain")
    torch.testing.assert_close(logits(llmprune.load_model(out), token_ids), logits(model, token_ids), rtol=0, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["llmprune"]["layer_map"] == [0, 1, 2, 3]


def test_check_output_dir(tmp_path):
    check_output_dir(tmp_path / "missing", overwrite=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output_dir(empty, overwrite=False)
    full = tmp_path / "full"
    full.mkdir()
    (full / REPORT_FILE).write_text("{}")
    with pytest.raises(LLMPruneError, match="not empty"):
        check_output_dir(full, overwrite=False)
    check_output_dir(full, overwrite=True)  # an earlier output: replaceable
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(LLMPruneError, match="not a folder"):
        check_output_dir(afile, overwrite=True)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path, error):
    out = tmp_path / "out"
    with pytest.raises(error):
        with atomic_output_dir(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
            (tmp / "half-written").write_text("x")
            raise error()
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_output_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    (out / REPORT_FILE).write_text("{}")  # an earlier output
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError
    assert sorted(os.listdir(out)) == ["old", REPORT_FILE]
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(out)) == ["new"]
    assert os.listdir(tmp_path) == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
