"""Vocabulary pruning (llmprune.compress.vocab): selection, closure, the rebuilt tokenizer and the
sliced embedding, on a tiny SentencePiece-BPE (byte fallback) and a tiny byte-level BPE tokenizer;
the real Gemma-3 tokenizer in the integration test."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from llmprune.compress import vocab as V
from llmprune.compress.vocab import (
    BYTE_LEVEL_BPE,
    SPM_BPE,
    VOCAB_FILE,
    check_tokenizer_fits,
    closure,
    forced_ids,
    load_vocabulary_map,
    rebuild_tokenizer,
    remap_id,
    remap_ids,
    save_vocabulary_map,
    select_vocabulary,
    slice_vocabulary,
    token_counts,
    tokenizer_json,
    tokenizer_kind,
)
from llmprune.errors import LLMPruneError
from llmprune.gguf_tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    build_spm_tokenizer,
)
from llmprune.testing import tiny_model, tiny_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

TRAIN = """The river rises in the northern hills and flows south through farmland, forests and two
small towns before it reaches the sea. Farmers along its banks grow wheat, barley and apples.
In the spring the water is high and fast; in the late summer it is low, warm and slow.
The town council meets every month to discuss the bridge, the school and the market square.
Children walk to school along the river path, and their parents drive to work in the city.
A new library opened last year with thousands of books, a reading room and a small cafe.
Scientists measure the temperature, the depth and the speed of the water every morning.
Their reports show that the river is cleaner than it was twenty years ago."""

DATA = """The library in the river town opened its doors to readers every morning at nine.
Parents and children came to read books about farms, forests, bridges and the sea.
The council discussed the school budget and the market square at its monthly meeting.
Scientists from the city studied the water: its speed, its depth and its temperature.
In the summer the river was warm and slow, and in the spring it was fast and high.
""" * 10

VARIED = [
    "Completely unseen words: xylophone quizzical jukebox zephyr.",
    "Digits 0123456789 and 3.14159, punctuation !?;:'\"()[]{}<>@#$%^&*_+=|\\/~`",
    "Lines\nand\n\nparagraphs\r\n\ttabs\t\tand   many    spaces  ",
    "Emoji 😀🚀👍🏽 and CJK 漢字かなカナ한국어, accents éàüñçø, Greek αβγ, Cyrillic жизнь.",
    "Control bytes \x00\x01\x7f and rare ones \u2028 \ufeff ▁ ▁▁x",
    "<h1>Header</h1> with a literal <eos> and <bos> inside.",
    TRAIN,
]


# ---------------------------------------------------------------------------- tiny tokenizers


def _spm_vocab(text: str) -> dict:
    """A hand-made GGUF-style SentencePiece vocabulary: controls, a placeholder, user-defined
    pieces, 256 byte tokens, the text's characters and its most frequent word pieces."""
    counts: Counter = Counter()
    for word in text.split():
        piece = "▁" + word
        for start in range(len(piece)):
            for length in range(2, 7):
                if start + length <= len(piece):
                    counts[piece[start:start + length]] += 1
    chars = sorted(set("▁" + "".join(text.split())))
    normal = [p for p, _ in counts.most_common(300)]
    specials = [("<pad>", TOKEN_CONTROL), ("<eos>", TOKEN_CONTROL), ("<bos>", TOKEN_CONTROL), ("<unk>", TOKEN_UNKNOWN),
                ("<mask>", TOKEN_CONTROL), ("<unused0>", TOKEN_CONTROL), ("<unused1>", TOKEN_CONTROL),
                ("\n\n", TOKEN_USER_DEFINED), ("<h1>", TOKEN_USER_DEFINED)]
    tokens = [t for t, _ in specials] + [f"<0x{b:02X}>" for b in range(256)] + chars + normal
    types = [k for _, k in specials] + [TOKEN_BYTE] * 256 + [TOKEN_NORMAL] * (len(chars) + len(normal))
    scores = ([0.0] * (len(specials) + 256) + [-1000.0 - i for i in range(len(chars))]
              + [-float(i) for i in range(len(normal))])
    return {"tokens": tokens, "scores": np.array(scores), "types": np.array(types), "bos_id": 2, "eos_id": 1,
            "unk_id": 3, "pad_id": 0, "add_bos": True, "add_eos": False, "add_space_prefix": False}


def _spm_tokenizer():
    """Wrapped the way llmprune.gguf_tokenizer wraps Gemma-3's."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab = _spm_vocab(TRAIN)
    tok = build_spm_tokenizer(vocab)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>", add_bos_token=True, add_eos_token=False,
                                   clean_up_tokenization_spaces=False, padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="module")
def spm():
    return _spm_tokenizer()


@pytest.fixture(scope="module")
def bytelevel():
    return tiny_tokenizer(vocab_size=600, text=TRAIN)


@pytest.fixture(scope="module", params=["spm", "bytelevel"])
def orig(request, spm, bytelevel):
    return {"spm": spm, "bytelevel": bytelevel}[request.param]


def _pieces(tok) -> list[str]:
    by_id = {i: p for p, i in tok.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    return [by_id[i] for i in range(len(by_id))]


def _minimum(tok) -> int:
    j = tokenizer_json(tok)
    return len(closure(j, forced_ids(j)))


# ---------------------------------------------------------------------------- kinds and forced ids


def test_kinds_are_recognised(spm, bytelevel):
    assert tokenizer_kind(tokenizer_json(spm)) == SPM_BPE
    assert tokenizer_kind(tokenizer_json(bytelevel)) == BYTE_LEVEL_BPE


def _backend(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    model = {"wordpiece": lambda: models.WordPiece(vocab, unk_token="[UNK]"),
             "unigram": lambda: models.Unigram([(p, -1.0) for p in vocab], unk_id=0),
             "bpe": lambda: models.BPE(vocab, [("a", "b")], unk_token="[UNK]")}[kind]()
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind, message", [("wordpiece", "does not support WordPiece tokenizers"),
                                           ("unigram", "does not support Unigram tokenizers"),
                                           ("bpe", "without byte fallback or a byte-level pre-tokenizer")])
def test_unsupported_tokenizers_are_refused(kind, message):
    tok = _backend(kind)
    with pytest.raises(LLMPruneError, match=message) as err:
        select_vocabulary(tok, [DATA], 10)
    assert "drop --vocab" in str(err.value)
    with pytest.raises(LLMPruneError, match=message):
        rebuild_tokenizer(tok, [0, 1])


def test_a_slow_tokenizer_is_refused():
    class Slow:
        pass

    with pytest.raises(LLMPruneError, match="needs a fast tokenizer, got the slow Slow"):
        select_vocabulary(Slow(), [DATA], 10)


def test_forced_ids_sentencepiece(spm):
    forced = forced_ids(tokenizer_json(spm))
    vocab = spm.get_vocab()
    expected = {vocab[t] for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n\n", "<h1>", "▁")}
    expected |= {vocab[f"<0x{b:02X}>"] for b in range(256)}
    assert forced == expected  # <unused0>, <unused1> are not kept: reserved rows never emitted


def test_forced_ids_byte_level(bytelevel):
    from tokenizers import pre_tokenizers

    forced = forced_ids(tokenizer_json(bytelevel))
    vocab = bytelevel.get_vocab()
    assert forced == {0, 1, 2} | {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet()}
    assert len(forced) == 259


def test_merges_stored_as_strings_behave_like_lists(bytelevel):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    j = tokenizer_json(bytelevel)
    s = json.loads(json.dumps(j))
    s["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
    assert forced_ids(s) == forced_ids(j)
    ids = set(range(300, len(bytelevel)))
    assert closure(s, ids) == closure(j, ids)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(s)), bos_token="<bos>",
                                  eos_token="<eos>")
    sel = select_vocabulary(tok, [DATA], 320)
    assert np.array_equal(sel.kept_ids, select_vocabulary(bytelevel, [DATA], 320).kept_ids)
    new = rebuild_tokenizer(tok, sel.kept_ids)
    assert new.decode(new.encode(TRAIN, add_special_tokens=False)) == TRAIN


# ---------------------------------------------------------------------------- closure and selection


def _producers(tok_json) -> dict[str, list]:
    out: dict[str, list] = {}
    for m in tok_json["model"]["merges"]:
        left, right = V.merge_parts(m)
        out.setdefault(left + right, []).append((left, right))
    return out


def test_closure_adds_the_parts_a_piece_needs(orig):
    j = tokenizer_json(orig)
    producers = _producers(j)
    pieces = _pieces(orig)
    longest = max((i for i, p in enumerate(pieces) if p in producers), key=lambda i: len(pieces[i]))
    got = closure(j, {longest})
    assert longest in got and len(got) > 1
    kept = {pieces[i] for i in got}
    for piece in kept:
        if piece in producers:
            assert any(a in kept and b in kept for a, b in producers[piece]), piece
    assert closure(j, got) == got


def test_selection_keeps_exactly_k_and_the_forced_set(orig):
    j = tokenizer_json(orig)
    for k in (_minimum(orig), _minimum(orig) + 37, len(orig)):
        sel = select_vocabulary(orig, [DATA], k)
        assert sel.size == k and sel.kept_ids.dtype == np.int64
        assert np.all(np.diff(sel.kept_ids) > 0)
        assert forced_ids(j) <= set(sel.kept_ids.tolist())
        assert sel.original_size == len(orig) and sel.size_requested == k
        assert sel.data_tokens == int(token_counts(orig, [DATA]).sum())


def test_coverage_grows_with_k_and_selection_is_deterministic(orig):
    low = _minimum(orig)
    sizes = [low, low + 10, low + 40, low + 120, len(orig)]
    sels = [select_vocabulary(orig, [DATA], k) for k in sizes]
    coverages = [s.coverage for s in sels]
    assert coverages == sorted(coverages) and coverages[-1] == 1.0
    assert np.array_equal(sels[2].kept_ids, select_vocabulary(orig, [DATA], sizes[2]).kept_ids)


def test_fraction_keeps_the_fewest_ids_that_cover_it(orig):
    small, large, whole = (select_vocabulary(orig, [DATA], f) for f in (0.5, 0.95, 1.0))
    assert 0.5 <= small.coverage and 0.95 <= large.coverage and whole.coverage == 1.0
    assert small.size <= large.size <= whole.size
    counts = token_counts(orig, [DATA])
    assert set(np.flatnonzero(counts).tolist()) <= set(whole.kept_ids.tolist())


def test_zero_counts_are_ranked_by_merge_rank(bytelevel):
    index = V._build_index(tokenizer_json(bytelevel))
    order = V._order(index, np.zeros(index.size, dtype=np.int64))
    ranks = index.rank[order]
    assert np.all(np.diff(ranks) >= 0)


def test_unseen_pieces_in_the_data_alphabet_come_before_other_scripts(orig):
    index = V._build_index(tokenizer_json(orig))
    texts = ["a b c d e f g h i j k l m n o p q r s t u v w x y z " * 10]
    in_alphabet = V._in_alphabet(index, texts)
    order = V._order(index, np.zeros(index.size, dtype=np.int64), in_alphabet)
    flags = in_alphabet[order[: len(order) - len(index.placeholders)]]
    assert flags.any() and not flags.all()
    first_foreign = int(np.argmin(flags))
    assert flags[:first_foreign].all() and not flags[first_foreign:].any()  # every in-alphabet id first


def test_token_counts_match_the_encoding(orig):
    counts = token_counts(orig, [DATA, TRAIN])
    assert counts.dtype == np.int64 and len(counts) == len(orig)
    assert counts.sum() == sum(len(orig.encode(t, add_special_tokens=False)) for t in (DATA, TRAIN))


@pytest.mark.parametrize("size, message", [
    (10**6, r"--vocab 1000000 is more than the tokenizer's \d+ ids"),
    (5, r"--vocab 5 is below the \d+ ids every pruned vocabulary keeps .* pass at least \d+"),
    (0, "is below the"),
    (0.0, r"--vocab fraction 0.0 is outside \(0, 1\]"),
    (1.5, r"fraction 1.5 is outside \(0, 1\]"),
    (-0.2, "is outside"),
    (True, "must be a token count or a fraction in \\(0, 1\\], got True"),
    ("32000", "got '32000'"),
    (None, "got None"),
])
def test_bad_sizes_are_refused(orig, size, message):
    with pytest.raises(LLMPruneError, match=message):
        select_vocabulary(orig, [DATA], size)


def test_too_little_data_is_refused(orig):
    with pytest.raises(LLMPruneError, match=r"only \d+ tokens, too few to rank tokens .* pass more --vocab-data or --calib text"):
        select_vocabulary(orig, ["a few words"], 300)
    with pytest.raises(LLMPruneError, match="only 0 tokens"):
        select_vocabulary(orig, [], 0.9)


# ---------------------------------------------------------------------------- the rebuilt tokenizer


@pytest.fixture(scope="module")
def pruned(orig):
    sel = select_vocabulary(orig, [DATA], _minimum(orig) + 60)
    return sel, rebuild_tokenizer(orig, sel.kept_ids)


def test_rebuilt_ids_are_contiguous_and_pieces_follow(orig, pruned):
    sel, new = pruned
    assert len(new) == sel.size
    assert sorted(new.get_vocab().values()) == list(range(sel.size))
    old = _pieces(orig)
    assert _pieces(new) == [old[i] for i in sel.kept_ids]


def test_every_kept_piece_is_buildable(orig, pruned):
    old, new = _producers(tokenizer_json(orig)), _producers(tokenizer_json(pruned[1]))
    for piece in _pieces(pruned[1]):
        if piece in old:
            assert piece in new, f"no kept merge produces {piece!r}"


@pytest.mark.parametrize("text", VARIED)
def test_any_text_tokenizes_and_round_trips(orig, pruned, text):
    sel, new = pruned
    ids = new.encode(text, add_special_tokens=False)
    assert ids and max(ids) < sel.size
    expected = orig.decode(orig.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert new.decode(ids, skip_special_tokens=True) == expected


def test_a_dropped_placeholder_is_plain_text(spm):
    """The one round-trip difference: `<unusedN>` is no longer a special token, so a literal one in
    the text is tokenized (and decoded) as ordinary characters instead of being skipped."""
    new = rebuild_tokenizer(spm, select_vocabulary(spm, [DATA], 0.99).kept_ids)
    text = "a <unused0> b"
    assert "<unused0>" not in new.get_vocab()
    assert new.decode(new.encode(text, add_special_tokens=False), skip_special_tokens=True) == text


def test_pruned_tokenization_costs_a_few_more_tokens(orig, pruned):
    sel, new = pruned
    old_ids = orig.encode(DATA, add_special_tokens=False)
    assert len(old_ids) < len(new.encode(DATA, add_special_tokens=False)) <= 2 * len(old_ids)


def test_full_coverage_keeps_the_data_tokenization(orig):
    sel = select_vocabulary(orig, [DATA], 1.0)
    new = rebuild_tokenizer(orig, sel.kept_ids)
    old_ids = orig.encode(DATA, add_special_tokens=False)
    assert remap_ids(old_ids, sel.kept_ids).tolist() == new.encode(DATA, add_special_tokens=False)


def test_specials_keep_working(orig, pruned):
    sel, new = pruned
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(new, name) == getattr(orig, name)
        assert getattr(new, name + "_id") == remap_id(getattr(orig, name + "_id"), sel.kept_ids)
    ids = new("hello river")["input_ids"]
    assert ids[0] == new.bos_token_id and orig("hello river")["input_ids"][0] == orig.bos_token_id
    assert new.convert_ids_to_tokens(new.eos_token_id) == "<eos>"
    assert new.model_input_names == ["input_ids", "attention_mask"]
    assert new.padding_side == orig.padding_side
    assert new.init_kwargs.get("add_bos_token") == orig.init_kwargs.get("add_bos_token")


def test_rebuilt_tokenizer_saves_and_reloads(orig, pruned, tmp_path):
    from transformers import AutoTokenizer

    new = pruned[1]
    new.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    for text in VARIED[:4]:
        assert back(text)["input_ids"] == new(text)["input_ids"]


def test_rebuild_refuses_dropping_what_the_post_processor_inserts(orig):
    kept = sorted(set(range(len(orig))) - {orig.bos_token_id})
    with pytest.raises(LLMPruneError, match="post-processor inserts '<bos>'"):
        rebuild_tokenizer(orig, kept)


# ---------------------------------------------------------------------------- the model


def _kept_for_model() -> np.ndarray:
    return np.array(sorted({1, 2} | set(range(5, 320, 3))), dtype=np.int64)  # pad 0 and id 3 dropped


@pytest.mark.parametrize("arch", ARCHS)
def test_slice_vocabulary_keeps_the_logits_of_kept_ids(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    kept = _kept_for_model()
    ids = torch.tensor([[1, 5, 8, 11, 200, 317, 2]])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == bool(model.config.tie_word_embeddings)
    model.generation_config.eos_token_id = [2, 3]
    with torch.no_grad():
        ref = model(ids).logits[..., torch.as_tensor(kept)]
    slice_vocabulary(model, kept)
    new_ids = torch.as_tensor(remap_ids(ids.numpy(), kept))
    assert (new_ids >= 0).all()
    with torch.no_grad():
        got = model(new_ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is emb.weight) == tied
    assert emb.weight.shape[0] == head.weight.shape[0] == len(kept) == model.config.vocab_size
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (None, 0, 1)
    assert model.generation_config.eos_token_id == [1] and model.generation_config.pad_token_id is None
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (back.get_output_embeddings().weight is back.get_input_embeddings().weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(back(new_ids).logits, got, atol=1e-5, rtol=1e-5)


def test_slice_vocabulary_slices_an_untied_head_bias():
    model = tiny_model("llama")
    model.lm_head = nn.Linear(64, 320, bias=True)
    bias = model.lm_head.bias.detach().clone()
    kept = _kept_for_model()
    slice_vocabulary(model, kept)
    assert model.lm_head.out_features == len(kept)
    assert torch.equal(model.lm_head.bias, bias[torch.as_tensor(kept)])


def test_slice_vocabulary_refuses_ids_beyond_the_embedding():
    with pytest.raises(LLMPruneError, match="outside the vocabulary of 320 ids"):
        slice_vocabulary(tiny_model("llama"), [0, 1, 320])


def test_check_tokenizer_fits(bytelevel):
    from llmprune.testing import tiny_config

    n = len(bytelevel)
    check_tokenizer_fits(bytelevel, tiny_config("llama", vocab_size=n))
    check_tokenizer_fits(bytelevel, tiny_config("qwen2", vocab_size=n + 100))  # more rows than ids is fine
    with pytest.raises(LLMPruneError, match=f"the tokenizer has {n} ids but the embedding only 320 rows"):
        check_tokenizer_fits(bytelevel, tiny_config("llama"))


# ---------------------------------------------------------------------------- id maps and vocabulary.json


def test_remap_ids():
    kept = np.array([0, 3, 7, 9])
    assert remap_ids([[7, 1], [9, 0]], kept).tolist() == [[2, -1], [3, 0]]
    assert remap_id(3, kept) == 1 and remap_id(4, kept) is None and remap_id(None, kept) is None
    assert remap_id([9, 4, 0], kept) == [3, 0] and remap_id([4], kept) is None


def test_vocabulary_map_round_trip(bytelevel, tmp_path):
    sel = select_vocabulary(bytelevel, [DATA], 0.9)
    path = save_vocabulary_map(tmp_path, sel, {"data": "calib.txt"})
    assert path.name == VOCAB_FILE
    data = load_vocabulary_map(tmp_path)
    assert data["kept_ids"] == sel.kept_ids.tolist() and data["original_vocab_size"] == len(bytelevel)
    assert data["coverage"] == sel.coverage and data["data"] == "calib.txt" and data["size_requested"] == 0.9
    assert load_vocabulary_map(tmp_path / "missing") is None


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not readable JSON"),
    ("[1, 2]", "has no list of integer kept_ids"),
    ('{"kept_ids": [1, "2"]}', "has no list of integer kept_ids"),
    ('{"kept_ids": [3, 2]}', "not strictly increasing"),
    ('{"kept_ids": [1, 5], "original_vocab_size": 4}', "beyond original_vocab_size 4"),
])
def test_broken_vocabulary_maps_are_refused(tmp_path, content, message):
    (tmp_path / VOCAB_FILE).write_text(content)
    with pytest.raises(LLMPruneError, match=message):
        load_vocabulary_map(tmp_path)


def test_a_vocabulary_map_that_disagrees_with_the_embedding_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 3}')
    (tmp_path / VOCAB_FILE).write_text('{"kept_ids": [0, 1, 5, 9]}')
    with pytest.raises(LLMPruneError, match="lists 4 kept ids but the model's embedding has 3 rows"):
        load_vocabulary_map(tmp_path)
    (tmp_path / "config.json").write_text('{"vocab_size": 4}')
    assert load_vocabulary_map(tmp_path)["kept_ids"] == [0, 1, 5, 9]


# ---------------------------------------------------------------------------- the real Gemma-3 tokenizer


@pytest.mark.integration
def test_gemma_vocabulary_of_32000(shared_data):
    import llmprune

    tok = llmprune.load_tokenizer("gemma-3-270m")
    texts = [(shared_data / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8"),
             (shared_data / "pydocs" / "howto.txt").read_text(encoding="utf-8")]
    start = time.perf_counter()
    sel = select_vocabulary(tok, texts, 32000)
    new = rebuild_tokenizer(tok, sel.kept_ids)
    seconds = time.perf_counter() - start
    print(f"\nselect + rebuild of 32000 ids: {seconds:.1f} s; forced {sel.forced}, coverage {sel.coverage:.4f},"
          f" {sel.distinct_in_data} distinct ids in {sel.data_tokens} data tokens")
    assert seconds < 60 and sel.size == 32000 and len(new) == 32000
    with (shared_data / "wikitext2" / "wiki.test.raw").open(encoding="utf-8") as f:
        tests = {"wiki.test.raw[:200k]": f.read(200_000),
                 "tutorial.txt": (shared_data / "pydocs" / "tutorial.txt").read_text(encoding="utf-8")}
    for name, text in tests.items():
        old_ids = tok.encode(text, add_special_tokens=False)
        new_ids = new.encode(text, add_special_tokens=False)
        print(f"{name}: {len(new_ids)} / {len(old_ids)} tokens = {len(new_ids) / len(old_ids):.4f}")
        assert max(new_ids) < 32000
        assert new.decode(new_ids) == tok.decode(old_ids)
    assert new("hi")["input_ids"][0] == new.bos_token_id == remap_id(tok.bos_token_id, sel.kept_ids)
