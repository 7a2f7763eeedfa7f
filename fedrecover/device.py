"""What a device does in a round, apart from Flower: load what the instruction says (the checkpoint,
or a registered device model in the lean dtypes), train LoRA on its windows, measure its memory.

In a simulation every device's round runs in a fresh process of its own (round_server.py: forked
from a clean server that imported the training stack once), so its measured peak is that device's
alone, never what the device simulated before it in the same worker left behind; on a real fleet a
device is its own process and trains in it, keeping the model between rounds."""

from __future__ import annotations

import gc
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmprune.memory import current_rss_mb, reset_peak_rss, window_peak_rss_mb

from .messages import TrainInstruction
from .rows import TrainableRows, set_rows, split_rows, token_counts
from .task import train_lora

Arrays = dict[str, np.ndarray]
# What an emulated device's process needs besides the model (Python, torch, transformers, peft,
# flwr): a fresh ray worker's RSS before its first load, measured 395 MB (bench/submodels.py).
EMULATED_RUNTIME_MB = 400.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class DeviceEmulation:
    """Simulation only (--emulate-speed): what makes a simulated client behave like its fleet
    entry's device. A device of speed s < 1 sleeps (1/s - 1) x each step's time, as a slower
    processor would take; a device with oom_mb (its true memory, never told to the server) fails
    with MemoryError once its model's measured memory plus the runtime's passes it, as the OS
    would kill it."""

    def __init__(self, speed: float = 1.0, oom_mb: float | None = None, baseline_mb: float = 0.0) -> None:
        self.speed, self.oom_mb, self.baseline_mb = speed, oom_mb, baseline_mb

    def after_step(self, step: int, seconds: float) -> None:
        used = window_peak_rss_mb() - self.baseline_mb + EMULATED_RUNTIME_MB
        if self.oom_mb is not None and used > self.oom_mb:
            raise MemoryError(f"out of memory: training needed {used:.0f} MB at step {step + 1}, "
                              f"the device has {self.oom_mb:.0f} MB")
        if self.speed < 1.0:
            time.sleep(seconds * (1.0 / self.speed - 1.0))


@dataclass
class RoundJob:
    """Everything one device round needs (picklable: it crosses into the round's own process)."""

    path: str
    instruction: TrainInstruction
    arrays: Arrays
    windows: torch.Tensor
    dropout: float = 0.0
    emulation: DeviceEmulation | None = None
    teacher: str | None = None        # the teacher's model spec on this device (the instruction says when)


@dataclass
class RoundResult:
    trained: Arrays
    loss: float
    memory: dict                      # peak-rss-mb, model-rss-mb, loss-first, loss-last


def train_options(instruction: TrainInstruction, dropout: float) -> dict:
    return {"scale": instruction.scale, "steps": instruction.local_steps, "batch_size": instruction.batch_size,
            "lr": instruction.lr, "seed": instruction.seed, "dropout": dropout}


def run_round(job: RoundJob, models: Any = None) -> RoundResult:
    """One device round in this process. `models` (a ModelCache) keeps the whole model between
    rounds (a fleet device); without it the model is loaded for this round."""
    if job.instruction.device_model is not None:
        return _lean_round(job)
    emulation = job.emulation or DeviceEmulation()
    before = current_rss_mb() if models is None else models.rss_before_first_load(job.path)
    kept = job.instruction.kept_ids
    model = models.get(job.path, kept) if models is not None else _load(job.path, kept)
    teacher = _teacher(job, torch.float32, models)
    reset_peak_rss()  # measure training, not the load (which briefly holds two copies)
    emulation.baseline_mb = before
    gain: dict = {}
    options = train_options(job.instruction, job.dropout)
    loss_fn = _loss_fn(job, model, teacher, options["batch_size"])
    arrays, rows = split_rows(job.arrays)
    set_rows(model, rows)           # the rows changed so far (a kept model already has the older ones)
    trainable = _trainable_rows(job, model, options)
    with trainable or nullcontext():
        trained, loss = train_lora(model, arrays, job.windows, **options, on_step=emulation.after_step, gain=gain,
                                   extra_params=(trainable.delta,) if trainable else (),
                                   extra_lr=job.instruction.rows_lr or None,
                                   **({"loss_fn": loss_fn} if loss_fn is not None else {}))
    if trainable is not None:
        trained.update(trainable.reply())
    peak = window_peak_rss_mb()
    return RoundResult(trained, loss, {"peak-rss-mb": peak, "model-rss-mb": peak - before,
                                       "loss-first": gain["loss_first"], "loss-last": gain["loss_last"]})


def _trainable_rows(job: RoundJob, model, options: dict) -> TrainableRows | None:
    """With --train-rows, a delta on the rows of the tokens this round's batches hold."""
    if not job.instruction.train_rows:
        return None
    from .task import batch_order

    used = np.unique(np.concatenate(batch_order(job.windows.shape[0], options["steps"], options["batch_size"],
                                                options["seed"])))
    return TrainableRows(model, *token_counts(job.windows[torch.from_numpy(used)]))


def _teacher(job: RoundJob, dtype: torch.dtype, models: Any = None):
    """The round's teacher when the instruction asks for one (kept between rounds on a fleet device)."""
    if job.instruction.teacher is None:
        return None
    from .distill import Teacher

    spec = job.teacher or job.instruction.teacher
    if models is not None:
        return models.teacher(spec, job.path, dtype)
    return Teacher.load(spec, job.path, dtype)


def _loss_fn(job: RoundJob, model, teacher, batch_size: int, lean: bool = False):
    """The round's loss: with a teacher, next-token loss mixed with KL to it (a vocabulary slice at
    a time); else the lean vocabulary-sliced loss, or None (train_lora's position-chunked default)."""
    from .fleet import vocab_chunk

    chunk = vocab_chunk(batch_size * (job.windows.shape[1] - 1), model.config.hidden_size)
    if teacher is not None:
        from .distill import distillation_loss

        return distillation_loss(teacher, job.instruction.distill_alpha, job.instruction.distill_temperature, chunk)
    if lean:
        from .client_model import chunked_vocab_loss

        return lambda m, ids: chunked_vocab_loss(m, ids, vocab_chunk=chunk)
    return None


def _load(path: str, kept_ids: np.ndarray | None = None):
    """The checkpoint, cut to the fleet's vocabulary when the run chose one."""
    import llmprune

    model = llmprune.load_model(path)
    model.eval()
    if kept_ids is not None:
        from .fleet_vocab import trim_model

        trim_model(model, kept_ids)
    return model


def _lean_round(job: RoundJob) -> RoundResult:
    """Load only the device model of this round (held layers and blocks, or a stage's fused layers;
    base weights in client-dtype, the vocabulary table as asked), train LoRA on it with the
    vocabulary-sliced loss, free it. The peak counts the load; the model-dependent part is the
    peak minus the RSS just before the load."""
    from .client_model import free_model, trim_heap

    instruction = job.instruction
    held = instruction.device_model.held()
    options = train_options(instruction, job.dropout)
    gc.collect()
    trim_heap()             # what the last round freed goes back to the OS before the baseline is read
    before = current_rss_mb()
    reset_peak_rss()
    model = instruction.device_model.load(job.path, _DTYPES[instruction.client_dtype], instruction.client_embedding)
    teacher = _teacher(job, _DTYPES[instruction.client_dtype])
    emulation = job.emulation or DeviceEmulation()
    emulation.baseline_mb = before
    gain: dict = {}
    try:
        trained, loss = train_lora(model, held.to_local(job.arrays), job.windows, **options,
                                   on_step=emulation.after_step, gain=gain,
                                   loss_fn=_loss_fn(job, model, teacher, options["batch_size"], lean=True))
    finally:
        peak = window_peak_rss_mb()
        free_model(model)
        if teacher is not None:
            free_model(teacher.model)
        del model, teacher
    return RoundResult(held.to_global(trained), loss, {"peak-rss-mb": peak, "model-rss-mb": peak - before,
                                                       "loss-first": gain["loss_first"],
                                                       "loss-last": gain["loss_last"]})


class ModelCache:
    """A fleet device's whole model, kept between rounds (at most two checkpoints), and the RSS of
    the process before its first load: what the model-dependent part of a peak is measured from."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.teachers: dict[tuple, Any] = {}
        self.before: float | None = None

    def rss_before_first_load(self, path: str) -> float:
        if self.before is None:
            self.before = current_rss_mb()
        return self.before

    def teacher(self, spec: str, student: str, dtype: torch.dtype):
        from .distill import Teacher

        key = (spec, student, dtype)
        if key not in self.teachers:
            self.teachers = {key: Teacher.load(spec, student, dtype)}
        return self.teachers[key]

    def get(self, path: str, kept_ids: np.ndarray | None = None):
        key = (path, None if kept_ids is None else kept_ids.tobytes())
        if key not in self.models:
            if len(self.models) >= 2:
                self.models.pop(next(iter(self.models)))
            self.models[key] = _load(path, kept_ids)
        return self.models[key]
