"""Perplexity under the standard protocol, computed without materialising full-vocabulary logits
for a whole window (the LM head runs over chunks of positions)."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """exp(mean NLL) over all windows (each row: BOS + seq_len tokens)."""
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
    return PerplexityResult(
        perplexity=math.exp(mean),
        nll=mean,
        tokens=count,
        windows=int(windows.shape[0]),
        seconds=clock["seconds"],
        tokens_per_s=count / clock["seconds"] if clock["seconds"] > 0 else float("inf"),
        peak_rss_mb=peak_rss_mb(),
    )


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
