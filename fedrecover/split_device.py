"""What a device does in split training, one message at a time (the maths: split.py).

A round of `steps` steps is two kinds of job per step:
- `front`: first the previous step's update, if its gradient came (the front layers run again on that
  step's windows with gradients on, the gradient from the server flows back, the optimiser steps),
  then this step's features at the first cut (no gradient kept: nothing waits on the device between
  messages), which go to the server;
- `tail`: the features at the second cut come in; the device's tail layers, final norm, head and
  loss run on its own labels, and the gradient at the second cut goes back (the tail's own LoRA, if
  the cut gives it layers, steps at once).

The LoRA weights, the optimiser's moments and the round's counters travel in `SplitJob.state` (Flower's
Context.state on the device): it alone says where training stands. The device's part of the model is
kept loaded in the process from a round's first job to its last (a device holds its layers for the
round, as MergeSFL's devices do); a process that starts per message reads it again, with the same result.
Each job measures its own peak RSS and time (an emulated slow device sleeps for its speed, as in a whole
round); the peak includes the part held in memory."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np
import torch

from llmprune.memory import current_rss_mb, reset_peak_rss, window_peak_rss_mb

from .device import _DTYPES, DeviceEmulation
from .lora import attach_lora
from .messages import TrainInstruction
from .split import Cut, embed, head_loss, run_layers, window_calls
from .task import batch_order

Arrays = dict[str, np.ndarray]
KINDS = ("front", "tail")
_LORA, _EXP_AVG, _EXP_AVG_SQ, _STEP = "lora/", "m/", "v/", "adam/"
STATS = "stats"         # loss sum, losses, first loss, last loss, seconds, peak MB (float64)


def start_state(local_arrays: Arrays) -> Arrays:
    """A round's device state from its view of the global adapter (local layer names)."""
    return {**{_LORA + k: np.asarray(v, dtype=np.float32) for k, v in local_arrays.items()},
            STATS: np.array([0.0, 0.0, np.nan, np.nan, 0.0, 0.0])}


def trained_arrays(state: Arrays) -> Arrays:
    """The device's LoRA (local names) after the round."""
    return {k[len(_LORA):]: v for k, v in state.items() if k.startswith(_LORA)}


@dataclass
class SplitJob:
    """One message's work on a device (picklable: it crosses into the job's own process)."""

    kind: str                         # front | tail
    path: str
    instruction: TrainInstruction     # its device model is the split (a Cut); local_steps, batch_size, lr, seed
    state: Arrays
    windows: torch.Tensor
    step: int                         # front: the step whose features to send (== steps: none); tail: this step
    incoming: np.ndarray | None = None   # front: the gradient at the first cut of step-1; tail: features at the second cut
    emulation: DeviceEmulation | None = None


@dataclass
class SplitResult:
    state: Arrays
    outgoing: np.ndarray | None       # front: features at the first cut; tail: their gradient at the second
    loss: float | None
    seconds: float
    peak_rss_mb: float


@dataclass
class _HeldPart:
    """The device's part of the model with LoRA attached, kept from a round's first job to its last."""

    key: tuple
    model: torch.nn.Module
    peft_model: object
    stack_mb: float             # the process's RSS before the part was read: the emulated OOM's baseline


_held: _HeldPart | None = None


def holds_part() -> bool:
    """Whether this process keeps a device's part loaded (a round is under way)."""
    return _held is not None


def release_part() -> None:
    global _held
    if _held is not None:
        from .client_model import free_model

        model, _held = _held.model, None
        free_model(model)


def _part_key(job: SplitJob) -> tuple:
    """What the loaded part depends on: the checkpoint, the device's cut and dtypes, the vocabulary."""
    config = job.instruction.to_config()
    return (job.path, *(config.get(k) for k in ("device-model", "device-model-spec", "client-dtype",
                                                 "client-embedding", "scale", "vocabulary")))


def _part(job: SplitJob) -> _HeldPart:
    """The held part for this job, read (and LoRA attached) at the round's first job; later jobs only
    load the state's LoRA weights into it."""
    global _held
    from .lora import set_lora_arrays

    key = _part_key(job)
    if _held is not None and _held.key == key:
        set_lora_arrays(_held.peft_model, trained_arrays(job.state))
        return _held
    release_part()
    instruction = job.instruction
    before = current_rss_mb()
    model = instruction.device_model.load(job.path, _DTYPES[instruction.client_dtype], instruction.client_embedding)
    _held = _HeldPart(key, model, attach_lora(model, trained_arrays(job.state), instruction.scale), before)
    return _held


def run_split_job(job: SplitJob) -> SplitResult:
    """Do the job on the device's part (read at the round's first job), measure it; the part is freed
    after the round's last job, or when the job fails."""
    from .client_model import trim_heap

    gc.collect()
    trim_heap()
    reset_peak_rss()
    started = time.perf_counter()
    try:
        part = _part(job)
        outgoing, loss, state = _work(job, job.instruction.device_model.spec, part.peft_model)
        emulation = job.emulation or DeviceEmulation()
        emulation.baseline_mb = part.stack_mb
        emulation.after_step(job.step, time.perf_counter() - started)
        peak = window_peak_rss_mb()
    except BaseException:
        release_part()
        raise
    if job.kind == "front" and job.step >= job.instruction.local_steps:     # the round's last job
        release_part()
    seconds = time.perf_counter() - started
    stats = state[STATS].copy()
    stats[4] += seconds
    stats[5] = max(stats[5], peak)
    if loss is not None:
        stats[0] += loss
        stats[1] += 1
        stats[2] = loss if np.isnan(stats[2]) else stats[2]
        stats[3] = loss
    return SplitResult({**state, STATS: stats}, outgoing, loss, seconds, peak)


def _work(job: SplitJob, cut: Cut, peft_model) -> tuple[np.ndarray | None, float | None, Arrays]:
    base = peft_model.get_base_model()
    calls = window_calls(base, job.windows.shape[1])
    params = {name: p for name, p in _named_lora(peft_model)}
    optimizer = _optimizer(params, job.state, job.instruction.lr)
    batches = batch_order(job.windows.shape[0], job.instruction.local_steps, job.instruction.batch_size,
                          job.instruction.seed)
    front = list(range(cut.front))
    tail = list(range(cut.front, len(cut.device_layers)))
    outgoing, loss = None, None
    if job.kind == "front":
        if job.incoming is not None:        # the update of the step before, now that its gradient came
            ids = job.windows[torch.from_numpy(batches[job.step - 1])]
            features = run_layers(base, embed(base, ids), front, calls)
            features.backward(torch.from_numpy(job.incoming).to(features.dtype))
            _step(optimizer, params)
        if job.step < len(batches):
            with torch.no_grad():
                ids = job.windows[torch.from_numpy(batches[job.step])]
                outgoing = run_layers(base, embed(base, ids), front, calls).float().numpy()
    else:
        ids = job.windows[torch.from_numpy(batches[job.step])]
        arriving = torch.from_numpy(job.incoming).requires_grad_(True)
        value = head_loss(base, run_layers(base, arriving, tail, calls), ids)
        value.backward()
        if tail:
            _step(optimizer, params)
        outgoing, loss = arriving.grad.float().numpy(), float(value.item())
    return outgoing, loss, _saved_state(job.state, params, optimizer)


def _named_lora(peft_model):
    """(local canonical name .A/.B, parameter) of every LoRA weight, in a fixed order."""
    from .lora import _lora_layers

    for name, module in _lora_layers(peft_model):
        yield f"{name}.A", module.lora_A["default"].weight
        yield f"{name}.B", module.lora_B["default"].weight


def _optimizer(params: dict, state: Arrays, lr: float) -> torch.optim.AdamW:
    """AdamW over the LoRA weights with the moments the state carries (as a whole round's optimiser)."""
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    for name, p in params.items():
        if _STEP + name in state:
            optimizer.state[p] = {"step": torch.tensor(float(state[_STEP + name][0])),
                                  "exp_avg": torch.from_numpy(state[_EXP_AVG + name].copy()),
                                  "exp_avg_sq": torch.from_numpy(state[_EXP_AVG_SQ + name].copy())}
    return optimizer


def _step(optimizer: torch.optim.AdamW, params: dict, max_grad_norm: float = 1.0) -> None:
    """One optimiser step on the weights that got a gradient (clipped as a whole round clips)."""
    torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _saved_state(state: Arrays, params: dict, optimizer: torch.optim.AdamW) -> Arrays:
    out = {k: v for k, v in state.items() if not k.startswith((_LORA, _EXP_AVG, _EXP_AVG_SQ, _STEP))}
    for name, p in params.items():
        out[_LORA + name] = p.detach().float().numpy().copy()
        moments = optimizer.state.get(p)
        if moments:
            out[_STEP + name] = np.array([float(moments["step"])])
            out[_EXP_AVG + name] = moments["exp_avg"].numpy().copy()
            out[_EXP_AVG_SQ + name] = moments["exp_avg_sq"].numpy().copy()
    return out


def round_stats(state: Arrays) -> dict:
    """The device's round as its reply reports it: mean, first and last loss, seconds, peak MB."""
    total, count, first, last, seconds, peak = (float(x) for x in state[STATS])
    return {"loss": total / count if count else float("nan"), "loss_first": first, "loss_last": last,
            "seconds": seconds, "peak_rss_mb": peak}
