"""Score once: everything a cut needs from the calibration data, measured in one streamed pass.

A `Calibration` holds the block influence of every layer, the per-layer Gram statistics (absent
for `--low-memory`, which re-collects each layer's statistics while it prunes it, so that never all
layers' Grams are in memory), the error curves of the 'error' allocation, the calibration and
held-out window ids, the dense held-out loss and, for taylor, the gradients. `prune` cuts it at any
ratio without calibrating again. `save`/`load` use safetensors + JSON (never pickle)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llmprune.data import cut_windows, tokenize_stream
from llmprune.errors import LLMPruneError

from .budget import LayerBudget
from .calibration import GramCollector
from .config import CompressConfig
from .layer import LayerStats

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
CALIBRATION_TENSORS = "calibration.safetensors"

# The error curves come from a Gram estimated on the calibration tokens; with fewer than about
# four tokens per neuron it is too rank-deficient to say how much each layer can lose (measured on
# Gemma-3-270M with 8×128 tokens: the curves call half of every layer free), so the default
# allocation falls back to uniform there.
MIN_TOKENS_PER_NEURON = 4


@dataclass
class Calibration:
    """What one calibration pass measured (see the module docstring)."""

    config: CompressConfig  # the config it was made with (sizes, method, heads, selection)
    layers: list[LayerBudget]  # sizes of every decoder layer: plans resolve from these alone
    influence: list[float]  # block influence per layer
    calib_ids: torch.Tensor  # [N, L] calibration windows
    held_out_ids: torch.Tensor  # windows the calibration loss is measured on
    held_out_ok: bool  # False: the text was too short and the loss windows are calibration windows
    dense_loss: float
    layer_map: list[int]  # original index of each layer (a pruned source keeps pointing at its originals)
    stats: list[LayerStats] | None = None  # None: streamed (--low-memory), re-collected per layer
    curves: dict[int, np.ndarray] | None = None  # per-layer refit-error curves ('error' allocation)
    calibration_data: str = "texts"
    seconds: float = 0.0  # wall time of the calibration pass (a cut's report adds its own)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def save(self, folder: str | os.PathLike) -> Path:
        """calibration.json (numbers) + calibration.safetensors (tensors) in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"calib_ids": self.calib_ids.contiguous(), "held_out_ids": self.held_out_ids.contiguous()}
        counts = {}
        for i, s in enumerate(self.stats or []):
            for part, g in (("mlp", s.mlp), ("attn", s.attn)):
                if g is not None:
                    tensors[f"stats.{i}.{part}.gram"], tensors[f"stats.{i}.{part}.sum"] = g.gram, g.sum
                    counts[f"{i}.{part}"] = g.count
            for name, grad in (s.grads or {}).items():
                tensors[f"grads.{i}.{name}"] = grad.contiguous()
        for i, curve in (self.curves or {}).items():
            tensors[f"curves.{i}"] = torch.from_numpy(np.ascontiguousarray(curve))
        meta = {"format_version": 1, "config": self.config.to_dict(), "layers": [asdict(b) for b in self.layers],
                "influence": self.influence, "held_out_ok": self.held_out_ok, "dense_loss": self.dense_loss,
                "layer_map": self.layer_map, "calibration_data": self.calibration_data, "seconds": self.seconds,
                "has_stats": self.stats is not None, "counts": counts,
                "curves": None if self.curves is None else sorted(self.curves)}
        save_file(tensors, folder / CALIBRATION_TENSORS)
        (folder / CALIBRATION_FILE).write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Calibration":
        folder = Path(folder)
        if not (folder / CALIBRATION_FILE).is_file():
            raise LLMPruneError(f"no saved calibration in '{folder}'", "pass the folder Calibration.save wrote")
        meta = json.loads((folder / CALIBRATION_FILE).read_text())
        t = load_file(folder / CALIBRATION_TENSORS)
        stats = None
        if meta["has_stats"]:
            stats = [_stats_from(t, meta["counts"], i) for i in range(len(meta["layers"]))]
        curves = None if meta["curves"] is None else {int(i): t[f"curves.{i}"].numpy() for i in meta["curves"]}
        return cls(config=CompressConfig(**meta["config"]), layers=[LayerBudget(**b) for b in meta["layers"]],
                   influence=meta["influence"], calib_ids=t["calib_ids"], held_out_ids=t["held_out_ids"],
                   held_out_ok=meta["held_out_ok"], dense_loss=meta["dense_loss"], layer_map=meta["layer_map"],
                   stats=stats, curves=curves, calibration_data=meta["calibration_data"],
                   seconds=float(meta.get("seconds", 0.0)))


def _stats_from(tensors: dict, counts: dict, i: int) -> LayerStats:
    def gram(part: str) -> GramCollector | None:
        key = f"stats.{i}.{part}"
        if f"{key}.gram" not in tensors:
            return None
        return GramCollector.from_tensors(tensors[f"{key}.gram"], tensors[f"{key}.sum"], counts[f"{i}.{part}"])

    grads = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"grads.{i}.")}
    return LayerStats(mlp=gram("mlp"), attn=gram("attn"), grads=grads or None)


def calibration_windows(tokenizer, texts: list[str], cfg: CompressConfig) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """N calibration windows and the held-out windows the calibration loss is measured on
    (the next ones in the text; the first calibration windows when the text is too short)."""
    stream = tokenize_stream(tokenizer, texts)
    need = cfg.calib_samples * cfg.calib_seq_len
    if stream.numel() < need:
        raise LLMPruneError(
            f"too little calibration text: {stream.numel()} tokens for {cfg.calib_samples}×{cfg.calib_seq_len}",
            "give more text, or lower --calib-samples / --calib-seq-len",
        )
    total = cfg.calib_samples + cfg.loss_windows
    windows = cut_windows(stream[: total * cfg.calib_seq_len], cfg.calib_seq_len, None, tokenizer.bos_token_id)
    calib = windows[: cfg.calib_samples]
    held_out = windows[cfg.calib_samples :]
    if held_out.shape[0] < cfg.loss_windows:
        log.warning("calibration text has no room for held-out loss windows; measuring loss on calibration windows")
        return calib, calib[: cfg.loss_windows], False
    return calib, held_out, True


def use_error_allocation(cfg: CompressConfig, calib_tokens: int, widths: list[int], say: bool = True) -> bool:
    """Whether the neurons per layer follow the error curves (see MIN_TOKENS_PER_NEURON); `say`:
    log the fallback (once per run: calibration asks first, the plan asks again)."""
    if cfg.effective_allocation != "error":
        return False
    widest = max(widths)
    if cfg.allocation is None and calib_tokens < MIN_TOKENS_PER_NEURON * widest:
        (log.info if say else log.debug)("allocation: uniform (%d calibration tokens < %d per neuron × %d neurons; "
                 "pass --allocation error to force it)", calib_tokens, MIN_TOKENS_PER_NEURON, widest)
        return False
    return True


def run_calibration(source, texts: list[str], cfg: CompressConfig) -> Calibration:
    """The calibration pass over a layer source (in memory or streamed): windows, then the
    source's streamed statistics."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    calib, held_out, held_out_ok = calibration_windows(source.tokenizer, texts, cfg)
    budgets = [LayerBudget.of(l) for l in source.layers]
    want_curves = use_error_allocation(cfg, calib.numel(), [b.width for b in budgets])
    measured = source.calibrate(calib, held_out, cfg, want_curves)
    return Calibration(config=cfg, layers=budgets, calib_ids=calib, held_out_ids=held_out, held_out_ok=held_out_ok,
                       layer_map=source.layer_map, seconds=time.perf_counter() - start, **measured)
