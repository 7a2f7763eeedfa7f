"""compress --vocab and --of total: the vocabulary step inside the compress pipeline (tiny models;
the tokenizer and slicing maths are tested in test_vocab.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import llmprune
from llmprune.compress import CompressConfig, compress
from llmprune.compress.vocab import VOCAB_FILE

from ..conftest import run_main
from .conftest import ARCHS, SMALL, state_dict_equal
from .test_cli_compress import assert_one_line_error, leftovers


def _compress(ckpt, tmp_path, calib_texts, out_name="out", **overrides):
    model, tok = llmprune.load(ckpt)
    cfg = CompressConfig(**{**SMALL, **overrides})
    return compress(model, cfg, tokenizer=tok, calib=calib_texts, out=tmp_path / out_name), model, tok


@pytest.mark.parametrize("arch", ARCHS)
def test_vocabulary_only_keeps_k_ids_and_the_kept_rows_compute_the_same(arch, tiny_ckpt, tmp_path, calib_texts):
    dense, dense_tok = llmprune.load(tiny_ckpt(arch))
    result, _, _ = _compress(tiny_ckpt(arch), tmp_path, calib_texts, ratio=0, vocab=290)
    out = tmp_path / "out"
    kept = json.loads((out / VOCAB_FILE).read_text())["kept_ids"]
    assert len(kept) == 290 == result.report["vocabulary"]["kept"]
    model, tok = llmprune.load(out)
    assert model.config.vocab_size == 290 and len(tok) == 290
    text = calib_texts[0][:400]
    new_ids = tok(text, return_tensors="pt")["input_ids"]
    assert int(new_ids.max()) < 290
    # The same token sequence, in both id spaces: the pruned model's logits are the dense ones at the kept ids.
    original = torch.tensor(kept)[new_ids]
    with torch.inference_mode():
        a = dense(input_ids=original).logits[0][:, kept]
        b = model(input_ids=new_ids).logits[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert tok.decode(new_ids[0], skip_special_tokens=True) == dense_tok.decode(
        dense_tok(text)["input_ids"], skip_special_tokens=True)
    removed = result.report["params_before"]["total"] - result.report["params_after"]["total"]
    per_row = dense.get_input_embeddings().weight.shape[1] * (1 if dense.config.tie_word_embeddings else 2)
    assert removed == 30 * per_row
    assert result.report["budget"]["removed"]["vocabulary"]["share"] == 1.0


def test_vocabulary_with_decoder_pruning_cuts_the_decoder_exactly_as_without(tiny_ckpt, tmp_path, calib_texts):
    plain, _, _ = _compress(tiny_ckpt("llama"), tmp_path, calib_texts, "plain", ratio=0.3)
    both, _, _ = _compress(tiny_ckpt("llama"), tmp_path, calib_texts, "both", ratio=0.3, vocab=300)
    a, b = plain.model.state_dict(), both.model.state_dict()
    vocab_tensors = {"model.embed_tokens.weight", "lm_head.weight"}
    assert [n for n in state_dict_equal(a, b) if n not in vocab_tensors] == []
    assert both.report["ratio_achieved"] == plain.report["ratio_achieved"]
    assert both.report["vocabulary"]["kept"] == 300 and both.report["calibration_loss"] == plain.report["calibration_loss"]
    assert both.tokenizer is not None and len(both.tokenizer) == 300


def test_a_whole_model_budget_is_met_and_split(tiny_ckpt, tmp_path, calib_texts):
    result, _, _ = _compress(tiny_ckpt("llama"), tmp_path, calib_texts, ratio=0.3, of="total")
    report = result.report
    assert abs(report["total_reduction"] - 0.3) < 0.02
    shares = report["budget"]["removed"]
    assert abs(sum(p["share"] for p in shares.values()) - 1) < 1e-9
    assert report["budget"]["of"] == "total" and report["budget"]["decoder_ratio"] > 0
    # Every id the ranking text uses is kept: those rows go only when the budget needs no decoder share.
    assert report["vocabulary"]["coverage"] == 1.0


def test_a_small_whole_model_budget_takes_only_unused_vocabulary_rows(tiny_ckpt, tmp_path):
    texts = ["the cat sat on the mat. " * 200]  # uses few ids: many rows are free
    model, tok = llmprune.load(tiny_ckpt("llama"))
    result = compress(model, CompressConfig(**{**SMALL, "ratio": 0.02, "of": "total"}), tokenizer=tok, calib=texts)
    report = result.report
    assert report["budget"]["decoder_ratio"] == 0.0 and report["ratio_achieved"] == 0.0
    assert report["vocabulary"]["coverage"] == 1.0
    assert abs(report["total_reduction"] - 0.02) < 0.005


def test_pruning_an_already_pruned_vocabulary_maps_ids_to_the_first_vocabulary(tiny_ckpt, tmp_path, calib_texts):
    _compress(tiny_ckpt("llama"), tmp_path, calib_texts, "first", ratio=0, vocab=300)
    first = json.loads((tmp_path / "first" / VOCAB_FILE).read_text())
    # Given as a folder, compress reads the earlier vocabulary.json beside the weights.
    compress(str(tmp_path / "first"), CompressConfig(**SMALL, ratio=0, vocab=280), calib=calib_texts,
             out=tmp_path / "second")
    second = json.loads((tmp_path / "second" / VOCAB_FILE).read_text())
    assert second["original_vocab_size"] == 320 and len(second["kept_ids"]) == 280
    assert set(second["kept_ids"]) <= set(first["kept_ids"])
    dense_tok = llmprune.load_tokenizer(tiny_ckpt("llama"))
    tok = llmprune.load_tokenizer(tmp_path / "second")
    pieces = tok.convert_ids_to_tokens(list(range(280)))
    assert pieces == dense_tok.convert_ids_to_tokens(second["kept_ids"])
    # pruning only the decoder of a trimmed checkpoint keeps its vocabulary map, as it keeps its vocabulary
    compress(str(tmp_path / "second"), CompressConfig(**SMALL, ratio=0.2), calib=calib_texts, out=tmp_path / "third")
    assert json.loads((tmp_path / "third" / VOCAB_FILE).read_text()) == second


def test_the_same_inputs_give_the_same_vocabulary(tiny_ckpt, tmp_path, calib_texts):
    for name in ("a", "b"):
        _compress(tiny_ckpt("qwen2"), tmp_path, calib_texts, name, ratio=0.2, vocab=0.95)
    assert (tmp_path / "a" / VOCAB_FILE).read_bytes() == (tmp_path / "b" / VOCAB_FILE).read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_the_cli_prunes_the_vocabulary_and_reports_it(tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "v"
    run = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0", "--vocab", "0.9", "--calib",
                   calib_file, "--out", out, "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("removed ") and lines[0].endswith("; the decoder layers are untouched")
    assert lines[1].startswith("vocabulary: ") and f"ids kept, ranked on {calib_file}, covering" in lines[1]
    assert lines[1].endswith("keep more with --vocab K, rank on your own text with --vocab-data FILE")
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["vocabulary"]["data"] == str(calib_file)
    assert report["vocabulary"]["coverage"] >= 0.9 and report["method"] == "vocab"
    assert (out / VOCAB_FILE).is_file() and leftovers(out) == []


@pytest.mark.parametrize("flags, fragments", [
    (["--ratio", "0", "--vocab", "10"], ["below the", "pass at least"]),
    (["--ratio", "0", "--vocab", "1.5"], ["--vocab 1.5"]),
    (["--ratio", "0", "--vocab", "400"], ["more than the tokenizer's 320 ids"]),
    (["--ratio", "0", "--vocab", "0"], ["--vocab 0"]),
    (["--ratio", "0", "--vocab", "lots"], ["lots"]),
    (["--ratio", "0"], ["0 only with --vocab"]),
    (["--ratio", "0", "--vocab", "300", "--of", "total"], ["--ratio 0 --of total", "drop --of total"]),
    (["--ratio", "0", "--vocab", "300", "--prune-heads"],
     ["--prune-heads prunes the decoder, but --ratio 0", "drop --prune-heads"]),
    (["--ratio", "0", "--vocab", "300", "--method", "wanda-sp"], ["--method prunes the decoder"]),
    (["--ratio", "0", "--vocab", "300", "--layer-share", "0.5"], ["--layer-share prunes the decoder"]),
    (["--ratio", "0.2", "--of", "decoder", "--vocab-data", "x.txt"], ["no --vocab was given"]),
    (["--ratio", "0.2", "--vocab", "300", "--low-memory"], ["--low-memory"]),
    (["--ratio", "0.01", "--of", "total", "--vocab", "260"], ["alone removes", "--of total"]),
    (["--ratio", "0.2", "--of", "everything"], ["everything"]),
])
def test_bad_vocabulary_flags_are_refused_in_one_line(flags, fragments, tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "out"
    run = run_main("compress", "--model", tiny_ckpt("llama"), *flags, "--calib", calib_file, "--out", out,
                   "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(run, *fragments, progress=True)
    assert not out.exists() and leftovers(out) == []


def test_too_little_ranking_text_is_refused(tiny_ckpt, calib_file, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a few words only.")
    out = tmp_path / "out"
    run = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0", "--vocab", "300", "--vocab-data",
                   small, "--calib", calib_file, "--out", out, "--calib-samples", "4", "--calib-seq-len", "32",
                   cwd=tmp_path)
    assert_one_line_error(run, "too few to rank tokens", "--vocab-data", progress=True)
    assert not out.exists()


def test_an_unsupported_tokenizer_is_refused(tmp_path, calib_file):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmprune.testing import tiny_checkpoint

    folder = tiny_checkpoint(tmp_path / "wp", "llama")
    vocab = {"[UNK]": 0, **{chr(97 + i): i + 1 for i in range(26)}}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]").save_pretrained(folder)
    run = run_main("compress", "--model", folder, "--ratio", "0", "--vocab", "20", "--calib", calib_file,
                   "--out", tmp_path / "out", "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(run, "supports SentencePiece-BPE", progress=True)


def test_the_api_returns_the_rebuilt_tokenizer_with_the_model(tiny_ckpt, calib_texts):
    model, tok = llmprune.load(tiny_ckpt("gemma3_text"))
    result = compress(copy.deepcopy(model), CompressConfig(**SMALL, ratio=0, vocab=300), tokenizer=tok,
                      calib=calib_texts)
    assert result.model.config.vocab_size == 300 and len(result.tokenizer) == 300
    ids = result.tokenizer("hello there", return_tensors="pt")
    assert set(ids) == {"input_ids", "attention_mask"}
    assert np.all(ids["input_ids"].numpy() < 300)
    result.model.generate(**ids, max_new_tokens=3, do_sample=False)


def test_the_ratio_an_of_total_error_suggests_is_accepted(tiny_ckpt, calib_texts):
    """--ratio R --of total past what the decoder can give names the largest ratio that fits,
    rounded down, so passing it is accepted."""
    import re

    from llmprune.compress.vocab_step import plan_vocabulary
    from llmprune.errors import LLMPruneError

    model, tok = llmprune.load(tiny_ckpt("llama"))
    with pytest.raises(LLMPruneError) as err:
        plan_vocabulary(model, tok, calib_texts, CompressConfig(**{**SMALL, "ratio": 0.99, "of": "total"}))
    suggested = float(re.search(r"pass --ratio (\d\.\d\d) or less", str(err.value)).group(1))
    plan = plan_vocabulary(model, tok, calib_texts, CompressConfig(**{**SMALL, "ratio": suggested, "of": "total"}))
    assert 0.9 < plan.decoder_ratio <= 0.95


def test_the_budget_counts_the_whole_model_unless_only_the_decoder_can_be_counted():
    assert CompressConfig().of == "total" and CompressConfig().prunes_vocabulary
    assert CompressConfig(low_memory=True).of == "decoder"       # one decoder layer at a time: no vocabulary path
    assert CompressConfig(ratio=0, vocab=300).of == "decoder"    # the vocabulary alone
    assert CompressConfig(of="decoder").of == "decoder" and not CompressConfig(of="decoder").prunes_vocabulary
