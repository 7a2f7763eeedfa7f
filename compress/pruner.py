"""The compress pipeline on an in-memory model: calibrate (streamed), score layers, choose the
split between whole layers and neurons, prune every layer, tune, report."""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.arch import adapter_for, base_model
from llmprune.data import cut_windows, tokenize_stream
from llmprune.errors import LLMPruneError
from llmprune.evaluate import window_nll
from llmprune.memory import peak_rss_mb
from llmprune.params import parameter_breakdown

from .budget import Plan, layer_params, make_plan, max_droppable
from .calibration import block_influence, capture_inputs, collect_grams, run_layer
from .config import CompressConfig
from .layer import LayerStats, prune_layer
from .selection import condition_number
from .surgery import install_layers

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    model: nn.Module
    report: dict = field(default_factory=dict)


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


def lm_loss(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token NLL on windows (BOS-prefixed)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            nll, n = window_nll(model, w[None])
            total, count = total + nll, count + n
    return total / max(count, 1)


def taylor_gradients(model: nn.Module, windows: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Accumulated LM-loss gradients of every layer's projections (LLM-Pruner's importance needs
    the full backward pass: the memory-hungry reference)."""
    adapter = adapter_for(model)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for w in tqdm(windows, desc="taylor gradients", unit="window", leave=False):
            out = model(input_ids=w[None], labels=w[None], use_cache=False)
            (out.loss / windows.shape[0]).backward()
    grads = {}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        mods = {**adapter.attention_projections(layer), **adapter.mlp_projections(layer)}
        grads[i] = {name: m.weight.grad.detach().clone() for name, m in mods.items()}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(trainable[id(p)])
    return grads


def streamed_statistics(model: nn.Module, calib: torch.Tensor, cfg: CompressConfig) -> tuple[list[float], list[LayerStats]]:
    """One pass of the dense model, one layer at a time: block influence of every layer and the
    Gram statistics of its output projections' inputs."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    stream = capture_inputs(model, calib, cfg.batch_size)
    hidden = stream.hidden
    influence, stats = [], []
    for i, layer in enumerate(tqdm(layers, desc="calibrate", unit="layer", leave=False)):
        targets = {"mlp": layer.mlp.down_proj}
        if cfg.prune_heads:
            targets["attn"] = layer.self_attn.o_proj
        with collect_grams(targets) as grams:
            out = run_layer(layer, hidden, stream.layer_kwargs[i], cfg.batch_size)
        influence.append(block_influence(hidden, out))
        stats.append(LayerStats(mlp=grams["mlp"], attn=grams.get("attn")))
        hidden = out
    return influence, stats


def build_pruned_layers(model: nn.Module, plan: Plan, stats: list[LayerStats], cfg: CompressConfig,
                        fit_mode: str | None = None) -> tuple[list[nn.Module], list[int], dict[int, dict]]:
    """Pruned copies of the kept layers (the model itself is untouched)."""
    layers = adapter_for(model).decoder_layers(model)
    kept = [i for i in range(len(layers)) if i not in plan.drop]
    memo = {id(model.config): model.config}
    new_layers, rows = [], {}
    for i in kept:
        layer = copy.deepcopy(layers[i], memo=dict(memo))
        rows[i] = prune_layer(layer, stats[i], cfg, i, plan.keep_neurons.get(i), plan.keep_heads.get(i), fit_mode)
        new_layers.append(layer)
    return new_layers, kept, rows


@contextmanager
def swapped_layers(model: nn.Module, new_layers: list[nn.Module]):
    """Run the model with another decoder stack for the duration of the block."""
    base = base_model(model)
    original = base.layers
    base.layers = nn.ModuleList(new_layers)
    try:
        yield model
    finally:
        base.layers = original


# The error curves come from a Gram estimated on the calibration tokens; with fewer than about
# four tokens per neuron it is too rank-deficient to say how much each layer can lose (measured on
# Gemma-3-270M with 8×128 tokens: the curves call half of every layer free), so the default
# allocation falls back to uniform there.
MIN_TOKENS_PER_NEURON = 4


def use_error_allocation(cfg: CompressConfig, calib_tokens: int, layers) -> bool:
    if cfg.effective_allocation != "error":
        return False
    widest = max(l.mlp.down_proj.in_features for l in layers)
    if cfg.allocation is None and calib_tokens < MIN_TOKENS_PER_NEURON * widest:
        log.info("allocation: uniform (%d calibration tokens < %d per neuron × %d neurons; "
                 "pass --allocation error to force it)", calib_tokens, MIN_TOKENS_PER_NEURON, widest)
        return False
    return True


def candidate_drops(model: nn.Module, cfg: CompressConfig) -> list[int]:
    layers = adapter_for(model).decoder_layers(model)
    share = cfg.effective_layer_share
    most = max_droppable(list(layers), cfg.ratio)
    if share == "auto":
        return list(range(0, most + 1))
    per_layer = layer_params(layers[-1])
    total = sum(layer_params(l) for l in layers)
    n = int(math.floor(float(share) * cfg.ratio * total / per_layer + 1e-9))
    return [min(n, most)]


def compress_model(model: nn.Module, tokenizer, texts: list[str], cfg: CompressConfig) -> CompressResult:
    """Prune `model` in place by cfg.ratio of its decoder parameters; returns it with a report."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    adapter = adapter_for(model)
    model.eval()
    layers = list(adapter.decoder_layers(model))
    before = parameter_breakdown(model)
    calib, held_out, held_out_ok = calibration_windows(tokenizer, texts, cfg)
    dense_loss = lm_loss(model, held_out)
    log.info("dense calibration loss %.4f", dense_loss)
    grads = taylor_gradients(model, calib) if cfg.method == "taylor" else None
    influence, stats = streamed_statistics(model, calib, cfg)
    if grads is not None:
        for i, s in enumerate(stats):
            s.grads = grads[i]
    head_ratio = (cfg.head_ratio if cfg.head_ratio is not None else cfg.ratio) if cfg.prune_heads else None

    curves = None
    if use_error_allocation(cfg, calib.numel(), layers):
        curves = {i: s.pivots(layers[i].mlp.down_proj.weight.detach(), cfg.selection)[1] for i, s in enumerate(stats)}
    candidates, best, last_error = [], None, None
    for n_drop in candidate_drops(model, cfg):
        try:
            plan = make_plan(layers, influence, cfg.ratio, n_drop, head_ratio, output_bias=cfg.uses_intercept,
                             curves=curves, min_keep=cfg.min_keep)
        except LLMPruneError as exc:
            last_error = exc
            log.info("split with %d dropped layers skipped: %s", n_drop, exc)
            continue
        new_layers, kept, rows = build_pruned_layers(model, plan, stats, cfg)
        with swapped_layers(model, new_layers):
            loss = lm_loss(model, held_out)
        log.info("split: %d layers dropped %s -> calibration loss %.4f", n_drop, plan.drop, loss)
        candidates.append({"n_drop": n_drop, "plan": plan, "loss": loss})
        if best is None or loss < best["loss"]:  # only the best candidate's layers are kept in memory
            best = {**candidates[-1], "layers": new_layers, "kept": kept, "rows": rows}
        del new_layers
    if best is None:  # no split fits the budget
        raise last_error
    untuned_loss = None
    if cfg.fit_mode != "none":
        plain, _, _ = build_pruned_layers(model, best["plan"], stats, cfg, fit_mode="none")
        with swapped_layers(model, plain):
            untuned_loss = lm_loss(model, held_out)
        del plain

    layer_map = list(getattr(model.config, "llmprune", {}).get("layer_map", range(len(layers))))
    layer_rows = _layer_report(layers, best, influence, stats, layer_map, cfg)
    install_layers(model, best["layers"], best["kept"])
    after = parameter_breakdown(model)
    report = {
        "method": cfg.method,
        "config": cfg.to_dict(),
        "ratio_requested": cfg.ratio,
        "ratio_achieved": 1.0 - after["decoder_layers"] / before["decoder_layers"],
        "total_reduction": 1.0 - after["total"] / before["total"],
        "params_before": before,
        "params_after": after,
        "layers_dropped": [layer_map[i] for i in best["plan"].drop],
        "split_candidates": [
            {"layers_dropped": [layer_map[i] for i in c["plan"].drop], "calibration_loss": c["loss"]} for c in candidates
        ],
        "calibration": {
            "windows": int(calib.shape[0]), "seq_len": cfg.calib_seq_len,
            "loss_windows": int(held_out.shape[0]), "loss_held_out": held_out_ok,
        },
        "calibration_loss": {"dense": dense_loss, "pruned_before_tuning": untuned_loss, "pruned": best["loss"]},
        "layers": layer_rows,
        "layer_map": [layer_map[i] for i in best["kept"]],
        "peak_rss_mb": peak_rss_mb(),
        "seconds": time.perf_counter() - start,
    }
    return CompressResult(model=model, report=report)


def _layer_report(layers, best, influence, stats, layer_map, cfg) -> list[dict]:
    rows = []
    for i, layer in enumerate(layers):
        width = layer.mlp.down_proj.in_features
        heads = layer.self_attn.q_proj.out_features // layer.self_attn.head_dim
        row = {"original_index": layer_map[i], "block_influence": influence[i], "dropped": i in best["plan"].drop,
               "neurons_before": width, "heads_before": heads}
        if i in best["rows"]:
            r = best["rows"][i]
            new = best["layers"][best["kept"].index(i)]
            row["neurons_after"] = new.mlp.down_proj.in_features
            row["heads_after"] = new.self_attn.q_proj.out_features // new.self_attn.head_dim
            kept = r.pop("kept_neuron_indices", None)
            if kept is not None:
                row["kappa_kept"] = condition_number(stats[i].mlp.gram, layer.mlp.down_proj.weight.detach(), kept)
            row.update({k: v for k, v in r.items()})
        rows.append(row)
    return rows
