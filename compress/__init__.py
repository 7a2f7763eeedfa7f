"""llmprune.compress: COMP-style hybrid-granularity pruning (whole layers by block influence,
then MLP neurons / query heads by a condition-aware selection, then least-squares tuning)."""

from __future__ import annotations

import logging
import os
import platform

from torch import nn

from llmprune.checkpoint import check_output_dir, save_pruned
from .config import METHODS, CompressConfig
from .pruner import CompressResult, compress_model

log = logging.getLogger(__name__)

SELF_CALIB_DEFAULTS = {"calib_samples": 16, "calib_seq_len": 256}

__all__ = ["METHODS", "CompressConfig", "CompressResult", "compress", "compress_model", "save_pruned"]


def _versions() -> dict:
    import torch
    import transformers

    from llmprune import __version__

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def compress(model: nn.Module | str | os.PathLike | None = None, config: CompressConfig | None = None, *,
             tokenizer=None, calib: str | os.PathLike | list[str] = "self", out: str | os.PathLike | None = None,
             overwrite: bool = False) -> CompressResult:
    """Prune a model (an nn.Module with its tokenizer, or any spec `llmprune.load` takes) by
    `config.ratio` of its decoder parameters. `calib` is a data spec (see `llmprune.load_texts`),
    `'self'` (text the model generates, for offline use) or a list of texts. With `out`, the pruned
    checkpoint is written there (atomically) and the result's report says where."""
    from llmprune.data import load_texts
    from llmprune.models import load, resolve_model_spec

    config = config or CompressConfig()
    if out is not None:
        check_output_dir(out, overwrite)  # fail on a bad --out before any heavy work
    spec = None
    if config.low_memory:
        if isinstance(model, nn.Module):
            raise ValueError("low_memory needs a model folder spec, not a loaded model")
        from .lowmem import compress_low_memory

        return compress_low_memory(model, config, calib=calib, out=out, overwrite=overwrite, versions=_versions())
    if not isinstance(model, nn.Module):
        spec = model
        resolve_model_spec(spec)
        model, tokenizer = load(spec)
    if tokenizer is None:
        raise ValueError("pass the model's tokenizer with a loaded model")
    texts = calib if isinstance(calib, list) else load_texts(
        calib, model=model, tokenizer=tokenizer, seed=config.seed,
        self_tokens=(config.calib_samples + config.loss_windows) * config.calib_seq_len,
    )
    result = compress_model(model, tokenizer, texts, config)
    result.report.update(model=str(spec) if spec is not None else type(model).__name__,
                         calibration_data=str(calib) if isinstance(calib, (str, os.PathLike)) else "texts",
                         seed=config.seed, versions=_versions())
    if out is not None:
        save_pruned(model, tokenizer, out, result.report, layer_map=result.report["layer_map"], overwrite=overwrite)
        result.report["out"] = str(out)
    return result
