"""Parity of an ONNX export with the PyTorch model: logits on fixed inputs, greedy generation on
prompts (through the KV cache), and perplexity on a few evaluation windows. PyTorch's side is
computed once (`TorchReference`) so the model's weights can be freed before any ONNX Runtime
session holds its own copy of them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from llmprune.evaluate import perplexity as torch_perplexity

from .runtime import OnnxCausalLM

# Logits kept per generated token of PyTorch's greedy run: enough to measure the margin of any
# token ONNX Runtime could pick instead at a near tie (one outside them is no near tie).
TOP_LOGITS = 32


def fixed_inputs(vocab_size: int, seq_len: int, bos_id: int | None, seed: int = 1234) -> torch.Tensor:
    """Two deterministic rows of token ids (BOS first when the model has one)."""
    g = torch.Generator().manual_seed(seed)
    low = min(3, vocab_size - 1)
    ids = torch.randint(low, vocab_size, (2, seq_len), generator=g)
    if bos_id is not None:
        ids[:, 0] = bos_id
    return ids


def torch_logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float().numpy()


@dataclass
class GreedyReference:
    """PyTorch's greedy continuation of one prompt and, per generated token, its largest logits."""

    prompt: list[int]
    tokens: list[int]
    top_ids: list[list[int]]
    top_logits: list[list[float]]

    def tie_gap(self, at: int, other: int) -> float | None:
        """PyTorch's logit margin of its own token over `other` at step `at` (None: `other` was
        not among its largest logits there, so no near tie; or the step was not generated)."""
        if at >= len(self.tokens) or other not in self.top_ids[at]:
            return None
        row = dict(zip(self.top_ids[at], self.top_logits[at]))
        return float(row[self.tokens[at]] - row[other])


def torch_greedy(model, ids: list[int], max_new_tokens: int, eos=None) -> GreedyReference:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos if isinstance(eos, int) else None,
                             temperature=None, top_p=None, top_k=None, output_logits=True,
                             return_dict_in_generate=True)
    tops = [torch.topk(step[0].float(), min(TOP_LOGITS, step.shape[-1])) for step in out.logits]
    return GreedyReference(list(ids), out.sequences[0, len(ids):].tolist(), [t.indices.tolist() for t in tops],
                           [t.values.tolist() for t in tops])


@dataclass
class TorchReference:
    """What the PyTorch model says on the parity inputs: logits of the fixed ids, greedy
    continuations of the prompts, perplexity (and bits per byte) of the evaluation windows."""

    ids: torch.Tensor
    logits: np.ndarray
    greedy: list[GreedyReference]
    max_new_tokens: int
    eos: object
    perplexity: float
    bits_per_byte: float | None

    @classmethod
    def build(cls, model, ids: torch.Tensor, prompts: list[list[int]], max_new_tokens: int, eos,
              windows: torch.Tensor, tokenizer=None) -> "TorchReference":
        ppl = torch_perplexity(model, windows, progress=False, tokenizer=tokenizer)
        return cls(ids, torch_logits(model, ids), [torch_greedy(model, p, max_new_tokens, eos) for p in prompts],
                   max_new_tokens, eos, ppl.perplexity, ppl.bits_per_byte)


def logit_parity(reference: TorchReference, session: OnnxCausalLM) -> dict:
    """max |logit difference| on full-sequence inputs, and on the same inputs fed as a prefix plus
    the rest through the KV cache (the decode path)."""
    ids, ref = reference.ids, reference.logits
    full, _ = session.forward(ids.numpy())
    split = ids.shape[1] // 2
    first, past = session.forward(ids[:, :split].numpy())
    rest, _ = session.forward(ids[:, split:].numpy(), past=past)
    cached = np.concatenate([first, rest], axis=1)
    scale = float(np.abs(ref).max())
    return {
        "max_abs_logit_diff": float(np.abs(full - ref).max()),
        "max_abs_logit_diff_kv_cache": float(np.abs(cached - ref).max()),
        "max_abs_logit": scale,
        "argmax_agreement": float((full.argmax(-1) == ref.argmax(-1)).mean()),
        "input_shape": list(ids.shape),
    }


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def generation_parity(reference: TorchReference, session: OnnxCausalLM) -> dict:
    """Greedy continuations by PyTorch and by ONNX Runtime (KV cache) for each prompt. Where they
    differ, `tie_gap` is PyTorch's logit margin between the two choices at the first difference
    (None when ONNX Runtime's choice was not among PyTorch's largest logits there)."""
    rows = []
    for greedy in reference.greedy:
        ref = greedy.tokens
        t0 = time.perf_counter()
        got = session.generate(greedy.prompt, reference.max_new_tokens, eos_token_id=reference.eos)
        seconds = time.perf_counter() - t0
        first_diff = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if first_diff is None and len(ref) != len(got):
            first_diff = min(len(ref), len(got))
        row = {"prompt_tokens": len(greedy.prompt), "torch": ref, "onnx": got, "equal": ref == got,
               "first_difference": first_diff, "onnx_seconds": round(seconds, 4),
               "onnx_tokens_per_s": round(len(got) / seconds, 2) if seconds > 0 else None}
        if first_diff is not None:
            row["tie_gap"] = greedy.tie_gap(first_diff, got[first_diff]) if first_diff < len(got) else None
        rows.append(row)
    return {"tokens": reference.max_new_tokens, "all_equal": all(r["equal"] for r in rows), "prompts": rows}


def perplexities(reference: TorchReference | None, session: OnnxCausalLM, windows: torch.Tensor,
                 reference_onnx: OnnxCausalLM | None = None, reference_ppl: float | None = None,
                 tokenizer=None) -> dict:
    """Perplexity of the windows under ONNX Runtime (and PyTorch's, from `reference`), and its
    change against a reference ONNX model (the fp32 one), run here or measured already
    (`reference_ppl`). Given the tokenizer that cut the windows from text, also bits per byte of
    that text (None for windows of random ids, which cover no text)."""
    result = {"windows": int(windows.shape[0]), "tokens_per_window": int(windows.shape[1] - 1)}
    if reference is not None:
        result["torch"], result["torch_bits_per_byte"] = reference.perplexity, reference.bits_per_byte
    scores = session.text_scores(windows.numpy(), tokenizer)
    result["onnx"], result["bits_per_byte"], result["bytes"] = scores["perplexity"], scores["bits_per_byte"], scores["bytes"]
    if reference_onnx is not None or reference_ppl is not None:
        result["onnx_fp32"] = reference_ppl if reference_ppl is not None else reference_onnx.perplexity(windows.numpy())
        result["change"] = result["onnx"] / result["onnx_fp32"] - 1.0
    elif "torch" in result:
        result["change_vs_torch"] = result["onnx"] / result["torch"] - 1.0
    for key, value in list(result.items()):
        if isinstance(value, float) and not math.isfinite(value):
            result[key] = None
    return result
