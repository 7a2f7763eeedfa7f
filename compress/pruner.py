"""The compress pipeline, one for every layer source: calibrate (score once), resolve the ratio
into plans, prune every kept layer of a plan (cut), report.

A *layer source* says where a layer's weights come from and where the pruned layer goes: the
in-memory source copies layers of a loaded model and installs the best candidate's layers; the
streamed source (`lowmem.py`, `--low-memory`) reads each layer from safetensors and writes it to
its own shard. Everything else — plans, the per-layer loop, rows, report — is here, once."""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.arch import adapter_for, base_model
from llmprune.checkpoint import carried_files, save_pruned
from llmprune.evaluate import window_nll
from llmprune.params import parameter_breakdown

from .budget import Plan
from .calibrate import Calibration, calibration_windows, run_calibration, use_error_allocation  # noqa: F401 (re-export)
from .calibration import block_influence, capture_inputs, collect_grams, run_layer
from .config import CompressConfig
from .layer import LayerStats, prune_layer
from .plan import candidate_plans, cut_config
from .report import build_report, shape_after
from .selection import condition_number
from .surgery import install_layers

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    model: nn.Module | None  # None for --low-memory (the checkpoint is on disk)
    report: dict = field(default_factory=dict)
    tokenizer: object = None  # set when the vocabulary was pruned: the rebuilt tokenizer goes with the model


# --- the shared per-layer loop -------------------------------------------------------------------

def prune_stack(layer_pass, calibration: Calibration, plan: Plan, cfg: CompressConfig, fit_mode: str | None = None,
                kappa: bool = False) -> dict[int, dict]:
    """Prune every kept layer of `plan` in order; `layer_pass` (from a layer source) hands out each
    layer with its statistics and takes the pruned layer back. Returns the report details by layer."""
    n = calibration.n_layers
    kept = [i for i in range(n) if i not in plan.drop]
    details = {}
    for i in tqdm(range(n), desc="prune", unit="layer", leave=False):
        if i in plan.drop:
            layer_pass.skip(i)
            continue
        layer, stats = layer_pass.open(i, heads=i in plan.keep_heads)
        row = prune_layer(layer, stats, cfg, i, plan.keep_neurons.get(i), plan.keep_heads.get(i), fit_mode,
                          release_stats=layer_pass.releases_stats, kappa=kappa)
        details[i] = {**shape_after(layer), **row}
        layer_pass.close(i, kept.index(i), layer)
    return details


def prune_with(source, calibration: Calibration, plans: list[Plan], cfg: CompressConfig, out=None,
               overwrite: bool = False, **extra) -> CompressResult:
    """Cut `calibration` with each candidate plan on `source`, keep the lowest calibration loss,
    write it (with `out`) and report."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    with source.output(out, overwrite) as sink:
        candidates, best = [], None
        for plan in plans:
            if not worth_another(candidates, cfg.split_patience):
                log.info("split: %d candidates in a row did not beat %d dropped layers; %d more not tried",
                         cfg.split_patience, len(best[0].drop), len(plans) - len(candidates))
                break
            layer_pass = source.open_pass(calibration, sink)
            details = prune_stack(layer_pass, calibration, plan, cfg, kappa=source.streamed)
            loss = layer_pass.loss()
            log.info("split: %d layers dropped %s -> calibration loss %.4f", len(plan.drop), plan.drop, loss)
            candidates.append((plan, loss))
            if best is None or loss < best[3]:  # only the best candidate's layers are kept in memory
                best = (plan, layer_pass, details, loss)
            del layer_pass
        plan, layer_pass, details, loss = best
        untuned = source.untuned_loss(calibration, plan, cfg) if cfg.fit_mode != "none" else None
        params_after = source.commit(calibration, plan, layer_pass, details, sink)
        report = build_report(cfg, calibration, plan, details, candidates, untuned, loss, source.params_before,
                              params_after, start, model=source.description, **extra)
        if out is not None:
            report["out"] = str(out)
        source.write(report, sink, out, overwrite, calibration, plan)
    return CompressResult(model=source.model, report=report)


def worth_another(candidates: list[tuple[Plan, float]], patience: int) -> bool:
    """Whether the split search tries its next candidate: with `patience` N > 0, not once the last N
    candidates (each one more whole layer) all failed to lower the best loss before them. Measured
    losses rise with every layer dropped (docs/benchmarks.md's compress runs, 0.1 to 0.5), so the
    later, costlier candidates would not have won."""
    if patience <= 0 or len(candidates) <= patience:
        return True
    losses = [loss for _, loss in candidates]
    best_before = min(losses[:-patience])
    return min(losses[-patience:]) < best_before


# --- the in-memory layer source ------------------------------------------------------------------

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


class InMemorySource:
    """Layers of a loaded model: each cut prunes copies, the best candidate's are installed."""

    streamed = False
    can_search = True  # candidates are cheap to try: copies in memory

    def __init__(self, model: nn.Module, tokenizer, description: str | None = None):
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.layers = list(adapter_for(model).decoder_layers(model))
        self.layer_map = list((getattr(model.config, "llmprune", None) or {}).get("layer_map", range(len(self.layers))))
        # what it was loaded from when the caller does not say (transformers records it): the card's source
        self.description = description or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.params_before = parameter_breakdown(model)

    def calibrate(self, calib: torch.Tensor, held_out: torch.Tensor, cfg: CompressConfig, want_curves: bool) -> dict:
        dense_loss = lm_loss(self.model, held_out)
        log.info("dense calibration loss %.4f", dense_loss)
        grads = taylor_gradients(self.model, calib) if cfg.pruning_method.needs_gradients else None
        influence, stats = streamed_statistics(self.model, calib, cfg)
        for i, s in enumerate(stats):
            s.grads = grads[i] if grads is not None else None
        curves = None
        if want_curves:
            curves = {i: s.pivots(self.layers[i].mlp.down_proj.weight.detach(), cfg.selection)[1]
                      for i, s in enumerate(stats)}
        return {"influence": influence, "stats": stats, "curves": curves, "dense_loss": dense_loss}

    def output(self, out, overwrite: bool):
        return nullcontext()  # written after the cut, by save_pruned

    def open_pass(self, calibration: Calibration, sink=None, fit_mode: str | None = None) -> "_CopyPass":
        return _CopyPass(self, calibration)

    def untuned_loss(self, calibration: Calibration, plan: Plan, cfg: CompressConfig) -> float:
        """The best plan without least-squares tuning, for the report."""
        plain = self.open_pass(calibration)
        prune_stack(plain, calibration, plan, cfg, fit_mode="none")
        return plain.loss()

    def commit(self, calibration: Calibration, plan: Plan, layer_pass: "_CopyPass", details: dict, sink) -> dict:
        for i, row in details.items():  # κ once, for the chosen plan only (an eigen-decomposition per layer)
            if "kept_neuron_indices" in row:
                row["kappa_kept"] = condition_number(calibration.stats[i].mlp.gram,
                                                     self.layers[i].mlp.down_proj.weight.detach(),
                                                     row["kept_neuron_indices"])
        install_layers(self.model, layer_pass.new_layers, layer_pass.kept)
        return parameter_breakdown(self.model)

    def write(self, report: dict, sink, out, overwrite: bool, calibration: Calibration, plan: Plan) -> None:
        if out is not None:
            save_pruned(self.model, self.tokenizer, out, report, layer_map=report["layer_map"], overwrite=overwrite,
                        extra_files=carried_files(self.description))


class _CopyPass:
    """One cut of an in-memory model: deep copies of its layers, statistics from the Calibration."""

    releases_stats = False  # the Calibration is cut again: keep its statistics

    def __init__(self, source: InMemorySource, calibration: Calibration):
        if calibration.stats is None:
            raise ValueError("a streamed (--low-memory) calibration has no statistics to cut in memory")
        self.source, self.calibration = source, calibration
        self.new_layers, self.kept = [], []

    def skip(self, i: int) -> None:
        pass

    def open(self, i: int, heads: bool) -> tuple[nn.Module, LayerStats]:
        config = self.source.model.config
        return copy.deepcopy(self.source.layers[i], memo={id(config): config}), self.calibration.stats[i]

    def close(self, i: int, new_index: int, layer: nn.Module) -> None:
        self.new_layers.append(layer)
        self.kept.append(i)

    def loss(self) -> float:
        with swapped_layers(self.source.model, self.new_layers):
            return lm_loss(self.source.model, self.calibration.held_out_ids)


def compress_model(model: nn.Module, tokenizer, texts: list[str], cfg: CompressConfig) -> CompressResult:
    """Prune `model` in place by cfg.ratio of its decoder parameters; returns it with a report."""
    source = InMemorySource(model, tokenizer)
    calibration = run_calibration(source, texts, cfg)
    cfg = cut_config(calibration, None, cfg)
    return prune_with(source, calibration, candidate_plans(calibration, cfg), cfg)
