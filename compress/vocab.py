"""Vocabulary pruning: keep K token ids (or the fewest that cover a share of some data's tokens),
rebuild the tokenizer over them and slice the embedding and LM head to match.

Why: Gemma-3-270M's 262,144-row embedding (tied to the LM head) is 63% of the model's parameters,
while a deployment's text uses a few tens of thousands of ids. Dropping the rest shrinks the
model without touching a single transformer layer.

Two tokenizer kinds are supported, both BPE where every text still tokenizes after pieces are
dropped:

- SentencePiece-style BPE with `byte_fallback` (Gemma-3 via `llmprune.gguf_tokenizer`, Llama-2,
  Mistral): characters missing from the vocabulary become `<0xNN>` byte tokens;
- byte-level BPE (GPT-2, Llama-3, Qwen2): the base alphabet is the 256 byte characters.

Keeping a piece is not enough: the rebuilt tokenizer must be able to *build* it, so every kept
piece comes with the merge parts that produce it (`closure`). The tokenizer is rebuilt from its
`tokenizer.json` (new id = position of the original id in the sorted kept ids), never patched.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmprune.checkpoint import VOCAB_FILE, load_vocabulary_map  # noqa: F401 - the checkpoint format; re-exported
from llmprune.errors import LLMPruneError
from llmprune.evaluate import byte_level_decoder
from llmprune.integrity import check_tokenizer_fits  # noqa: F401 - moved to the root package; re-exported

MIN_DATA_TOKENS = 1000
SPM_BPE, BYTE_LEVEL_BPE = "sentencepiece-bpe", "byte-level-bpe"
SUPPORTED_FIX = ("vocabulary pruning supports SentencePiece-BPE (byte fallback) and byte-level BPE tokenizers;"
                 " drop --vocab")
# Reserved rows no tokenizer ever emits: Gemma-3's ~6,242 `<unusedN>` and Llama-3's reserved
# special tokens. Keeping them would cost thousands of embedding rows for nothing.
PLACEHOLDER = re.compile(r"<unused\d+>|<\|reserved_special_token_\d+\|>")
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPM_SPACE = "▁"


# ---------------------------------------------------------------------------- tokenizer.json


def tokenizer_json(tokenizer) -> dict:
    """The backend `tokenizer.json` of a transformers fast tokenizer, as a dict.

    A slow (Python) tokenizer has no such description to rebuild from, so it is refused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LLMPruneError(f"vocabulary pruning needs a fast tokenizer, got the slow {type(tokenizer).__name__}",
                            SUPPORTED_FIX)
    return json.loads(backend.to_str())


def _has_byte_level(step: dict | None) -> bool:
    """Whether a pre-tokenizer (or a Sequence of them) contains ByteLevel."""
    if not step:
        return False
    if step.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(s) for s in step.get("pretokenizers") or [])


def tokenizer_kind(tok_json: dict) -> str:
    """SPM_BPE or BYTE_LEVEL_BPE; anything else is refused (only these two still tokenize any
    text after pieces are dropped: one falls back to byte tokens, the other starts from bytes)."""
    model = tok_json.get("model") or {}
    kind = model.get("type") or "unknown"
    if kind != "BPE":
        raise LLMPruneError(f"vocabulary pruning does not support {kind} tokenizers", SUPPORTED_FIX)
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise LLMPruneError("vocabulary pruning does not support BPE tokenizers with subword prefixes or suffixes",
                            SUPPORTED_FIX)
    if model.get("byte_fallback"):
        return SPM_BPE
    if _has_byte_level(tok_json.get("pre_tokenizer")):
        return BYTE_LEVEL_BPE
    raise LLMPruneError("vocabulary pruning does not support BPE tokenizers without byte fallback or a byte-level"
                        " pre-tokenizer (text outside the kept pieces could not be tokenized)", SUPPORTED_FIX)


def merge_parts(merge: list | str) -> tuple[str, str]:
    """(left, right) of a merge stored as `[l, r]` (tokenizers ≥ 0.20) or as the string `"l r"`."""
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def vocabulary_size(tok_json: dict) -> int:
    """Number of ids the tokenizer can emit: the highest id (model vocabulary or added token) + 1."""
    ids = list((tok_json.get("model") or {}).get("vocab", {}).values())
    ids += [a["id"] for a in tok_json.get("added_tokens") or []]
    return max(ids) + 1 if ids else 0


def _walk_processor(proc: dict | None, fn) -> dict | None:
    """A copy of a post-processor with every special token id replaced by fn(token, id):
    TemplateProcessing, Roberta/BertProcessing and Sequences of them (ByteLevel holds no ids)."""
    if not proc:
        return proc
    kind = proc.get("type")
    if kind == "Sequence":
        return {**proc, "processors": [_walk_processor(p, fn) for p in proc.get("processors") or []]}
    if kind == "TemplateProcessing":
        specials = {name: {**s, "ids": [fn(t, i) for t, i in zip(s["tokens"], s["ids"])]}
                    for name, s in (proc.get("special_tokens") or {}).items()}
        return {**proc, "special_tokens": specials}
    if kind in ("RobertaProcessing", "BertProcessing"):
        return {**proc, **{key: [proc[key][0], fn(*proc[key])] for key in ("sep", "cls") if key in proc}}
    return proc


def _processor_ids(tok_json: dict) -> set[int]:
    """Ids the post-processor inserts (bos/eos/cls/sep): the rebuilt tokenizer must keep them."""
    found: set[int] = set()
    _walk_processor(tok_json.get("post_processor"), lambda _t, i: found.add(int(i)) or i)
    return found


def is_placeholder(added: dict) -> bool:
    """A reserved special token (`<unusedN>`): never emitted by the tokenizer, so not kept."""
    return bool(added.get("special")) and PLACEHOLDER.fullmatch(added.get("content", "")) is not None


def forced_ids(tok_json: dict) -> set[int]:
    """Ids every pruned vocabulary keeps, whatever the data says.

    - every added token (control and user-defined pieces: chat markers, runs of newlines/tabs,
      HTML tags...) except reserved placeholders (`<unusedN>`: thousands of rows never emitted);
    - the ids the post-processor inserts (bos/eos);
    - SentencePiece-BPE: the 256 `<0xNN>` byte tokens (the fallback that lets any text tokenize),
      the unk token and `▁` (the decoder turns only that piece back into a space; as bytes it
      would decode to a literal `▁`);
    - byte-level BPE: the 256 single byte characters (the base alphabet every piece is built from).
    """
    from tokenizers import pre_tokenizers

    kind = tokenizer_kind(tok_json)
    model = tok_json["model"]
    vocab = model.get("vocab", {})
    forced = {int(a["id"]) for a in tok_json.get("added_tokens") or [] if not is_placeholder(a)}
    forced |= _processor_ids(tok_json)
    if kind == SPM_BPE:
        forced |= {i for p, i in vocab.items() if BYTE_PIECE.fullmatch(p)}
        forced |= {vocab[p] for p in (model.get("unk_token"), SPM_SPACE) if p in vocab}
    else:
        forced |= {vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}
    return forced


# ---------------------------------------------------------------------------- merge index


@dataclass
class _Index:
    """What selection and closure need from a tokenizer.json, computed once (513k merges on Gemma)."""

    kind: str
    size: int  # highest id + 1
    pieces: list  # id -> piece string (None for holes)
    producers: dict  # result id -> [(left id, right id), ...] in merge order (earliest first)
    rank: np.ndarray  # id -> index of the earliest merge producing it (len(merges) when none)
    placeholders: np.ndarray  # ids of reserved placeholder specials
    forced: set


def _build_index(tok_json: dict) -> _Index:
    """Index the merges by the piece they produce; pieces with no merge are base symbols
    (single characters), byte tokens, added tokens or pieces BPE can never reach."""
    kind = tokenizer_kind(tok_json)
    model = tok_json["model"]
    vocab = model.get("vocab", {})
    size = vocabulary_size(tok_json)
    pieces: list = [None] * size
    for piece, i in vocab.items():
        pieces[i] = piece
    for added in tok_json.get("added_tokens") or []:
        pieces[added["id"]] = pieces[added["id"]] or added["content"]
    merges = model.get("merges") or []
    producers: dict[int, list] = {}
    rank = np.full(size, len(merges), dtype=np.int64)
    get = vocab.get
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge  # merge_parts, inlined
        li, ri, res = get(left), get(right), get(left + right)
        if li is None or ri is None or res is None:
            continue
        if res not in producers:
            producers[res] = []
            rank[res] = r
        producers[res].append((li, ri))
    placeholders = np.array(sorted(a["id"] for a in tok_json.get("added_tokens") or [] if is_placeholder(a)),
                            dtype=np.int64)
    return _Index(kind, size, pieces, producers, rank, placeholders, forced_ids(tok_json))


def _requirement(index: _Index, kept: set[int], token: int) -> set[int]:
    """The ids keeping `token` adds to `kept`: itself, and — unless a merge producing it has both
    parts kept — the parts of its earliest merge, recursively.

    Assumes every id in `kept` is already buildable. Parts are strictly shorter than the piece,
    so an id already in `new` when its parent is examined has been fully handled."""
    new: set[int] = set()

    def need(i: int) -> None:
        if i in kept or i in new:
            return
        new.add(i)
        producers = index.producers.get(i)
        if not producers:
            return
        if any((left in kept or left in new) and (right in kept or right in new) for left, right in producers):
            return
        left, right = producers[0]
        need(left)
        need(right)

    need(int(token))
    return new


def _close(index: _Index, ids: Iterable[int]) -> set[int]:
    """`ids` plus everything needed to build them (shortest pieces first, so parts are settled
    before the pieces made of them)."""
    kept: set[int] = set()
    for i in sorted({int(i) for i in ids}, key=lambda j: (len(index.pieces[j] or ""), j)):
        kept |= _requirement(index, kept, i)
    return kept


def closure(tok_json: dict, ids: set[int]) -> set[int]:
    """`ids` plus the merge parts the rebuilt tokenizer needs to produce each kept piece.

    A single character is a base symbol. A longer piece is buildable when some merge (l, r)
    producing it has both l and r kept and buildable; otherwise the parts of its earliest
    (highest-ranked) merge are added, recursively. Without this a kept piece would be dead
    weight: the rebuilt BPE could never reach it and would emit its fragments instead."""
    index = _build_index(tok_json)
    ids = {int(i) for i in ids}
    if ids:
        _as_kept(sorted(ids), index.size)
    return _close(index, ids)


# ---------------------------------------------------------------------------- selection


@dataclass
class VocabularySelection:
    """Which original ids a pruned vocabulary keeps (new id = position in `kept_ids`) and how much
    of the data's tokens they cover."""

    kept_ids: np.ndarray  # sorted int64 original ids
    original_size: int
    forced: int  # ids kept whatever the data (forced_ids)
    coverage: float  # share of the data's tokens (original tokenization) whose id is kept
    data_tokens: int
    distinct_in_data: int
    size_requested: int | float

    @property
    def size(self) -> int:
        return int(len(self.kept_ids))


def token_counts(tokenizer, texts: list[str], size: int | None = None) -> np.ndarray:
    """How often each id occurs in `texts` tokenized by the original tokenizer (one Rust batch
    call, no special tokens added): int64, one entry per id (at least `size` entries)."""
    backend = tokenizer.backend_tokenizer
    n = size if size is not None else backend.get_vocab_size(with_added_tokens=True)
    encodings = backend.encode_batch(list(texts), add_special_tokens=False) if texts else []
    ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=n).astype(np.int64)


def _check_size(size, vocab_ids: int) -> None:
    """Refuse a --vocab value that is no count or fraction, or a count beyond the vocabulary."""
    if isinstance(size, bool) or not isinstance(size, (numbers.Integral, float)):
        raise LLMPruneError(f"the vocabulary size must be a token count or a fraction in (0, 1], got {size!r}",
                            "pass e.g. --vocab 32000 or --vocab 0.99")
    if isinstance(size, numbers.Integral) and size > vocab_ids:
        raise LLMPruneError(f"--vocab {size} is more than the tokenizer's {vocab_ids} ids",
                            f"pass at most {vocab_ids}, or a fraction of the data's tokens such as 0.99")
    if isinstance(size, float) and not 0.0 < size <= 1.0:
        raise LLMPruneError(f"--vocab fraction {size} is outside (0, 1]",
                            "pass a fraction such as 0.99, or a token count such as 32000")


def _piece_text(piece: str | None, kind: str) -> str | None:
    """The text a piece stands for: SentencePiece's space mark as a space, byte-level BPE's byte
    characters decoded (a piece holding part of a character decodes to less)."""
    if piece is None:
        return None
    if kind == BYTE_LEVEL_BPE:
        decoder = byte_level_decoder()
        return bytes(decoder[ch] for ch in piece if ch in decoder).decode("utf-8", errors="ignore")
    return piece.replace(SPM_SPACE, " ")


def _in_alphabet(index: _Index, alphabet: set[str]) -> np.ndarray:
    """Per id: whether every character its piece stands for is in `alphabet` (the data's)."""
    alphabet = set(alphabet) | {" "}
    texts_of = (_piece_text(p, index.kind) for p in index.pieces)
    return np.array([t is not None and all(ch in alphabet for ch in t) for t in texts_of], dtype=bool)


def counted_alphabet(tokenizer, counts: np.ndarray) -> set[str]:
    """The characters of the pieces `counts` saw: the data's alphabet when only its token counts
    are known (a fleet's, which sends no text)."""
    index = _build_index(tokenizer_json(tokenizer))
    seen = np.flatnonzero(np.asarray(counts)[: index.size] > 0)
    return {ch for i in seen for ch in (_piece_text(index.pieces[i], index.kind) or "")}


def _order(index: _Index, counts: np.ndarray, in_alphabet: np.ndarray | None = None) -> np.ndarray:
    """Candidate ids, most useful first: by count in the data; among ids of equal count (the
    unseen ones above all), pieces written in the data's alphabet first — a multilingual
    vocabulary's merge ranks put other scripts' pieces early, and the data's script is the best
    guess for unseen text — then by merge rank (an earlier merge was more frequent in the
    tokenizer's training), then by id; placeholders come last."""
    present = np.array([p is not None for p in index.pieces], dtype=bool)
    present[index.placeholders] = False
    ids = np.flatnonzero(present)
    foreign = ~in_alphabet[ids] if in_alphabet is not None else np.zeros(len(ids), dtype=bool)
    ordered = ids[np.lexsort((ids, index.rank[ids], foreign, -counts[ids]))]
    return np.concatenate([ordered, index.placeholders])


def _grow(index: _Index, kept: set[int], order: np.ndarray, k: int) -> None:
    """Add ids in `order`, each with what it needs to be built, while the total stays ≤ k (an id
    whose closure does not fit is skipped; later ones may still fit)."""
    for token in order:
        if len(kept) >= k:
            return
        token = int(token)
        if token in kept:
            continue
        new = _requirement(index, kept, token)
        if len(kept) + len(new) <= k:
            kept |= new


def smallest_vocabulary(tokenizer) -> int:
    """The fewest ids any pruned vocabulary of this tokenizer keeps (forced ids and their closure);
    a tokenizer vocabulary pruning does not support is refused here."""
    index = _build_index(tokenizer_json(tokenizer))
    return len(_close(index, index.forced))


def select_vocabulary(tokenizer, texts: list[str], size: int | float) -> VocabularySelection:
    """The ids to keep: `size` = K keeps exactly K ids (forced ones and their closure, then the
    data's most frequent ids, then unseen ids by merge rank); `size` = FRACTION keeps the fewest
    most frequent ids covering that share of the data's tokens, plus forced ids and closures."""
    tok_json = tokenizer_json(tokenizer)
    tokenizer_kind(tok_json)               # an unsupported tokenizer is refused before its text is read
    counts = token_counts(tokenizer, texts, vocabulary_size(tok_json))
    return select_from_counts(tokenizer, counts, size, set("".join(texts)))


def select_from_counts(tokenizer, counts: np.ndarray, size: int | float,
                       alphabet: set[str] | None = None) -> VocabularySelection:
    """`select_vocabulary` from the data's token counts (one per original id) instead of its text:
    what a server has when devices send counts only. `alphabet` (the data's characters) orders the
    ids the counts never saw; without it, the characters of the pieces they did see."""
    tok_json = tokenizer_json(tokenizer)
    index = _build_index(tok_json)
    n_ids = sum(p is not None for p in index.pieces)
    _check_size(size, n_ids)
    counts = np.zeros(index.size, np.int64) if len(counts) == 0 else np.asarray(counts, np.int64)
    counts = np.pad(counts, (0, max(index.size - len(counts), 0)))[: index.size]
    total = int(counts.sum())
    if total < MIN_DATA_TOKENS:
        raise LLMPruneError(f"the text ranking the vocabulary (--vocab-data, else --calib) has only {total} tokens, "
                            f"too few to rank tokens (at least {MIN_DATA_TOKENS})",
                            "pass more --vocab-data or --calib text, or --of decoder to leave the vocabulary alone")
    if alphabet is None:
        alphabet = counted_alphabet(tokenizer, counts)
    order = _order(index, counts, _in_alphabet(index, alphabet))
    if isinstance(size, numbers.Integral):
        kept = _close(index, index.forced)
        if len(kept) > size:
            raise LLMPruneError(f"--vocab {size} is below the {len(kept)} ids every pruned vocabulary keeps"
                                " (special and byte tokens and the pieces they need)", f"pass at least {len(kept)}")
        _grow(index, kept, order, int(size))
    else:
        cumulative = np.cumsum(counts[order])
        last = int(np.searchsorted(cumulative, size * total, side="left"))
        kept = _close(index, index.forced | {int(i) for i in order[: last + 1]})
    kept_ids = np.array(sorted(kept), dtype=np.int64)
    return VocabularySelection(
        kept_ids=kept_ids, original_size=index.size, forced=len(index.forced),
        coverage=float(counts[kept_ids].sum() / total), data_tokens=total,
        distinct_in_data=int(np.count_nonzero(counts)), size_requested=size,
    )


# ---------------------------------------------------------------------------- id maps


def _as_kept(kept_ids, limit: int | None = None) -> np.ndarray:
    """kept_ids as a sorted, duplicate-free int64 array (within [0, limit) when given)."""
    kept = np.unique(np.asarray(kept_ids, dtype=np.int64).reshape(-1))
    if kept.size == 0:
        raise LLMPruneError("the vocabulary keeps no ids", "keep at least the forced ids (select_vocabulary)")
    if kept[0] < 0 or (limit is not None and kept[-1] >= limit):
        raise LLMPruneError(f"kept token id {int(kept[0] if kept[0] < 0 else kept[-1])} is outside the"
                            f" vocabulary of {limit} ids", "select the ids from this tokenizer and model")
    return kept


def remap_ids(ids, kept_ids) -> np.ndarray:
    """New ids of original `ids` (any shape): the position in sorted `kept_ids`; -1 where dropped."""
    kept = np.asarray(kept_ids, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.clip(np.searchsorted(kept, ids), 0, max(len(kept) - 1, 0))
    found = (kept[pos] == ids) if len(kept) else np.zeros(ids.shape, dtype=bool)
    return np.where(found, pos, -1).astype(np.int64)


def remap_id(token_id, kept_ids):
    """The new id of one original id, a list of them (dropped ones left out; None if all are), or
    None: for config fields such as eos_token_id, which may be a list."""
    if token_id is None:
        return None
    if isinstance(token_id, (list, tuple)):
        mapped = [int(i) for i in remap_ids(list(token_id), kept_ids) if i >= 0]
        return mapped or None
    new = int(remap_ids([token_id], kept_ids)[0])
    return new if new >= 0 else None


# ---------------------------------------------------------------------------- the new tokenizer


def _rebuilt_json(tok_json: dict, kept: np.ndarray) -> dict:
    """tokenizer.json over the kept ids: vocabulary and added tokens renumbered, merges whose parts
    and result are all kept (original order), post-processor and padding ids renumbered."""
    new_id = {int(old): new for new, old in enumerate(kept)}
    model = dict(tok_json["model"])
    vocab = {piece: new_id[i] for piece, i in model.get("vocab", {}).items() if i in new_id}
    model["vocab"] = vocab
    merges = []
    for merge in model.get("merges") or []:
        left, right = merge_parts(merge)
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(merge)
    model["merges"] = merges
    if model.get("unk_token") is not None and model["unk_token"] not in vocab:
        model["unk_token"] = None

    def renumber(token, i):
        if int(i) not in new_id:
            raise LLMPruneError(f"the tokenizer's post-processor inserts {token!r}, which the kept ids drop",
                                "keep the forced ids (forced_ids) in the vocabulary")
        return new_id[int(i)]

    out = dict(tok_json, model=model)
    out["added_tokens"] = [dict(a, id=new_id[a["id"]]) for a in tok_json.get("added_tokens") or []
                           if a["id"] in new_id]
    out["post_processor"] = _walk_processor(tok_json.get("post_processor"), renumber)
    padding = tok_json.get("padding")
    if padding:
        out["padding"] = dict(padding, pad_id=new_id[padding["pad_id"]]) if padding.get("pad_id") in new_id else None
    return out


def _carried_kwargs(tokenizer, kept_pieces: set[str]) -> dict:
    """The wrapper's settings the new tokenizer keeps: special tokens (only the kept ones),
    add_bos/eos_token where the original has them, padding side, decode clean-up, chat template."""
    kwargs: dict = {}
    for name, value in tokenizer.special_tokens_map.items():
        if isinstance(value, list):
            kept = [v for v in value if str(v) in kept_pieces]
            if kept:
                kwargs[name] = kept
        elif str(value) in kept_pieces:
            kwargs[name] = str(value)
    for name in ("add_bos_token", "add_eos_token"):
        if name in tokenizer.init_kwargs:
            kwargs[name] = tokenizer.init_kwargs[name]
    kwargs["padding_side"] = tokenizer.padding_side
    kwargs["clean_up_tokenization_spaces"] = tokenizer.clean_up_tokenization_spaces
    kwargs["model_max_length"] = tokenizer.model_max_length
    if getattr(tokenizer, "chat_template", None):
        kwargs["chat_template"] = tokenizer.chat_template
    return kwargs


def rebuild_tokenizer(tokenizer, kept_ids):
    """A new PreTrainedTokenizerFast over the kept original ids (new id = position in sorted
    kept_ids, so ids are contiguous 0..K-1). Normalizer, pre-tokenizer and decoder are unchanged;
    text whose pieces were dropped falls back to smaller kept pieces, then to bytes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok_json = tokenizer_json(tokenizer)
    tokenizer_kind(tok_json)
    kept = _as_kept(kept_ids, vocabulary_size(tok_json))
    new_json = _rebuilt_json(tok_json, kept)
    backend = Tokenizer.from_str(json.dumps(new_json, ensure_ascii=False))
    pieces = set(new_json["model"]["vocab"]) | {a["content"] for a in new_json["added_tokens"]}
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_input_names=["input_ids", "attention_mask"],
                                   **_carried_kwargs(tokenizer, pieces))


# ---------------------------------------------------------------------------- the model


def _slice_rows(module: nn.Module, index: torch.Tensor) -> None:
    """Keep rows `index` of module.weight (and .bias), in place, same dtype and device."""
    weight = module.weight
    module.weight = nn.Parameter(weight.data.index_select(0, index).clone(), requires_grad=weight.requires_grad)
    if getattr(module, "bias", None) is not None:
        bias = module.bias
        module.bias = nn.Parameter(bias.data.index_select(0, index).clone(), requires_grad=bias.requires_grad)


def _remap_config_ids(config, kept: np.ndarray) -> None:
    """pad/bos/eos ids of a (generation) config to the new ids; None where the token was dropped."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(config, name, None) is not None:
            setattr(config, name, remap_id(getattr(config, name), kept))


def slice_vocabulary(model: nn.Module, kept_ids) -> None:
    """Keep only the embedding (and LM head) rows of `kept_ids`, in place: row i of the new tables is
    the original row kept_ids[i]. A tied head stays tied; config and generation config follow."""
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    kept = _as_kept(kept_ids, old_rows)
    head = model.get_output_embeddings()
    tied = head is not None and (head.weight is emb.weight or bool(getattr(model.config, "tie_word_embeddings", False)))
    index = torch.as_tensor(kept, device=emb.weight.device)
    _slice_rows(emb, index)
    emb.num_embeddings = len(kept)
    if emb.padding_idx is not None:
        emb.padding_idx = remap_id(emb.padding_idx, kept)
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            _slice_rows(head, index.to(head.weight.device))
        head.out_features = len(kept)
    configs = {id(model.config): model.config}
    if hasattr(model.config, "get_text_config"):
        configs.setdefault(id(model.config.get_text_config()), model.config.get_text_config())
    for config in configs.values():
        if getattr(config, "vocab_size", None) is not None:
            config.vocab_size = len(kept)
        _remap_config_ids(config, kept)
    for module in model.modules():
        if getattr(module, "vocab_size", None) == old_rows:
            module.vocab_size = len(kept)
    if getattr(model, "generation_config", None) is not None:
        _remap_config_ids(model.generation_config, kept)


# ---------------------------------------------------------------------------- vocabulary.json


def vocabulary_map(selection: VocabularySelection, extra: dict | None = None) -> dict:
    """The content of vocabulary.json: the original id of every new id (new id = index in
    kept_ids) and how the selection was made, so outputs can be mapped back and the cut repeated."""
    return {
        "original_vocab_size": int(selection.original_size),
        "kept_ids": [int(i) for i in selection.kept_ids],
        "forced": int(selection.forced),
        "coverage": float(selection.coverage),
        "data_tokens": int(selection.data_tokens),
        "distinct_in_data": int(selection.distinct_in_data),
        "size_requested": selection.size_requested if isinstance(selection.size_requested, float)
        else int(selection.size_requested),
        **(extra or {}),
    }


def save_vocabulary_map(folder: str | Path, selection: VocabularySelection, extra: dict | None = None) -> Path:
    """Write vocabulary.json (see `vocabulary_map`) into `folder`."""
    path = Path(folder) / VOCAB_FILE
    path.write_text(json.dumps(vocabulary_map(selection, extra), indent=1) + "\n", encoding="utf-8")
    return path


