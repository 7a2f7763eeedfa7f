"""The pruning report, built in one place for every layer source (bookkeeping only, no maths)."""

from __future__ import annotations

import platform
import time

from llmprune.memory import peak_rss_mb

from .budget import LayerBudget, Plan
from .calibrate import Calibration
from .config import CompressConfig


def versions() -> dict:
    import torch
    import transformers

    from llmprune import __version__

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def layer_rows(calibration: Calibration, plan: Plan, details: dict[int, dict]) -> list[dict]:
    """One row per layer of the model before pruning: block influence, dropped or not, kept
    neurons/heads and their indices, κ and the reconstruction errors."""
    rows = []
    for i, budget in enumerate(calibration.layers):
        row = {"original_index": calibration.layer_map[i], "block_influence": calibration.influence[i],
               "dropped": i in plan.drop, "neurons_before": budget.width, "heads_before": budget.heads}
        if i in details:
            row.update(details[i])
            if "kept_neuron_indices" in row:
                row["kept_neuron_indices"] = [int(k) for k in row["kept_neuron_indices"]]
        rows.append(row)
    return rows


def build_report(cfg: CompressConfig, calibration: Calibration, plan: Plan, details: dict[int, dict],
                 candidates: list[tuple[Plan, float]], untuned_loss: float | None, loss: float,
                 params_before: dict, params_after: dict, start: float, **extra) -> dict:
    """The report of one cut (`extra`: model, calibration data, out...)."""
    layer_map = calibration.layer_map
    kept = [i for i in range(calibration.n_layers) if i not in plan.drop]
    report = {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "low_memory": cfg.low_memory,
        "ratio_requested": cfg.ratio,
        "ratio_achieved": 1.0 - params_after["decoder_layers"] / params_before["decoder_layers"],
        "total_reduction": 1.0 - params_after["total"] / params_before["total"],
        "params_before": params_before,
        "params_after": params_after,
        "layers_dropped": [layer_map[i] for i in plan.drop],
        "split_candidates": [{"layers_dropped": [layer_map[i] for i in p.drop], "calibration_loss": l}
                             for p, l in candidates],
        "calibration": {"windows": int(calibration.calib_ids.shape[0]), "seq_len": calibration.config.calib_seq_len,
                        "loss_windows": int(calibration.held_out_ids.shape[0]),
                        "loss_held_out": calibration.held_out_ok},
        "calibration_loss": {"dense": calibration.dense_loss, "pruned_before_tuning": untuned_loss, "pruned": loss},
        "layers": layer_rows(calibration, plan, details),
        "layer_map": [layer_map[i] for i in kept],
        "calibration_data": calibration.calibration_data,
        "seed": cfg.seed,
        "versions": versions(),
    }
    report.update(extra)
    report["peak_rss_mb"] = peak_rss_mb()
    # seconds: the whole compress (calibration + this cut), as before the split into two calls
    report["prune_seconds"] = time.perf_counter() - start
    report["calibration_seconds"] = calibration.seconds
    report["seconds"] = calibration.seconds + report["prune_seconds"]
    return report


def shape_after(layer) -> dict:
    """Kept neurons and heads of a pruned layer, for its report row."""
    b = LayerBudget.of(layer)
    return {"neurons_after": b.width, "heads_after": b.heads}
