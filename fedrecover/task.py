"""What a client does in a round: LoRA training on its windows with a memory-lean loss, and the
perplexity the server reports. Pure functions of their inputs and seed."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llmprune.arch import base_model

from .fleet import LOSS_CHUNK
from .lora import attach_lora, detach_lora, get_lora_arrays


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(model, input_ids: torch.Tensor, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean next-token loss with the vocabulary projection run `chunk` positions at a time and
    recomputed in backward, so full-vocabulary logits (1 GB for Gemma's 262k vocabulary at
    4 x 256 tokens) never exist at once."""
    hidden = base_model(model)(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk):
        total = total + checkpoint(_chunk_nll, flat[start : start + chunk], targets[start : start + chunk], head, softcap,
                                   use_reentrant=False)
    return total / targets.numel()


def batch_order(num_windows: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Window indices per step: seeded epochs over the client's windows (no window repeats
    within an epoch)."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    order = np.concatenate([rng.permutation(num_windows) for _ in range(math.ceil(needed / num_windows))])
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train_lora(model, arrays: dict[str, np.ndarray], windows: torch.Tensor, *, scale: float, steps: int,
               batch_size: int, lr: float, seed: int, dropout: float = 0.0, max_grad_norm: float = 1.0,
               loss_fn=chunked_lm_loss, on_step=None, gain: dict | None = None,
               extra_params: tuple = (), extra_lr: float | None = None) -> tuple[dict[str, np.ndarray], float]:
    """`steps` AdamW steps of peft LoRA (started from `arrays`) on `windows`; returns the trained
    adapter and the mean training loss. The base model is left as it was. `loss_fn(model, ids)`:
    the training loss (lean clients slice the vocabulary instead of the positions).
    `on_step(step, seconds)` runs after each step (a device's memory check, emulated slowness).
    `gain`, when given, receives loss_first / loss_last: the first batch's loss before and after
    the round's training (one extra forward), what this round's training bought on fixed data.
    `extra_params` train beside the adapter (e.g. embedding rows, rows.py), at `extra_lr` (default `lr`)."""
    torch.manual_seed(seed)
    peft_model = attach_lora(model, arrays, scale, dropout)
    peft_model.train()
    adapter = [p for p in peft_model.parameters() if p.requires_grad]
    groups = [{"params": adapter}] + ([{"params": list(extra_params), "lr": extra_lr or lr}] if extra_params else [])
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    losses = []
    batches = batch_order(windows.shape[0], steps, batch_size, seed)
    try:
        for step, idx in enumerate(batches):
            started = time.perf_counter()
            loss = loss_fn(peft_model.get_base_model(), windows[torch.from_numpy(idx)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter, max_grad_norm)
            if extra_params:      # clipped apart: a large row gradient must not shrink the adapter's step
                torch.nn.utils.clip_grad_norm_(list(extra_params), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, time.perf_counter() - started)
        if gain is not None:
            with torch.no_grad():
                after = loss_fn(peft_model.get_base_model(), windows[torch.from_numpy(batches[0])]).item()
            gain.update(loss_first=losses[0], loss_last=after)
        trained = get_lora_arrays(peft_model)
    finally:
        peft_model.eval()
        detach_lora(peft_model)
    return trained, float(np.mean(losses))
