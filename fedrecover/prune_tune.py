"""Prune⇄tune (FedSpine): the maths of one server-side pruning step between federated rounds.

Every few rounds the server folds the aggregated LoRA into the global model, prunes it further
toward the target decoder ratio R with the compress pipeline on its own calibration text, and
keeps the LoRA of the surviving modules as the trainable state; the last step lands on R.

Ratios here are always *cumulative*: the fraction of the DENSE model's decoder-layer parameters
removed. compress's ratio is relative to the model it is handed (its `params_before`), so each
step converts the cumulative target into the fraction of the current model to remove
(`relative_ratio`), computed from the current model's actual size: rounding errors of earlier
steps are corrected by later ones instead of accumulating.

How exactly R is hit: compress removes whole layers and query heads exactly as planned and
rounds the rest of the budget to whole MLP neurons (round-to-nearest of remaining / neuron
params), so one cut lands within HALF of one MLP neuron's parameters (gate row + up row + down
column, 3 × hidden for Llama-style layers) of the requested count: |achieved - R| ≤ neuron / 2 /
dense (tiny test llama: 96 / 147,968 ≈ 6.5e-4; a 7B Llama: 6,144 / 6.5e9 ≈ 1e-6).

fedrecover imports only compress's public package (`llmprune.compress`), inside functions: this
module is the one place a stage runs another (docs/architecture.md)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from llmprune.errors import LLMPruneError

from .lora import merge_lora

log = logging.getLogger(__name__)

# A target this close to the checkpoint's ratio counts as reached: compress lands on a ratio only to
# whole neurons (and, with --intercept, pays for output biases), so a checkpoint pruned "at 0.4"
# reports e.g. 0.40052 (the tiny test llama; ~1e-6 off for real models), and --target-ratio 0.4 on it
# means "nothing more to prune", not an error. 0.001 of the dense decoder is too little to prune for.
RATIO_TOLERANCE = 1e-3

# CompressConfig fields a prune-tune step never takes from the checkpoint's saved config: the ratio
# and its scope are the step's own (always of the decoder: the vocabulary is not re-pruned), the
# model is in memory, the calibration size and seed are the run's. head_ratio is dropped because a
# fixed head fraction would compound step after step (0.5 twice keeps a quarter of the heads) and
# alone can exceed a small step's budget; without it the heads follow each step's relative ratio.
_STEP_OWNED = ("ratio", "of", "vocab", "vocab_data", "low_memory", "head_ratio", "seed", "calib_samples",
               "calib_seq_len", "target_mb", "precision")


def decoder_params(model: nn.Module) -> int:
    """Decoder-layer parameters, counted exactly as compress counts them ("decoder_layers")."""
    from llmprune.params import parameter_breakdown

    return int(parameter_breakdown(model)["decoder_layers"])


def dense_decoder_params(model: nn.Module, report: dict | None) -> int:
    """The dense model's decoder-layer parameters: what the checkpoint's pruning report says the
    model had before compress cut it (a recovered checkpoint keeps the report of its source, with a
    "recovery" entry added; a checkpoint written by a prune-tune step records the dense count
    itself, since its "params_before" is the model before that step), else the model's own count
    (a model compress never cut is dense)."""
    own = decoder_params(model)
    report = report if isinstance(report, dict) else {}
    dense = report.get("dense_decoder_params")
    if dense is None:
        dense = (report.get("params_before") or {}).get("decoder_layers")
    if isinstance(dense, bool) or not isinstance(dense, int) or dense <= 0:
        return own
    if dense < own:  # a report that is not this model's: trusting it would make the ratio negative
        log.warning("the pruning report's dense decoder size %d is below the model's own %d; counting the model as "
                    "dense", dense, own)
        return own
    return dense


def current_ratio(model: nn.Module, dense: int) -> float:
    """The fraction of the dense decoder parameters this model has lost."""
    return 1.0 - decoder_params(model) / dense


def prune_schedule(start_ratio: float, target: float, rounds: int, every: int) -> dict[int, float]:
    """{round before which to prune (1-based): cumulative ratio reached}. Steps come before rounds
    1, every+1, 2·every+1, ... (≤ rounds), in equal ratio increments from `start_ratio`, the last
    exactly `target`; every ≥ rounds prunes once, before round 1, then tunes. {} when the
    checkpoint is already at the target (within RATIO_TOLERANCE)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
        raise LLMPruneError(f"--target-ratio must be between 0 and 1, exclusive (got {target})",
                            "pass e.g. --target-ratio 0.5")
    if rounds < 1 or every < 1:
        raise LLMPruneError(f"prune-tune needs at least one round and --prune-every of 1 or more (got rounds {rounds}, "
                            f"every {every})", "pass --rounds 1 or more and --prune-every 1 or more")
    if math.isclose(target, start_ratio, rel_tol=0.0, abs_tol=RATIO_TOLERANCE):
        return {}
    if target < start_ratio:
        raise LLMPruneError(f"--target-ratio {target} is below the checkpoint's ratio {start_ratio:.4f} of its dense "
                            "model (pruning cannot give parameters back)",
                            f"pass --target-ratio above {start_ratio:.4f}, or drop --target-ratio to only tune")
    befores = list(range(1, rounds + 1, every))
    n = len(befores)
    schedule = {r: start_ratio + (target - start_ratio) * (i + 1) / n for i, r in enumerate(befores)}
    schedule[befores[-1]] = float(target)  # exactly, whatever the float arithmetic above gave
    return schedule


def relative_ratio(model: nn.Module, dense: int, cumulative: float) -> float:
    """The fraction of the CURRENT model's decoder parameters to remove so that it keeps
    (1 - cumulative) of the dense ones: compress's ratio is relative to the model it cuts."""
    if not 0.0 <= cumulative < 1.0:
        raise LLMPruneError(f"a cumulative ratio must be in [0, 1) (got {cumulative})", "pass e.g. 0.5")
    return 1.0 - (1.0 - cumulative) * dense / decoder_params(model)


def _split_name(key: str) -> tuple[int, str, str] | None:
    """(layer, module path, "A"/"B") of a canonical LoRA key; None for any other key."""
    head, _, part = key.rpartition(".")
    layer, _, path = head.partition(".")
    if part not in ("A", "B") or not layer.isdigit() or not path:
        return None
    return int(layer), path, part


def _checked_indices(kept, size: int, key: str) -> np.ndarray:
    index = np.asarray(kept, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= size):
        raise LLMPruneError(f"LoRA '{key}' has {size} rows/columns, the pruning report keeps index {int(index.max())}",
                            "re-map the LoRA with the report of the cut of this very model")
    return np.sort(index)


def _head_index(kept_heads, heads_before: int | None, size: int, key: str) -> np.ndarray:
    """Rows (q_proj B) or columns (o_proj A) of the kept query heads; head_dim = size / heads."""
    if not heads_before or size % heads_before:
        raise LLMPruneError(f"cannot tell the head size of LoRA '{key}' ({size} rows/columns, "
                            f"{heads_before} heads in the report)", "re-map with the report of this model's cut")
    head_dim = size // heads_before
    heads = _checked_indices(kept_heads, heads_before, key)
    return (heads[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def _remap_one(value: np.ndarray, path: str, part: str, row: dict, key: str) -> np.ndarray:
    """One kept layer's array after the cut: pruned neurons/heads leave exactly their slice."""
    module = path.rsplit(".", 1)[-1]
    neurons, heads = row.get("kept_neuron_indices"), row.get("kept_heads")
    if neurons is not None and module in ("gate_proj", "up_proj") and part == "B":
        return value[_checked_indices(neurons, value.shape[0], key)]
    if neurons is not None and module == "down_proj" and part == "A":
        return value[:, _checked_indices(neurons, value.shape[1], key)]
    if heads is not None and module == "q_proj" and part == "B":
        return value[_head_index(heads, row.get("heads_before"), value.shape[0], key)]
    if heads is not None and module == "o_proj" and part == "A":
        return value[:, _head_index(heads, row.get("heads_before"), value.shape[1], key)]
    return value.copy()  # k/v, the other side of each projection: the cut does not touch them


def remap_lora(arrays: dict[str, np.ndarray], report: dict) -> dict[str, np.ndarray]:
    """The LoRA of the surviving modules after the cut compress's `report` describes (its "layers"
    rows, one per layer of the model before the cut, in order): a dropped layer's modules are gone,
    a kept layer takes its index among the kept ones, MLP neurons keep the rows of gate/up B and the
    columns of down A of "kept_neuron_indices", query heads the rows of q B and the columns of o A
    of "kept_heads". Keys that are not canonical LoRA names are copied."""
    rows = report.get("layers")
    if not isinstance(rows, list) or not rows:
        raise LLMPruneError("the pruning report has no per-layer rows", "pass the report of a compress cut")
    kept = [i for i, row in enumerate(rows) if not row.get("dropped")]
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, value in arrays.items():
        parsed = _split_name(key)
        if parsed is None:
            out[key] = value.copy()
            continue
        layer, path, part = parsed
        if layer >= len(rows):
            raise LLMPruneError(f"LoRA '{key}' is on layer {layer}, the cut's model had {len(rows)} layers",
                                "re-map the LoRA with the report of the cut of this very model")
        if layer in new_index:
            out[f"{new_index[layer]}.{path}.{part}"] = np.ascontiguousarray(_remap_one(value, path, part, rows[layer],
                                                                                       key))
    return out


@dataclass
class PruneStep:
    """One prune-tune step, as metrics.json records it (ratios cumulative, of the dense decoder)."""

    before_round: int
    ratio_target: float
    ratio_achieved: float
    relative_ratio: float  # the fraction of the model before the step that compress was asked to remove
    layers_before: int
    layers_after: int
    decoder_params: int  # after the step
    seconds: float
    report: dict = field(default_factory=dict, repr=False)  # compress's report of the cut (for the checkpoint)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "report"}


def compress_config_for(report: dict | None, seed: int = 0, calib_samples: int | None = None,
                        calib_seq_len: int | None = None):
    """The CompressConfig of the steps: the checkpoint's saved compress config (method, fit,
    selection, prune_heads, layer_share, intercept...) when its report has one, defaults
    otherwise; the ratio, scope, seed and calibration size are the run's (see _STEP_OWNED).
    Only fields CompressConfig has are passed, so a report of another version still loads."""
    from llmprune.compress import CompressConfig

    saved = (report or {}).get("config") if isinstance(report, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    names = {f.name for f in dataclasses.fields(CompressConfig)}
    kwargs = {k: v for k, v in saved.items() if k in names and k not in _STEP_OWNED}
    kwargs["seed"], kwargs["of"] = seed, "decoder"       # a step prunes the decoder (never the vocabulary)
    kwargs["calib_samples"] = calib_samples if calib_samples is not None else saved.get("calib_samples")
    kwargs["calib_seq_len"] = calib_seq_len if calib_seq_len is not None else saved.get("calib_seq_len")
    return CompressConfig(**kwargs)


def _layers(model: nn.Module) -> int:
    from llmprune.arch import adapter_for

    return len(adapter_for(model).decoder_layers(model))


def _cut(model: nn.Module, tokenizer, texts: list[str], relative: float, compress_config) -> dict:
    """Calibrate the (merged) model on `texts` and prune it in place by `relative` of its decoder
    parameters; returns compress's report of the cut."""
    from llmprune.compress import calibrate, prune

    cfg = dataclasses.replace(compress_config, ratio=relative, of="decoder", vocab=None, vocab_data=None,
                              low_memory=False)
    calibration = calibrate(model, texts, cfg, tokenizer=tokenizer)
    return prune(model, calibration, relative, config=cfg).report


def prune_step(model: nn.Module, tokenizer, arrays: dict[str, np.ndarray], scale: float, texts: list[str],
               cumulative: float, dense: int, compress_config,
               before_round: int) -> tuple[nn.Module, dict[str, np.ndarray], PruneStep]:
    """Prune the global model (in place) to `cumulative` of the dense decoder and re-map its LoRA:
    fold the LoRA in (calibration must measure the TUNED model), cut with compress, keep the LoRA of
    the surviving modules, and take it back out of the pruned weights, so that the new base plus
    the re-mapped LoRA computes exactly the pruned merged model (up to float rounding): the base
    absorbs everything else the cut did (removed rows, the least-squares refit)."""
    from llmprune.checkpoint import record_shapes

    start = time.perf_counter()
    layers_before, relative = _layers(model), relative_ratio(model, dense, cumulative)
    if relative <= 0.0:  # an earlier step's rounding already reached this one: nothing to remove
        log.info("prune-tune before round %d: already at ratio %.4f (target %.4f)", before_round,
                 current_ratio(model, dense), cumulative)
        return model, {k: v.copy() for k, v in arrays.items()}, _step(model, dense, cumulative, 0.0, layers_before,
                                                                      before_round, start, {})
    merge_lora(model, arrays, scale)
    try:
        report = _cut(model, tokenizer, texts, relative, compress_config)
    except BaseException:
        _unmerge_after_failure(model, arrays, scale, layers_before)
        raise
    remapped = remap_lora(arrays, report)
    merge_lora(model, remapped, -scale)
    record_shapes(model, report["layer_map"])  # config.llmprune follows the cut (the next step's layer_map)
    report = {**report, "dense_decoder_params": int(dense), "ratio_of_dense": current_ratio(model, dense)}
    step = _step(model, dense, cumulative, relative, layers_before, before_round, start, report)
    log.info("prune-tune before round %d: decoder ratio %.6f (target %.6f, %.4f of the current model), layers %d -> "
             "%d", before_round, step.ratio_achieved, cumulative, relative, layers_before, step.layers_after)
    return model, remapped, step


def _unmerge_after_failure(model: nn.Module, arrays: dict[str, np.ndarray], scale: float, layers_before: int) -> None:
    """Give the caller its base back after a failed cut. compress changes the model only when it
    installs the pruned layers, its last act, so an error before leaves the shapes the LoRA was
    made for; with layers gone the indices would point at other layers, so nothing is undone."""
    try:
        if _layers(model) == layers_before:
            merge_lora(model, arrays, -scale)
            return
    except Exception:  # noqa: BLE001 (the cut's own error is the one to raise)
        pass
    log.warning("the failed prune-tune step left the model with the LoRA folded in")


def _step(model: nn.Module, dense: int, cumulative: float, relative: float, layers_before: int, before_round: int,
          start: float, report: dict) -> PruneStep:
    return PruneStep(before_round=before_round, ratio_target=float(cumulative),
                     ratio_achieved=current_ratio(model, dense), relative_ratio=float(relative),
                     layers_before=layers_before, layers_after=_layers(model), decoder_params=decoder_params(model),
                     seconds=time.perf_counter() - start, report=report)
