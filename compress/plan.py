"""Cut many: a ratio resolved into Plans (dropped layers, kept neurons and heads per layer) from a
Calibration alone — no model, no calibration pass."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from llmprune.errors import LLMPruneError

from .budget import LayerBudget, Plan, make_plan, max_droppable
from .calibrate import Calibration
from .config import CompressConfig

log = logging.getLogger(__name__)

__all__ = ["Plan", "candidate_plans", "resolve_plan"]


def drop_counts(layers: list[LayerBudget], cfg: CompressConfig, can_search: bool = True) -> list[int]:
    """Whole-layer counts to try: every count that fits for 'auto' (when the source can try
    several), else the one the share asks for."""
    share = cfg.effective_layer_share
    most = max_droppable(layers, cfg.ratio)
    if share == "auto":
        if can_search:
            return list(range(0, most + 1))
        log.info("--low-memory: the auto split would need a full pruned pass per candidate; dropping no whole "
                 "layers (pass --layer-share F to drop some)")
        share = 0.0
    total = sum(l.params for l in layers)
    n = int(math.floor(float(share) * cfg.ratio * total / layers[-1].params + 1e-9))
    return [min(n, most)]


def candidate_plans(calibration: Calibration, config: CompressConfig | None = None,
                    can_search: bool = True) -> list[Plan]:
    """The plans a ratio allows, one per whole-layer count tried (several only for layer_share
    'auto'); counts whose plan does not fit are skipped, and when none fits the last reason is raised."""
    cfg = config or calibration.config
    curves = _curves_for(calibration, cfg)
    plans, last_error = [], None
    for n_drop in drop_counts(calibration.layers, cfg, can_search):
        try:
            plans.append(make_plan(calibration.layers, calibration.influence, cfg.ratio, n_drop, cfg.head_prune_ratio,
                                   output_bias=cfg.uses_intercept, curves=curves, min_keep=cfg.min_keep,
                                   uniform_multiple=cfg.uniform_multiple if cfg.uniform else None))
        except LLMPruneError as exc:
            last_error = exc
            log.info("split with %d dropped layers skipped: %s", n_drop, exc)
    if not plans:
        raise last_error
    return plans


def resolve_plan(calibration: Calibration, ratio: float | None = None, config: CompressConfig | None = None,
                 **overrides) -> Plan:
    """The plan removing `ratio` of the decoder parameters (config fields such as layer_share can be
    overridden by keyword). With layer_share 'auto' and several candidates the choice needs the
    pruned model's loss: `prune(model, calibration, ratio)` makes it."""
    cfg = cut_config(calibration, ratio, config, **overrides)
    plans = candidate_plans(calibration, cfg)
    if len(plans) > 1:
        raise LLMPruneError(f"layer_share 'auto' leaves {len(plans)} candidate plans at ratio {cfg.ratio}",
                            "pass layer_share=F, or let prune(model, calibration, ratio) pick by calibration loss")
    return plans[0]


def cut_config(calibration: Calibration, ratio: float | None = None, config: CompressConfig | None = None,
               **overrides) -> CompressConfig:
    """The config of one cut: the calibration's (or `config`), at `ratio`."""
    cfg = config or calibration.config
    if ratio is not None:
        overrides["ratio"] = ratio
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _curves_for(calibration: Calibration, cfg: CompressConfig) -> dict[int, np.ndarray] | None:
    from .calibrate import use_error_allocation

    widths = [b.width for b in calibration.layers]
    if not use_error_allocation(cfg, calibration.calib_ids.numel(), widths, say=False):
        return None
    if calibration.curves is None:
        raise LLMPruneError("this calibration has no error curves (it was made for the uniform allocation)",
                            "calibrate with allocation='error', or cut with allocation='uniform'")
    return calibration.curves
