"""Data specs (load_texts) and the evaluation-window protocol (token_windows)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llmprune import LLMPruneError, load_texts, token_windows
from llmprune.data import DEFAULT_TEMPLATE, DEFAULT_TEMPLATE_NO_INPUT, domain_windows, join_documents, render_record
from llmprune.testing import TINY_TEXT, tiny_model, tiny_tokenizer

# ---------------------------------------------------------------- load_texts: files and folders


def test_txt_file_read_whole(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n", encoding="utf-8")
    assert load_texts(path) == ["first line\nsecond line\n"]
    assert load_texts(str(path)) == ["first line\nsecond line\n"]


def test_txt_crlf_read_as_lf(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"one\r\ntwo\r\n")
    assert load_texts(path) == ["one\ntwo\n"]


@pytest.mark.parametrize("suffix", [".raw", ".tokens", ".md"])
def test_other_text_suffixes(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text("some text", encoding="utf-8")
    assert load_texts(path) == ["some text"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}, {"text": "gamma é"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(path) == ["alpha", "beta", "gamma é"]


def test_jsonl_records_without_text_are_dropped_when_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": ""}\n{"text": "kept"}\n', encoding="utf-8")
    assert load_texts(path) == ["kept"]


def test_json_instruction_records_rendered_with_default_templates(tmp_path):
    records = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hello.", "output": "Hello!"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    texts = load_texts(path)
    assert texts == [
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5",
        "### Instruction:\nSay hello.\n\n### Response:\nHello!",
    ]
    assert texts[0] == DEFAULT_TEMPLATE.format(**records[0])
    assert texts[1] == DEFAULT_TEMPLATE_NO_INPUT.format(**records[1])


def test_json_instruction_records_custom_template(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Q1", "input": "ctx", "output": "A1"}]), encoding="utf-8")
    assert load_texts(path, template="Q: {instruction} [{input}] A: {output}") == ["Q: Q1 [ctx] A: A1"]


def test_json_dict_with_data_list_and_plain_strings(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ["one", {"text": "two"}]}), encoding="utf-8")
    assert load_texts(path) == ["one", "two"]


def test_json_record_without_text_or_instruction(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(LLMPruneError, match="neither 'text' nor 'instruction'.*answer, question"):
        load_texts(path)


def test_render_record_rejects_non_objects():
    with pytest.raises(LLMPruneError, match="unsupported JSON record"):
        render_record(42)


def test_folder_of_files_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "C1"}\n{"text": "C2"}\n', encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    (tmp_path / "weights.bin").write_bytes(b"\x00\xff")
    assert load_texts(tmp_path) == ["A", "B", "C1", "C2"]


def test_folder_without_text_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(LLMPruneError, match="holds no .txt/.json/.jsonl files"):
        load_texts(tmp_path)


@pytest.mark.parametrize("spec", ["missing/dir/data.txt", "nothing_here.txt", "./nope", "nope.jsonl"])
def test_missing_path(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LLMPruneError) as info:
        load_texts(spec)
    assert "does not exist" in str(info.value)
    assert info.value.fix  # the message says how to fix it


@pytest.mark.parametrize("content", ["", "   \n\n\t  "])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LLMPruneError, match="is empty"):
        load_texts(path)


def test_empty_jsonl(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(LLMPruneError, match="is empty"):
        load_texts(path)


def test_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "ok"},\n{"text": ', encoding="utf-8")
    with pytest.raises(LLMPruneError, match=r"not valid JSON \(line 2"):
        load_texts(path)


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{oops}\n', encoding="utf-8")
    with pytest.raises(LLMPruneError, match="not valid JSON"):
        load_texts(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(LLMPruneError, match="not UTF-8"):
        load_texts(path)


def test_self_needs_model_and_tokenizer():
    with pytest.raises(LLMPruneError, match="needs the model"):
        load_texts("self")


# ---------------------------------------------------------------- `self`: model-generated text


def test_self_data_is_deterministic_for_a_seed(tokenizer):
    model = tiny_model("llama")
    rng_before = torch.random.get_rng_state()
    first = load_texts("self", model=model, tokenizer=tokenizer, seed=0, self_tokens=64)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "the global RNG state must be restored"
    torch.manual_seed(1234)  # global state must not matter
    again = load_texts("self", model=model, tokenizer=tokenizer, seed=0, self_tokens=64)
    other = load_texts("self", model=model, tokenizer=tokenizer, seed=1, self_tokens=64)
    assert first == again
    assert first != other
    assert len(first) == 1 and first[0].strip()


def test_self_data_has_about_the_asked_tokens(tokenizer):
    model = tiny_model("gemma3_text")
    texts = load_texts("self", model=model, tokenizer=tokenizer, seed=0, self_tokens=300)
    # 300 * 1.1 tokens -> two sampled sequences of 256, joined with a blank line.
    assert texts[0].count("\n\n") >= 1
    assert len(tokenizer(texts[0], add_special_tokens=False)["input_ids"]) >= 300


# ---------------------------------------------------------------- token_windows protocol


def _stream(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def test_windows_are_consecutive_slices_of_one_stream_with_bos(tokenizer):
    seq_len = 32
    windows = token_windows(tokenizer, [TINY_TEXT], seq_len)
    stream = _stream(tokenizer, TINY_TEXT)
    count = stream.numel() // seq_len
    assert windows.dtype == torch.long
    assert windows.shape == (count, seq_len + 1)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert torch.equal(windows[:, 1:].reshape(-1), stream[: count * seq_len])
    # no special tokens inside the windows (tokenized without them)
    assert not (windows[:, 1:] == tokenizer.bos_token_id).any()


def test_max_windows_takes_the_first_ones(tokenizer):
    all_windows = token_windows(tokenizer, [TINY_TEXT], 16)
    three = token_windows(tokenizer, [TINY_TEXT], 16, max_windows=3)
    assert three.shape == (3, 17)
    assert torch.equal(three, all_windows[:3])


def test_domain_windows_take_a_folders_files_in_turn(tokenizer, tmp_path):
    folder = tmp_path / "server"
    folder.mkdir()
    halves = TINY_TEXT[: len(TINY_TEXT) // 2], TINY_TEXT[len(TINY_TEXT) // 2:]
    (folder / "a.txt").write_text(halves[0])
    (folder / "b.txt").write_text(halves[1])
    each = [token_windows(tokenizer, [h], 16, 2) for h in halves]
    windows = domain_windows(tokenizer, folder, 16, 3)
    assert windows.shape == (3, 17)
    # a's first, b's first, a's second: the first two windows already cover both files
    assert torch.equal(windows, torch.stack([each[0][0], each[1][0], each[0][1]]))


def test_domain_windows_of_a_file_or_a_one_file_folder_are_token_windows(tokenizer, tmp_path):
    (tmp_path / "only.txt").write_text(TINY_TEXT)
    expected = token_windows(tokenizer, [TINY_TEXT], 16, 3)
    assert torch.equal(domain_windows(tokenizer, tmp_path / "only.txt", 16, 3), expected)
    assert torch.equal(domain_windows(tokenizer, tmp_path, 16, 3), expected)


def test_max_windows_beyond_available_warns_and_gives_all(tokenizer, caplog):
    available = _stream(tokenizer, TINY_TEXT).numel() // 64
    with caplog.at_level(logging.WARNING, logger="llmprune.data"):
        windows = token_windows(tokenizer, [TINY_TEXT], 64, max_windows=1000)
    assert windows.shape[0] == available
    assert "asked for 1000" in caplog.text


def test_documents_are_joined_and_tokenized_once(tokenizer):
    docs = ["The quick brown fox.", "Jumps over the lazy dog.", "Pruning removes weights."] * 10
    windows = token_windows(tokenizer, docs, 8, add_bos=False)
    stream = _stream(tokenizer, join_documents(docs))
    assert join_documents(docs) == "\n\n".join(docs)
    assert torch.equal(windows.reshape(-1), stream[: windows.numel()])
    assert join_documents(["only one"]) == "only one"


def test_add_bos_false(tokenizer):
    windows = token_windows(tokenizer, [TINY_TEXT], 20, max_windows=2, add_bos=False)
    assert windows.shape == (2, 20)
    assert torch.equal(windows.reshape(-1), _stream(tokenizer, TINY_TEXT)[:40])


def test_tokenizer_without_bos_gets_no_prefix():
    tok = tiny_tokenizer()
    tok.bos_token = None
    assert tok.bos_token_id is None
    windows = token_windows(tok, [TINY_TEXT], 20, max_windows=2)
    assert windows.shape == (2, 20)


def test_too_short_data(tokenizer):
    n = _stream(tokenizer, "short text").numel()
    with pytest.raises(LLMPruneError, match=f"data too short: {n} tokens, fewer than one window of 512"):
        token_windows(tokenizer, ["short text"], 512)


def test_seq_len_must_be_positive(tokenizer):
    with pytest.raises(LLMPruneError, match="at least 1"):
        token_windows(tokenizer, [TINY_TEXT], 0)


def test_max_windows_zero_is_an_error(tokenizer):
    """KNOWN LIBRARY BUG — fails today: max_windows=0 returns an empty (0, seq_len+1) tensor, and
    perplexity() of that reports 1.0 from zero tokens. The CLI's positive_int guards --max-windows,
    the Python API does not. Suggested fix in llmprune/data.py cut_windows: raise
    LLMPruneError("--max-windows must be at least 1 (got 0)", ...) when max_windows < 1, as for
    seq_len < 1."""
    with pytest.raises(LLMPruneError, match="at least 1"):
        token_windows(tokenizer, [TINY_TEXT], 16, max_windows=0)


def test_python_docs_is_the_language_reference_this_python_carries(monkeypatch):
    import pydoc_data.topics
    import sys

    import llmprune
    from llmprune.errors import LLMPruneError

    texts = llmprune.load_texts("python-docs")
    assert texts == [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    assert len(texts) > 50 and sum(map(len, texts)) > 100_000 and "Assignment statements" in "".join(texts)
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)       # a Python built without its docs
    with pytest.raises(LLMPruneError, match="no pydoc_data .* pass --calib FILE"):
        llmprune.load_texts("python-docs")
