"""llama.cpp itself, where the user has it: its quantizer (K-quants, which the `gguf` package cannot
write) and its runtime (the check that a written GGUF file loads and computes what PyTorch does).

Reached through llama-cpp-python (`import llama_cpp`), which builds llama.cpp from source; the
library it loads may also be a separately built one (`LLAMA_CPP_LIB_PATH`, or
scripts/llama_cpp.sh, which builds it once into a cache). Not a dependency: without it, the f32 /
f16 / bf16 / q8_0 / q4_0 / q5_0 files are still written (by the `gguf` package) and read back,
and K-quants are refused with the way to get it."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from llmprune.errors import LLMPruneError

log = logging.getLogger(__name__)

MISSING_FIX = ("install llama-cpp-python (pip install llama-cpp-python, or bash scripts/llama_cpp.sh for a cached "
               "CPU build), or choose a type the gguf package writes: f16, bf16, q8_0, q4_0, q5_0")


def llama_cpp_module():
    """The llama_cpp package when it is installed and its library loads, else None."""
    try:
        import llama_cpp
    except Exception as exc:  # not installed, or its shared library fails to load  # noqa: BLE001
        log.debug("llama.cpp not available: %s", exc)
        return None
    return llama_cpp


def llama_cpp_version() -> str | None:
    module = llama_cpp_module()
    return getattr(module, "__version__", None) if module is not None else None


def require_quantizer(kind: str):
    """The llama_cpp module, or a one-line refusal of `--quantize kind` without it."""
    module = llama_cpp_module()
    if module is None:
        raise LLMPruneError(f"--quantize {kind} needs llama.cpp's quantizer, which is not installed", MISSING_FIX)
    return module


def quantize_file(source: Path, target: Path, kind: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer: `source` (an f32/f16 GGUF) to `target` as `kind` (e.g. q4_k_m)."""
    module = require_quantizer(kind)
    ftype = getattr(module, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        raise LLMPruneError(f"this llama.cpp ({llama_cpp_version()}) has no quantization type {kind}",
                            "choose another --quantize, or update llama-cpp-python")
    params = module.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or 0
    code = module.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0 or not target.is_file():
        raise LLMPruneError(f"llama.cpp could not quantize the GGUF file to {kind} (code {code})",
                            "run with --debug to see llama.cpp's log, or choose another --quantize")


class LlamaCppModel:
    """One GGUF file in llama.cpp: logits of token windows and greedy generation with its KV cache."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None):
        module = llama_cpp_module()
        if module is None:
            raise LLMPruneError("llama.cpp is not installed", MISSING_FIX)
        self.llm = module.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
        self.n_vocab = self.llm.n_vocab()

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits after each of `ids` (fresh cache), float64 (n, vocab)."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)

    def nll(self, windows: np.ndarray) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over windows of ids, and the count of predictions."""
        total, count = 0.0, 0
        for row in np.asarray(windows).tolist():
            logits = self.logits(row)[:-1]
            top = logits.max(axis=-1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
            total += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
            count += len(row) - 1
        return total, count

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id=None) -> tuple[list[int], float]:
        """Greedy continuation (argmax of each step's logits, one token at a time through the KV
        cache) and its decode speed in tokens/s."""
        stops = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
        self.llm.reset()
        self.llm.eval(prompt)
        tokens: list[int] = []
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            tokens.append(token)
            if token in stops:
                break
            self.llm.eval([token])
        seconds = time.perf_counter() - start
        return tokens, (len(tokens) / seconds if seconds > 0 else math.inf)

    def close(self) -> None:
        self.llm.close()
