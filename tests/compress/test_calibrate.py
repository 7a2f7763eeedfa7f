"""Score once, cut many: one Calibration cut at several ratios, each cut equal to compress() at
that ratio; the Calibration survives cuts and a save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from llmprune.compress import Calibration, CompressConfig, Plan, calibrate, compress, prune, resolve_plan
from llmprune.compress import calibration as calibration_module
from llmprune.errors import LLMPruneError
from llmprune.testing import tiny_model

RATIOS = (0.1, 0.2, 0.3)


@pytest.fixture
def count_layer_runs(monkeypatch):
    """Counts calls of run_layer (one per decoder layer per calibration or pruning pass)."""
    calls = {"n": 0}
    original = calibration_module.run_layer

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    import llmprune.compress.pruner as pruner

    monkeypatch.setattr(pruner, "run_layer", counting)
    return calls


def test_one_calibration_three_cuts_equal_compress(tok, calib_texts, small_config, compare_state_dicts, count_layer_runs):
    cfg = small_config(ratio=0.2, prune_heads=True, allocation="error")
    dense = tiny_model("llama")
    calibration = calibrate(dense, calib_texts, cfg, tokenizer=tok)
    assert count_layer_runs["n"] == 4  # one streamed pass: each of the 4 layers ran once
    cuts = {r: prune(copy.deepcopy(dense), calibration, r) for r in RATIOS}
    assert count_layer_runs["n"] == 4  # cutting ran no calibration pass
    for r, cut in cuts.items():
        model = tiny_model("llama")
        reference = compress(model, CompressConfig(**{**cfg.to_dict(), "ratio": r}), tokenizer=tok, calib=calib_texts)
        assert compare_state_dicts(cut.model.state_dict(), model.state_dict()) == [], r
        keep = ("ratio_achieved", "layers_dropped", "split_candidates", "calibration_loss", "params_after", "layers")
        assert {k: cut.report[k] for k in keep} == {k: reference.report[k] for k in keep}
    assert cuts[0.1].report["ratio_achieved"] < cuts[0.2].report["ratio_achieved"] < cuts[0.3].report["ratio_achieved"]
    assert torch.equal(dense.model.layers[0].mlp.down_proj.weight, tiny_model("llama").model.layers[0].mlp.down_proj.weight)


def test_a_plan_cuts_exactly_what_it_says(tok, calib_texts, small_config):
    dense = tiny_model("qwen2")
    calibration = calibrate(dense, calib_texts, small_config(ratio=0.3, layer_share=1.0), tokenizer=tok)
    plan = resolve_plan(calibration, 0.3)
    assert isinstance(plan, Plan) and len(plan.drop) == 1
    result = prune(dense, calibration, plan)
    assert result.report["layers_dropped"] == plan.drop
    kept = [i for i in range(4) if i not in plan.drop]
    assert [l.mlp.down_proj.in_features for l in dense.model.layers] == [plan.keep_neurons[i] for i in kept]


def test_auto_split_needs_prune_to_choose(tok, calib_texts, small_config):
    calibration = calibrate(tiny_model("llama"), calib_texts, small_config(ratio=0.3), tokenizer=tok)
    with pytest.raises(LLMPruneError, match="candidate plans"):
        resolve_plan(calibration, 0.3)
    assert len(resolve_plan(calibration, 0.3, layer_share=0.0).drop) == 0


def test_save_and_load_round_trip(tok, calib_texts, small_config, compare_state_dicts, tmp_path):
    cfg = small_config(ratio=0.25, method="taylor", prune_heads=True, head_ratio=0.5)
    dense = tiny_model("gemma3_text")
    calibration = calibrate(dense, calib_texts, cfg, tokenizer=tok)
    calibration.save(tmp_path / "cal")
    assert not list((tmp_path / "cal").glob("*.pt")) and not list((tmp_path / "cal").glob("*.pkl"))
    loaded = Calibration.load(tmp_path / "cal")
    a = prune(copy.deepcopy(dense), calibration, 0.25)
    b = prune(copy.deepcopy(dense), loaded, 0.25)
    assert compare_state_dicts(a.model.state_dict(), b.model.state_dict()) == []
    assert a.report["layers"] == b.report["layers"]
    assert loaded.seconds == calibration.seconds > 0


def test_the_report_times_calibration_and_cut(tok, calib_texts, small_config):
    """`seconds` is the whole compress, as before calibrate/prune were split; each part is reported."""
    report = compress(tiny_model("llama"), small_config(ratio=0.2), tokenizer=tok, calib=calib_texts).report
    assert report["calibration_seconds"] > 0 and report["prune_seconds"] > 0
    assert report["seconds"] == pytest.approx(report["calibration_seconds"] + report["prune_seconds"])


def test_a_cut_the_calibration_did_not_measure_is_refused(tok, calib_texts, small_config):
    dense = tiny_model("llama")
    calibration = calibrate(dense, calib_texts, small_config(ratio=0.2), tokenizer=tok)
    with pytest.raises(LLMPruneError, match="prune_heads=True"):
        prune(dense, calibration, config=small_config(ratio=0.2, prune_heads=True))
    with pytest.raises(LLMPruneError, match="gradients"):
        prune(dense, calibration, config=small_config(ratio=0.2, method="taylor"))


@pytest.mark.parametrize("seq_len,bos,error", [
    (255, 1, None),
    (256, 1, "pass --calib-seq-len 255 or less"),
    (5000, 1, "--calib-seq-len 5000 is longer than the model's 256 positions"),
    (256, None, None),                       # no BOS token: the window is calib_seq_len tokens
    (257, None, "pass --calib-seq-len 256 or less"),
])
def test_calibration_windows_must_fit_the_models_positions(seq_len, bos, error):
    from types import SimpleNamespace

    from llmprune.compress import CompressConfig, check_positions
    from llmprune.errors import LLMPruneError

    cfg = CompressConfig(ratio=0.2, calib_seq_len=seq_len)
    config, tok = SimpleNamespace(max_position_embeddings=256), SimpleNamespace(bos_token_id=bos)
    if error is None:
        check_positions(cfg, config, tok)
    else:
        with pytest.raises(LLMPruneError, match=error.replace("(", r"\(")):
            check_positions(cfg, config, tok)
    check_positions(cfg, SimpleNamespace(), tok)  # a config without the field: nothing to check


def test_calibrate_and_prune_cut_the_decoder_only(small_config, tok, calib_texts):
    model = tiny_model("llama")
    with pytest.raises(LLMPruneError, match=r"calibrate\(\) cuts the decoder only.*of='total'.*compress\(\)"):
        calibrate(model, calib_texts, small_config(of="total"), tokenizer=tok)
    calibration = calibrate(model, calib_texts, small_config(), tokenizer=tok)
    with pytest.raises(LLMPruneError, match=r"prune\(\) cuts the decoder only.*vocab=300"):
        prune(model, calibration, config=small_config(vocab=300))
