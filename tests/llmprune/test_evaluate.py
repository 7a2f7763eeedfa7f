"""Perplexity: equal to exp(loss) of a plain forward with labels, for every architecture."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from llmprune import LLMPruneError, load_texts, perplexity, token_windows
from llmprune.evaluate import check_seq_len, window_nll, zero_shot
from llmprune.testing import TINY_TEXT, tiny_model

from ..conftest import ARCHS

CASES = [(arch, {}) for arch in ARCHS] + [("gemma3_text", {"final_logit_softcapping": 3.0})]


def reference_ppl(model, windows: torch.Tensor) -> float:
    """exp(mean loss) from a plain forward with labels (all windows have equal length)."""
    with torch.no_grad():
        return math.exp(model(input_ids=windows, labels=windows).loss.item())


@pytest.mark.parametrize(("arch", "overrides"), CASES, ids=[f"{a}{'-softcap' if o else ''}" for a, o in CASES])
def test_perplexity_equals_exp_loss_of_plain_forward(tokenizer, arch, overrides):
    # A larger init than the default makes the predictions far from uniform, so a wrong
    # shift, mask or softcap would show.
    model = tiny_model(arch, initializer_range=0.2, **overrides)
    windows = token_windows(tokenizer, [TINY_TEXT], 48, max_windows=4)
    result = perplexity(model, windows, progress=False)
    expected = reference_ppl(model, windows)
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert abs(result.perplexity / model.config.vocab_size - 1) > 0.1, "test model is too close to uniform"
    assert result.tokens == 4 * 48
    assert result.windows == 4
    assert result.nll == pytest.approx(math.log(result.perplexity))
    assert result.seconds > 0 and result.tokens_per_s > 0 and result.peak_rss_mb > 0


def test_uniform_model_has_perplexity_vocab_size(tokenizer):
    model = tiny_model("llama")  # untied head
    with torch.no_grad():
        model.lm_head.weight.zero_()
    windows = token_windows(tokenizer, [TINY_TEXT], 32, max_windows=2)
    assert perplexity(model, windows, progress=False).perplexity == pytest.approx(model.config.vocab_size, rel=1e-6)


def test_batch_size_does_not_change_result(tokenizer):
    model = tiny_model("qwen3", initializer_range=0.2)
    windows = token_windows(tokenizer, [TINY_TEXT], 32, max_windows=5)
    one = perplexity(model, windows, batch_size=1, progress=False)
    two = perplexity(model, windows, batch_size=2, progress=False)
    five = perplexity(model, windows, batch_size=5, progress=False)
    assert one.tokens == two.tokens == five.tokens == 5 * 32
    assert two.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert five.perplexity == pytest.approx(one.perplexity, rel=1e-5)


def test_window_nll_chunking_of_lm_head(tokenizer):
    model = tiny_model("gemma3_text", initializer_range=0.2, final_logit_softcapping=3.0)
    windows = token_windows(tokenizer, [TINY_TEXT], 40, max_windows=2)
    with torch.no_grad():
        small, n_small = window_nll(model, windows, head_chunk=7)
        whole, n_whole = window_nll(model, windows, head_chunk=1000)
        loss = model(input_ids=windows, labels=windows).loss.item()
    assert n_small == n_whole == 2 * 40
    assert small == pytest.approx(whole, rel=1e-5)
    assert whole / n_whole == pytest.approx(loss, rel=1e-5)


def test_no_windows_is_an_error_not_perplexity_one():
    """KNOWN LIBRARY BUG — fails today: perplexity() of zero windows returns perplexity 1.0
    (exp of 0 / max(0, 1)) with tokens=0, a perfect score from no evidence. Suggested fix in
    llmprune/evaluate.py perplexity: raise LLMPruneError("no windows to evaluate", ...) when
    windows.shape[0] == 0."""
    model = tiny_model("llama")
    empty = torch.zeros((0, 33), dtype=torch.long)
    with pytest.raises((LLMPruneError, ValueError)):
        perplexity(model, empty, progress=False)


def test_check_seq_len_against_max_positions():
    config = tiny_model("llama").config
    assert config.max_position_embeddings == 256
    check_seq_len(config, 255)  # 255 + BOS fits
    with pytest.raises(LLMPruneError, match="at most 255 tokens plus BOS") as info:
        check_seq_len(config, 256)
    assert "--seq-len 255" in info.value.fix


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed here")
def test_zero_shot_without_lm_eval_is_a_clear_error():
    with pytest.raises(LLMPruneError, match="lm-evaluation-harness") as info:
        zero_shot.require()
    assert "llmprune[eval]" in info.value.fix


# ---------------------------------------------------------------- real model
# The perplexity of the real model against an independent forward is checked end to end, through
# `llmprune eval`, in tests/cli/test_cli.py::test_eval_gemma_main_job (one 4x512 evaluation is
# ~40 s of CPU; it is not repeated here).


@pytest.mark.integration
def test_gemma_windows_follow_the_protocol(gemma, shared_data):
    """4 windows of 512 of wiki.test.raw: BOS + consecutive slices of one tokenization."""
    _, tok = gemma
    path = shared_data / "wikitext2" / "wiki.test.raw"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert load_texts(path) == [text]
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: 4 * 512]).view(4, 512)
    assert tok.bos_token_id == 2
    windows = token_windows(tok, load_texts(path), 512, max_windows=4)
    assert torch.equal(windows, torch.cat([torch.full((4, 1), 2), ids], dim=1))
