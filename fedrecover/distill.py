"""Distillation from a teacher (typically the dense model the checkpoint was pruned from).

The maths: the training loss `(1 - alpha) x next-token cross-entropy + alpha x T^2 x KL(teacher_T ||
student_T)` over the vocabulary, computed a vocabulary slice at a time (neither model's full logits
ever exist at once; the backward pass recomputes each slice), with the models' logit soft-capping
and a trimmed student's vocabulary map. The bookkeeping: the teacher (`Teacher`), which devices can
hold it beside their student (`teacher_mb`, `admits_teacher`), and the server's distillation step
after each aggregation (`ServerDistillation`), which costs the devices nothing."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmprune.arch import base_model
from llmprune.errors import LLMPruneError

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]
SOURCE = "source"          # --teacher source: the model the checkpoint's config.llmprune names
TEACHER_RUNTIME_MB = 30.0  # besides its weights: the teacher's forward (no grad) and its logit slices


# --- the loss ---------------------------------------------------------------------------------------

def _capped(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return torch.tanh(z / softcap) * softcap if softcap else z


@dataclass
class _Slices:
    """Where the logits of a vocabulary slice come from: the student's hidden states and head rows,
    the teacher's (already computed, no gradient) and its head rows, each model's soft cap."""

    rows: Any                   # (lo, hi) -> the student's head rows [hi - lo, hidden], float32
    teacher_hidden: torch.Tensor
    teacher_rows: Any
    vocab: int
    chunk: int
    softcap: float | None
    teacher_softcap: float | None

    def logits(self, h: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(student logits, their pre-cap values, teacher logits) of slice [lo, hi)."""
        raw = h @ self.rows(lo, hi).T
        teacher = _capped(self.teacher_hidden @ self.teacher_rows(lo, hi).T, self.teacher_softcap)
        return _capped(raw, self.softcap), raw, teacher


class _ChunkedVocabDistill(torch.autograd.Function):
    """mean over positions of (1 - a) NLL + a T^2 KL(softmax(y/T) || softmax(z/T)), z the student's
    logits, y the teacher's, both read a vocabulary slice at a time. The forward keeps three
    log-sum-exps per position (z, z/T, y/T), the target logit and the running sum
    sum_v q_v (y_v - z_v) / T, rescaled as the teacher's log-sum-exp grows; the backward recomputes
    each slice: dL/dz = (1 - a)(softmax(z) - onehot) + a T (softmax(z/T) - softmax(y/T))."""

    @staticmethod
    def forward(ctx, hidden, targets, slices: _Slices, alpha: float, temperature: float):
        h, t = hidden.float(), float(temperature)
        n = h.shape[0]
        lse = torch.full((n,), float("-inf"))
        lse_s, lse_t, cross = lse.clone(), lse.clone(), torch.zeros(n)
        target_logit = torch.zeros(n)
        for lo in range(0, slices.vocab, slices.chunk):
            hi = min(slices.vocab, lo + slices.chunk)
            z, _, y = slices.logits(h, lo, hi)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            lse_s = torch.logaddexp(lse_s, torch.logsumexp(z / t, dim=1))
            grown = torch.logaddexp(lse_t, torch.logsumexp(y / t, dim=1))
            cross = cross * torch.exp(lse_t - grown) + (torch.exp(y / t - grown[:, None]) * (y - z) / t).sum(dim=1)
            lse_t = grown
            hit = torch.nonzero((targets >= lo) & (targets < hi)).flatten()
            target_logit[hit] = z[hit, targets[hit] - lo]
        nll = lse - target_logit
        kl = cross - lse_t + lse_s
        ctx.save_for_backward(hidden, targets, lse, lse_s, lse_t)
        ctx.slices, ctx.alpha, ctx.temperature = slices, float(alpha), t
        ctx.parts = (float(nll.mean()), float(kl.mean()))
        return ((1.0 - alpha) * nll + alpha * t * t * kl).mean()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, targets, lse, lse_s, lse_t = ctx.saved_tensors
        slices, a, t = ctx.slices, ctx.alpha, ctx.temperature
        h = hidden.float()
        grad = torch.zeros_like(h)
        for lo in range(0, slices.vocab, slices.chunk):
            hi = min(slices.vocab, lo + slices.chunk)
            z, raw, y = slices.logits(h, lo, hi)
            dz = (1.0 - a) * torch.exp(z - lse[:, None])
            hit = torch.nonzero((targets >= lo) & (targets < hi)).flatten()
            dz[hit, targets[hit] - lo] -= 1.0 - a
            dz += a * t * (torch.exp(z / t - lse_s[:, None]) - torch.exp(y / t - lse_t[:, None]))
            if slices.softcap:
                dz = dz * (1.0 - torch.tanh(raw / slices.softcap) ** 2)
            grad += dz @ slices.rows(lo, hi)
        grad *= grad_out / h.shape[0]
        return grad.to(hidden.dtype), None, None, None, None


def distill_on_slices(hidden: torch.Tensor, targets: torch.Tensor, slices: _Slices, alpha: float,
                      temperature: float) -> torch.Tensor:
    """The mixed loss of flattened hidden states [positions, hidden] against `targets`."""
    return _ChunkedVocabDistill.apply(hidden, targets, slices, alpha, temperature)


# --- the teacher ------------------------------------------------------------------------------------

class Teacher:
    """A frozen teacher and how its vocabulary lines up with the student's: `kept` are the teacher's
    ids of the student's ids (a student whose vocabulary was trimmed by `compress --vocab`), None
    when the vocabularies are the same."""

    def __init__(self, model: nn.Module, kept: torch.Tensor | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.kept = kept
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    @classmethod
    def load(cls, spec: str, student_dir: str, dtype: torch.dtype = torch.float32) -> Teacher:
        import llmprune

        kept = vocabulary_link(spec, student_dir)
        return cls(llmprune.load_model(spec, dtype=dtype), kept)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The teacher's last hidden states of the windows (student ids), positions flattened."""
        ids = input_ids if self.kept is None else self.kept[input_ids]
        with torch.no_grad():
            out = base_model(self.model)(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        return out.reshape(-1, out.shape[-1]).float()

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        weight = self.model.get_output_embeddings().weight
        rows = weight[lo:hi] if self.kept is None else weight[self.kept[lo:hi]]
        return rows.float()


def distillation_loss(teacher: Teacher, alpha: float, temperature: float, vocab_chunk: int):
    """loss_fn(student, input_ids) for `train_lora`: the mixed loss of the student's next-token
    predictions, its LM head frozen (only LoRA trains)."""
    from .client_model import _head_vocab, head_rows

    def loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = base_model(model)(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        flat = hidden.reshape(-1, hidden.shape[-1])
        slices = _Slices(lambda lo, hi: head_rows(model, lo, hi, torch.float32), teacher.hidden(input_ids),
                         teacher.rows, _head_vocab(model), int(vocab_chunk),
                         getattr(model.config, "final_logit_softcapping", None), teacher.softcap)
        return distill_on_slices(flat, input_ids[:, 1:].reshape(-1), slices, alpha, temperature)

    return loss


# --- checks and memory ------------------------------------------------------------------------------

def resolve_teacher(spec: str, student_dir: str) -> str:
    """The teacher's model spec: `source` is the model the checkpoint was pruned from (its
    config.llmprune names it, else its pruning report's `model`)."""
    if spec != SOURCE:
        return spec
    from llmprune.checkpoint import REPORT_FILE

    folder = Path(student_dir)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    source = (config.get("llmprune") or {}).get("source")
    if not source and (folder / REPORT_FILE).is_file():
        report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
        source = report.get("model") if isinstance(report, dict) else None
    if not source or not isinstance(source, str):
        raise LLMPruneError(f"--teacher source: '{student_dir}' does not name the model it was pruned from",
                            "pass the dense model itself, e.g. --teacher path/to/dense-model")
    return source


def vocabulary_link(spec: str, student_dir: str) -> torch.Tensor | None:
    """The teacher's ids of the student's ids (None: the same vocabulary), or a one-line error when
    the two vocabularies cannot be lined up."""
    import llmprune
    from llmprune.checkpoint import load_vocabulary_map

    teacher_vocab = int(llmprune.load_config(spec).vocab_size)
    student_vocab = int(llmprune.load_config(student_dir).vocab_size)
    vocab_map = load_vocabulary_map(student_dir)
    if vocab_map is not None:
        kept = vocab_map["kept_ids"]
        if kept[-1] >= teacher_vocab:
            raise LLMPruneError(f"the student's vocabulary map names token {kept[-1]}, beyond the teacher's "
                                f"{teacher_vocab} tokens", "pass the model the vocabulary was trimmed from as --teacher")
        return torch.tensor(kept, dtype=torch.long)
    if teacher_vocab != student_vocab:
        raise LLMPruneError(f"the teacher has {teacher_vocab} tokens, the student {student_vocab}, and the student "
                            "has no vocabulary map (vocabulary.json)",
                            "use a teacher with the student's tokenizer, e.g. the model it was pruned from")
    return None


def teacher_mb(spec: str, dtype_bytes: int = 4) -> float:
    """Memory a teacher needs on a device beside its student: its weights in the device's dtype, its
    forward without gradients and its logit slices."""
    from .planning import meta_model

    model = meta_model(spec)
    return sum(p.numel() for p in model.parameters()) * dtype_bytes / 2**20 + TEACHER_RUNTIME_MB


def admits_teacher(memory_mb: float | None, estimate_mb: float, need_mb: float) -> bool:
    """Whether a device can hold the teacher beside what it trains: an undeclared memory is no limit."""
    return memory_mb is None or estimate_mb + need_mb <= memory_mb


def check_fits_server(spec: str, student_dir: str) -> None:
    """The teacher and the student in float32 must fit in the server's available memory."""
    from llmprune.memory import available_mb

    need = teacher_mb(spec) + teacher_mb(student_dir)
    available = available_mb()
    if available is not None and need > available:
        raise LLMPruneError(f"the teacher and the student need about {need:.0f} MB on the server, "
                            f"{available:.0f} MB are available", "use a smaller teacher, or --distill device")


# --- the server's step ------------------------------------------------------------------------------

class ServerDistillation:
    """After each aggregation, `steps` LoRA steps of the merged adapter toward the teacher on the
    server's own text: seeded by (seed, round), so a resumed run distils as the uninterrupted one."""

    def __init__(self, teacher: Teacher, windows: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                 alpha: float, temperature: float, seed: int) -> None:
        self.teacher, self.windows = teacher, windows
        self.steps, self.lr, self.batch_size, self.seed = steps, lr, batch_size, seed
        self.alpha, self.temperature = alpha, temperature

    def refine(self, model: nn.Module, arrays: Arrays, scale: float, server_round: int) -> tuple[Arrays, dict]:
        """The adapter after the server's distillation steps, and the round's notes about them."""
        from .fleet import vocab_chunk
        from .task import train_lora

        started = time.perf_counter()
        chunk = vocab_chunk(self.batch_size * (self.windows.shape[1] - 1), model.config.hidden_size)
        loss_fn = distillation_loss(self.teacher, self.alpha, self.temperature, chunk)
        seed = int(np.random.default_rng([self.seed, server_round, 7919]).integers(2**31))
        gain: dict = {}
        trained, _ = train_lora(model, arrays, self.windows, scale=scale, steps=self.steps,
                                batch_size=min(self.batch_size, self.windows.shape[0]), lr=self.lr, seed=seed,
                                loss_fn=loss_fn, gain=gain)
        trained = {k: trained[k] for k in arrays}          # the run's order of names (DP noise is drawn in it)
        return trained, {"distill_loss_before": round(gain["loss_first"], 4),
                         "distill_loss_after": round(gain["loss_last"], 4),
                         "distill_seconds": round(time.perf_counter() - started, 2)}


# --- the run's distillation -------------------------------------------------------------------------

@dataclass
class Distillation:
    """A run's distillation: the teacher's spec (resolved), what a device needs to hold it, and the
    server's step (None when only devices distil)."""

    spec: str
    alpha: float
    temperature: float
    on_devices: bool
    device_mb: float
    server: ServerDistillation | None = None
    text: str = ""                    # what the server distils on, for metrics.json

    def for_device(self, memory_mb: float | None, estimate_mb: float) -> str | None:
        """The teacher spec a device is sent (None: it trains plain LoRA)."""
        if self.on_devices and admits_teacher(memory_mb, estimate_mb, self.device_mb):
            return self.spec
        return None

    def report(self) -> dict:
        return {"teacher": self.spec, "alpha": self.alpha, "temperature": self.temperature,
                "on_devices": self.on_devices, "device_teacher_mb": round(self.device_mb, 1),
                "server_steps": self.server.steps if self.server else 0, "server_text": self.text}


def open_distillation(cfg: Any, model_dir: str, tokenizer: Any, eval_windows: torch.Tensor | None) -> Distillation | None:
    """The run's distillation from its config (None without --teacher); the server's teacher is
    loaded only when the server distils."""
    import llmprune

    d = cfg.distill
    if d.teacher is None:
        return None
    spec = resolve_teacher(d.teacher, model_dir)
    dtype_bytes = 2 if cfg.fleet.client_dtype == "bfloat16" else 4
    out = Distillation(spec, d.alpha, d.temperature, d.on_devices, teacher_mb(spec, dtype_bytes))
    if d.on_server:
        if d.data:
            windows = llmprune.token_windows(tokenizer, llmprune.load_texts(d.data), cfg.data.seq_len, d.windows)
            out.text = d.data
        elif eval_windows is not None:
            log.warning("the server distils on the evaluation text: pass --distill-data for a held-out evaluation")
            windows, out.text = eval_windows[: d.windows], "the evaluation text"
        else:
            raise LLMPruneError("--distill server needs text on the server", "pass --distill-data FILE (or --eval-data)")
        out.server = ServerDistillation(Teacher.load(spec, model_dir), windows, steps=d.steps, lr=d.lr,
                                        batch_size=cfg.training.batch_size, alpha=d.alpha,
                                        temperature=d.temperature, seed=cfg.seed)
    log.info("distilling from %s (%s)", spec, d.where)
    return out
