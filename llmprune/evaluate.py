"""Perplexity under the standard protocol, computed without materialising full-vocabulary logits
for a whole window (the LM head runs over chunks of positions), with bits per byte and word
perplexity of the evaluated text, which stay comparable across tokenizers."""

from __future__ import annotations

import json
import math
import re
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .arch import base_model
from .memory import peak_rss_mb, stopwatch


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seconds: float
    tokens_per_s: float
    peak_rss_mb: float
    # Filled when perplexity() is given the tokenizer, None otherwise (see text_measures).
    bits_per_byte: float | None = None  # summed NLL / ln 2 / bytes
    bytes: int | None = None  # UTF-8 bytes of the text the predicted tokens cover
    word_perplexity: float | None = None  # exp(summed NLL / words)
    words: int | None = None  # whitespace-separated words of that text

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def window_nll(model, window: torch.Tensor, head_chunk: int = 128) -> tuple[float, int]:
    """Summed NLL of tokens 1..n of each row given the ones before, and the count of predictions."""
    hidden = base_model(model)(input_ids=window, use_cache=False).last_hidden_state[:, :-1]
    targets = window[:, 1:]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = 0.0
    for start in range(0, hidden.shape[1], head_chunk):
        logits = head(hidden[:, start : start + head_chunk]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, start : start + head_chunk].reshape(-1), reduction="sum"
        ).item()
    return total, targets.numel()


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               tokenizer=None) -> PerplexityResult:
    """exp(mean NLL) over all windows (each row: BOS + seq_len tokens); with the tokenizer that
    made the windows, also bits per byte and word perplexity of the text they cover."""
    from .errors import LLMPruneError

    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise LLMPruneError("no evaluation windows (or windows of fewer than 2 tokens)", "give more text or a smaller --seq-len")
    total, count = 0.0, 0
    with stopwatch() as clock, torch.inference_mode():
        batches = range(0, windows.shape[0], batch_size)
        for start in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
            nll, n = window_nll(model, windows[start : start + batch_size])
            total, count = total + nll, count + n
    mean = total / max(count, 1)
    n_bytes, words = text_measures(tokenizer, windows) if tokenizer is not None else (None, None)
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        tokens=count,
        windows=int(windows.shape[0]),
        seconds=clock["seconds"],
        tokens_per_s=count / clock["seconds"] if clock["seconds"] > 0 else float("inf"),
        peak_rss_mb=peak_rss_mb(),
        bits_per_byte=total / math.log(2) / n_bytes if n_bytes else None,
        bytes=n_bytes,
        word_perplexity=_exp(total / words) if words else None,
        words=words,
    )


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def text_measures(tokenizer, windows: torch.Tensor) -> tuple[int, int]:
    """UTF-8 bytes and whitespace-separated words of the text that the predicted tokens (all but
    the first of each window) cover. Words are counted on the decoded predicted ids of all windows
    joined (special tokens skipped): the protocol's windows are consecutive, so a word cut at a
    window edge counts once. Bytes come from token_byte_lengths, or from that decoded text for a
    tokenizer whose pieces it cannot read."""
    ids = windows[:, 1:].reshape(-1).cpu()
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    table = token_byte_lengths(tokenizer)
    if table is None:
        return len(text.encode("utf-8")), len(text.split())
    ids = ids.numpy()
    ids = ids[(ids >= 0) & (ids < len(table))]  # ids the tokenizer does not know add no text
    return int(table[ids].sum()), len(text.split())


_BYTE_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """UTF-8 bytes each token id adds to the text (int64, indexed by id; cached per tokenizer),
    read from the fast tokenizer's tokenizer.json. None for a kind it cannot read (slow
    tokenizers, WordPiece...): text_measures then measures the decoded text instead.

    SentencePiece-style pieces (a decoder turning ▁ into a space: Gemma, Llama-2, Mistral) count
    ▁ as one byte and a byte-fallback piece <0xNN> as one byte; byte-level BPE pieces (ByteLevel
    decoder: GPT-2, Llama-3, Qwen) one byte per character; special tokens 0 and other added tokens
    the bytes of their content. A SentencePiece tokenizer that prepends ▁ to the text
    (add_space_prefix; llama.cpp also after each user-defined piece) counts those spaces too."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    cached = _BYTE_LENGTHS.get(tokenizer)
    if cached is None or cached[0] != len(tokenizer):
        cached = (len(tokenizer), _byte_length_table(json.loads(backend.to_str())))
        _BYTE_LENGTHS[tokenizer] = cached
    return cached[1]


def _decoder_kinds(spec: dict | None) -> set[str]:
    """The decoder steps of a tokenizer.json, with a ▁ -> space Replace reported as Metaspace."""
    if not spec:
        return set()
    if spec.get("type") == "Sequence":
        return set().union(*(_decoder_kinds(d) for d in spec.get("decoders", [])))
    kinds = {spec.get("type")}
    if spec.get("type") == "Replace" and spec.get("pattern", {}).get("String") == "▁" and spec.get("content") == " ":
        kinds.add("Metaspace")
    return kinds


def _byte_length_table(spec: dict) -> np.ndarray | None:
    kinds = _decoder_kinds(spec.get("decoder"))
    vocab = spec.get("model", {}).get("vocab")
    if isinstance(vocab, list):  # Unigram: [piece, score] by id
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    if not isinstance(vocab, dict) or not kinds & {"ByteLevel", "Metaspace"}:
        return None
    if "ByteLevel" in kinds:
        spm, byte_of = False, byte_level_decoder()
        # As the ByteLevel decoder: one byte per mapped character, else the piece's own UTF-8.
        length = lambda p: len(p) if all(c in byte_of for c in p) else len(p.encode())  # noqa: E731
    else:
        spm, fallback = True, "ByteFallback" in kinds
        length = lambda p: 1 if fallback and _BYTE_PIECE.fullmatch(p) else len(p.replace("▁", " ").encode())  # noqa: E731
    added = spec.get("added_tokens") or []
    table = np.zeros(max([*vocab.values(), *(a["id"] for a in added)], default=-1) + 1, dtype=np.int64)
    for piece, i in vocab.items():
        table[i] = length(piece)
    for a in added:
        content = a["content"].replace("▁", " ") if spm else a["content"]
        table[a["id"]] = 0 if a["special"] else len(content.encode())
    return table


def byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the character byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def check_seq_len(config, seq_len: int) -> None:
    """Reject windows (BOS + seq_len) longer than the model's positions."""
    from .errors import LLMPruneError

    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len + 1 > limit:
        raise LLMPruneError(
            f"--seq-len {seq_len} is too long for this model (at most {limit - 1} tokens plus BOS)",
            f"pass --seq-len {limit - 1} or less",
        )


class zero_shot:  # noqa: N801 - a namespace for the optional lm-evaluation-harness bridge
    """Zero-shot accuracy through lm-evaluation-harness (`pip install 'llmprune[eval]'`)."""

    @staticmethod
    def require() -> None:
        from .errors import LLMPruneError

        try:
            import lm_eval  # noqa: F401
        except ImportError as exc:
            raise LLMPruneError(
                "--tasks needs lm-evaluation-harness, which is not installed", "pip install 'llmprune[eval]'"
            ) from exc

    @staticmethod
    def run(model, tokenizer, tasks: list[str], batch_size: int = 1) -> dict:
        zero_shot.require()
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=0)["results"]
        return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))} for task, metrics in results.items()}
