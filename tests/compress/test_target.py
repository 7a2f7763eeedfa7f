"""compress --target-mb: the plan fits the budget, trades vocabulary rows against decoder cuts by
their measured cost, and refuses what cannot be done in one line."""

from __future__ import annotations

import copy
import json

import pytest

from llmprune import artifact
from llmprune.compress import CompressConfig, calibrate, prune, target
from llmprune.errors import LLMPruneError
from llmprune.testing import tiny_model

from ..conftest import run_main
from .test_cli_compress import assert_one_line_error


def test_the_held_out_tail_is_cut_from_the_texts():
    texts = ["a" * 30_000, "line one\nline two\n" * 1000]
    kept, heldout = target.split_heldout(texts, chars=5_000)
    assert "".join(kept) + heldout.replace("\n", "", 0) != "" and len(heldout) >= 5_000 - 20
    assert sum(map(len, kept)) + len(heldout) == sum(map(len, texts))   # nothing lost, nothing used twice
    assert heldout.startswith("\n") or heldout.startswith("line")        # cut at a line break
    with pytest.raises(LLMPruneError, match="at least 10,000 needed"):
        target.split_heldout(["short text"])


@pytest.fixture(scope="module")
def cutter(calib_texts, tok):
    """A tiny llama, its calibration, and cut(ratio) -> (a pruned copy, report) as compress gives it."""
    model = tiny_model("llama")
    cfg = CompressConfig(ratio=0.2, of="decoder", calib_samples=4, calib_seq_len=32, loss_windows=2,
                         layer_share=0.0, allocation="uniform")
    calibration = calibrate(model, calib_texts, cfg, tokenizer=tok)

    def cut(ratio: float):
        result = prune(copy.deepcopy(model), calibration, ratio)
        return result.model, result.report
    return model, cut


def _constructed(per_decoder: float, per_row: float, dense_params: int, rows: int, lean: float = 10.0):
    """A measured cost built by hand: bits per byte grow by `per_decoder` per fraction of the decoder
    removed, by `per_row` per vocabulary row dropped and by `lean` in the lean int4 layout."""
    def measure(model, selection, layout) -> float:
        layers = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
        kept = rows if selection is None else selection.size
        extra = lean if layout.wide != artifact.WIDE else 0.0
        return 1.0 + per_decoder * (1 - layers / dense_params) + per_row * (rows - kept) + extra
    return measure


def test_the_plan_trades_by_measured_cost_per_byte(cutter, tok, calib_texts):
    model, cut = cutter
    dense_layers = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
    rows = model.get_input_embeddings().weight.shape[0]
    full = artifact.predict_bytes(model, tok, "int4")["total"]
    budget = full - 20 * int(artifact.row_bytes(model, "int4"))          # 20+ rows, or a bit of the decoder
    cheap_rows = target.search(model, tok, calib_texts, budget, "int4", cut, _constructed(5.0, 1e-6, dense_layers, rows))
    assert cheap_rows.chosen.decoder_ratio == 0 and cheap_rows.chosen.vocab < rows
    dear_rows = target.search(model, tok, calib_texts, budget, "int4", cut, _constructed(0.01, 1.0, dense_layers, rows))
    assert dear_rows.chosen.decoder_ratio > 0 and dear_rows.chosen.vocab > cheap_rows.chosen.vocab
    lean_cheap = target.search(model, tok, calib_texts, budget, "int4", cut,
                               _constructed(5.0, 1.0, dense_layers, rows, lean=1e-3))
    assert lean_cheap.chosen.decoder_ratio == 0 and lean_cheap.chosen.vocab == rows
    assert lean_cheap.chosen.keep_8bit == list(artifact.LEAN_WIDE)
    assert cheap_rows.chosen.keep_8bit == dear_rows.chosen.keep_8bit == list(artifact.WIDE)
    for found in (cheap_rows, dear_rows, lean_cheap):
        assert found.chosen.predicted_bytes <= budget
        # the chosen plan is the cheapest of the candidates that fit
        fitting = [c for c in found.candidates if c.heldout_bpb is not None]
        assert found.chosen.heldout_bpb == min(c.heldout_bpb for c in fitting)


def test_a_budget_the_whole_model_fits_prunes_nothing(cutter, tok, calib_texts):
    model, cut = cutter
    budget = artifact.predict_bytes(model, tok, "fp32")["total"] + 1000
    found = target.search(model, tok, calib_texts, budget, "fp32", cut, lambda m, s, lay: 1.0)
    assert found.chosen.decoder_ratio == 0 and found.chosen.vocab == model.get_input_embeddings().weight.shape[0]
    assert [c.decoder_ratio for c in found.candidates] == [0.0]


def test_compress_to_a_size_fits_and_says_what_it_chose(tiny_ckpt, calib_file, tmp_path):
    src = tiny_ckpt("llama")
    dense = artifact.predict_bytes(*_loaded(src), "int4")["total"]
    mb = (dense - 30_000) / artifact.MB
    out = tmp_path / "fit"
    result = run_main("compress", "--model", src, "--target-mb", f"{mb:.6f}", "--out", out, "--calib", calib_file,
                      "--calib-samples", "4", "--calib-seq-len", "32", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    t = report["target"]
    assert t["fits"] and t["predicted"]["total"] <= mb * artifact.MB and t["precision"] == "int4"
    assert t["chosen"]["decoder_ratio"] > 0 and t["candidates"][0]["decoder_ratio"] == 0
    assert report["config"]["target_mb"] == pytest.approx(mb) and report["vocabulary"]["kept"] == t["chosen"]["vocab"]
    # The prediction is of the checkpoint as saved (whose config also records llmprune's layer map:
    # a few hundred bytes, 3.6 kB on Gemma-3-270M's 100 MB).
    assert artifact.predict_bytes(*_loaded(out), "int4")["total"] == pytest.approx(t["predicted"]["total"], rel=0.01)
    printed = run_main("compress", "--model", src, "--target-mb", f"{mb:.6f}", "--out", tmp_path / "again", "--calib",
                       calib_file, "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert printed.returncode == 0 and f"target {mb:.6f}".rstrip("0") in printed.stdout
    assert "export with `llmprune export --quantize int4`" in printed.stdout
    card = (out / "README.md").read_text()                # the model card says what the export will take
    assert f"{t['predicted']['total'] / 1e6:.1f} MB for a {mb:g} MB target" in card


def _loaded(folder):
    import llmprune

    return llmprune.load(str(folder))


@pytest.mark.parametrize("argv, fragments", [
    (["--target-mb", "0.05"], ["below the smallest int4 artifact", "pass --target-mb"]),
    (["--target-mb", "1", "--ratio", "0.2"], ["--ratio and --target-mb both"]),
    (["--target-mb", "1", "--of", "total"], ["--of and --target-mb both"]),
    (["--target-mb", "1", "--vocab", "300"], ["--vocab cannot be combined with --target-mb"]),
    (["--target-mb", "1", "--low-memory"], ["--low-memory cannot be combined with --target-mb"]),
    (["--ratio", "0.2", "--precision", "int8"], ["no --target-mb was given"]),
    (["--target-mb", "nan"], ["--target-mb"]),
    (["--target-mb", "1", "--precision", "int2"], ["--precision", "int2"]),
    ([], ["no size given", "--ratio R", "--target-mb MB"]),
])
def test_bad_budgets_are_refused_in_one_line_and_write_nothing(argv, fragments, tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "never"
    result = run_main("compress", "--model", tiny_ckpt("llama"), "--out", out, "--calib", calib_file,
                      "--calib-samples", "4", "--calib-seq-len", "32", *argv, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_the_config_refuses_what_target_mb_chooses():
    with pytest.raises(LLMPruneError, match="--target-mb must be a positive number"):
        CompressConfig(target_mb=float("inf"))
    with pytest.raises(LLMPruneError, match="unknown --precision 'int3'"):
        CompressConfig(target_mb=10, precision="int3")
    assert CompressConfig(target_mb=10).prunes_vocabulary
