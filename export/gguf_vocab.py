"""A Hugging Face fast tokenizer as GGUF tokenizer fields llama.cpp tokenizes with.

Two kinds are written, read from the tokenizer's own `tokenizer.json`:
- SentencePiece-style BPE (byte fallback, spaces as "▁": Gemma, Llama 2, and the llama.cpp-exact
  tokenizer llmprune builds from a GGUF): model "llama", whose merging is score-driven. A piece's
  score is minus the rank of the first merge that makes it, so llama.cpp's "merge the best-scoring
  adjacent pair" picks what the BPE's "merge the lowest-ranked pair" picks.
- byte-level BPE (GPT-2, Llama 3, Qwen): model "gpt2" with its merges and the pre-tokenizer llama.cpp
  knows by name; a split pattern it does not know is refused (llama.cpp would split text differently).
A trimmed vocabulary (compress --vocab) needs nothing special: its rebuilt tokenizer holds exactly
the kept pieces, in the kept ids' order."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llmprune.errors import LLMPruneError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split patterns of byte-level BPE pre-tokenizers, by llama.cpp's name for them.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
KNOWN_SPLITS = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}
UNKNOWN_PRE = ("re-export with a tokenizer llama.cpp knows (SentencePiece-style, or byte-level BPE with the GPT-2, "
               "Llama-3 or Qwen2 split), or export ONNX (--format onnx)")


@dataclass
class VocabFields:
    """What GGUF's tokenizer.ggml.* keys hold."""

    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)   # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False


def _steps(part: dict | None) -> list[dict]:
    """A normalizer / pre-tokenizer of tokenizer.json as a flat list of its steps."""
    if not part:
        return []
    if part.get("type") == "Sequence":
        key = "normalizers" if "normalizers" in part else "pretokenizers"
        return [s for p in part.get(key, []) for s in _steps(p)]
    return [part]


def _merge_strings(merges: list) -> list[str]:
    return [" ".join(m) if isinstance(m, list) else m for m in merges]


def _token_list(tokenizer, rows: int) -> tuple[list[str], dict[int, bool]]:
    """Tokens by id for `rows` embedding rows, and which ids are added tokens (id -> special)."""
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) and max(vocab.values()) >= rows:
        raise LLMPruneError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {rows} embedding rows",
                            "export a checkpoint whose tokenizer and model were saved together")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    for piece, idx in vocab.items():
        tokens[idx] = piece
    added = {int(i): bool(t.special) for i, t in tokenizer.added_tokens_decoder.items()}
    present = set(vocab.values())
    for i in range(rows):
        if i not in present:
            added.setdefault(i, None)  # an embedding row no token names
    return tokens, added


def _type_of(idx: int, piece: str, added: dict, unk_id, spm: bool) -> int:
    if idx == unk_id:
        return UNKNOWN
    if idx in added:
        return UNUSED if added[idx] is None else (CONTROL if added[idx] else USER_DEFINED)
    if spm and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return BYTE
    return NORMAL


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether encoding puts <bos> first / <eos> last (read off an actual encoding)."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def vocab_fields(tokenizer, rows: int) -> VocabFields:
    """The GGUF tokenizer fields of a fast tokenizer for a model with `rows` embedding rows."""
    if not getattr(tokenizer, "is_fast", False):
        raise LLMPruneError("the checkpoint's tokenizer is not a fast (tokenizer.json) tokenizer",
                            "save the tokenizer with transformers' fast tokenizer (tokenizer.json) and export again")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise LLMPruneError(f"the GGUF writer does not know {model.get('type')} tokenizers", UNKNOWN_PRE)
    normal = _steps(spec.get("normalizer"))
    spm = bool(model.get("byte_fallback")) and any(s.get("type") == "Replace" and s.get("content") == "▁"
                                                     for s in normal)
    tokens, added = _token_list(tokenizer, rows)
    unk_id = tokenizer.unk_token_id
    types = [_type_of(i, t, added, unk_id, spm) for i, t in enumerate(tokens)]
    special = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos = _adds(tokenizer)
    out = VocabFields("llama" if spm else "gpt2", tokens, types, special={k: v for k, v in special.items() if v is not None},
                      add_bos=add_bos, add_eos=add_eos)
    merges = _merge_strings(model.get("merges", []))
    if spm:
        out.scores = _scores_from_merges(tokens, merges)
        out.add_space_prefix = any(s.get("type") == "Prepend" and s.get("prepend") == "▁" for s in normal)
    else:
        out.merges, out.pre = merges, _pre_name(spec)
    return out


def _scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    """Minus the rank of each piece's first merge; pieces no merge makes score below every merge."""
    first: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        first.setdefault(left + right, rank)
    floor = -float(len(merges) + 1)
    return [-float(first[t]) if t in first else floor for t in tokens]


def _pre_name(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (tokenizer.ggml.pre)."""
    steps = _steps(spec.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    splits = [s for s in steps if s.get("type") == "Split"]
    if len(splits) == 1 and kinds[-1] == "ByteLevel" and not steps[-1].get("use_regex", True):
        pattern = splits[0].get("pattern", {}).get("Regex")
        if pattern in KNOWN_SPLITS:
            return KNOWN_SPLITS[pattern]
    raise LLMPruneError(f"llama.cpp does not know this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'})",
                        UNKNOWN_PRE)


def write_vocab(writer, fields: VocabFields) -> None:
    """Add the tokenizer.ggml.* keys to a GGUFWriter."""
    writer.add_tokenizer_model(fields.model)
    if fields.pre:
        writer.add_tokenizer_pre(fields.pre)
    writer.add_token_list(fields.tokens)
    writer.add_token_types(fields.types)
    if fields.scores is not None:
        writer.add_token_scores(fields.scores)
    if fields.merges is not None:
        writer.add_token_merges(fields.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, idx in fields.special.items():
        adders[name](int(idx))
    writer.add_add_bos_token(fields.add_bos)
    writer.add_add_eos_token(fields.add_eos)
    if fields.model == "llama":
        writer.add_add_space_prefix(fields.add_space_prefix)
