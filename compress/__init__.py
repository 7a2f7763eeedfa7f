"""llmprune.compress: COMP-style hybrid-granularity pruning (whole layers by block influence,
then MLP neurons / query heads by a condition-aware selection, then least-squares tuning).

Score once, cut many: `calibrate` measures everything a cut needs in one streamed pass;
`prune` cuts that Calibration at a ratio (or a Plan); `compress` is the two calls."""

from __future__ import annotations

import copy
import dataclasses
import os

from torch import nn

from llmprune.checkpoint import check_output_dir, save_pruned
from llmprune.errors import LLMPruneError

from .budget import Plan
from .calibrate import Calibration, run_calibration
from .config import METHODS, SELF_CALIB_DEFAULTS, CompressConfig
from .methods import PruningMethod, get_method, register_method
from .plan import candidate_plans, cut_config, resolve_plan
from .pruner import CompressResult, InMemorySource, compress_model, prune_with
from .vocab import (
    MIN_DATA_TOKENS,
    VocabularySelection,
    rebuild_tokenizer,
    select_from_counts,
    select_vocabulary,
    slice_vocabulary,
    smallest_vocabulary,
)
from .vocab_step import cut_vocabulary

__all__ = [
    "METHODS", "MIN_DATA_TOKENS", "SELF_CALIB_DEFAULTS", "Calibration", "CompressConfig", "CompressResult", "Plan",
    "PruningMethod", "VocabularySelection", "calibrate", "candidate_plans", "check_positions", "compress",
    "compress_model", "cut_vocabulary", "get_method", "prune", "rebuild_tokenizer", "register_method",
    "resolve_plan", "save_pruned", "select_from_counts", "select_vocabulary", "slice_vocabulary",
    "smallest_vocabulary",
]

Model = nn.Module | str | os.PathLike | None


def _source(model: Model, cfg: CompressConfig, tokenizer=None, need_tokenizer: bool = True):
    """The layer source of a model argument: streamed from safetensors with low_memory, else in
    memory (a cut needs no tokenizer: the Calibration holds the token ids)."""
    if cfg.low_memory:
        if isinstance(model, nn.Module):
            raise LLMPruneError("low_memory needs a model folder spec, not a loaded model",
                                "pass the folder path, or drop low_memory")
        from .lowmem import StreamedSource

        source = StreamedSource(model, cfg)  # reads the config and tokenizer only
        if need_tokenizer:
            check_positions(cfg, source.config, source.tokenizer)
        return source
    if isinstance(model, nn.Module):
        if tokenizer is None and need_tokenizer:
            raise ValueError("pass the model's tokenizer with a loaded model")
        if need_tokenizer:
            check_positions(cfg, model.config, tokenizer)
        return InMemorySource(model, tokenizer)
    from llmprune.models import load_model, load_tokenizer, resolve_model_spec

    spec = resolve_model_spec(model)
    loaded, tok = load_model(spec), load_tokenizer(spec)  # a broken checkpoint is named first
    if need_tokenizer:
        check_positions(cfg, loaded.config, tok)  # before calibration
    return InMemorySource(loaded, tok, description=str(model))


def check_positions(cfg: CompressConfig, config, tokenizer) -> None:
    """Refuse calibration windows longer than the model's positions (max_position_embeddings):
    the model would run them, silently, past what it was trained on. A window holds
    calib_seq_len tokens plus the BOS token when the tokenizer has one."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1 or cfg.calib_seq_len is None:
        return
    bos = 1 if getattr(tokenizer, "bos_token_id", None) is not None else 0
    largest = limit - bos
    if cfg.calib_seq_len > largest:
        extra = " plus its BOS token" if bos else ""
        if largest < 1:
            raise LLMPruneError(f"the model has only {limit} positions (max_position_embeddings), too few for a"
                                " calibration window", "use a model with a longer context")
        raise LLMPruneError(
            f"--calib-seq-len {cfg.calib_seq_len} is longer than the model's {limit} positions (max_position_embeddings;"
            f" each window holds calib_seq_len tokens{extra})", f"pass --calib-seq-len {largest} or less")


def _texts(calib, source, cfg: CompressConfig) -> list[str]:
    from llmprune.data import load_texts

    if isinstance(calib, list):
        return calib
    if source.streamed:
        return load_texts(calib)
    return load_texts(calib, model=source.model, tokenizer=source.tokenizer, seed=cfg.seed,
                      self_tokens=(cfg.calib_samples + cfg.loss_windows) * cfg.calib_seq_len)


def _refuse_self_when_streamed(calib, cfg: CompressConfig) -> None:
    """Before anything is loaded: the streamed path has no whole model to generate text with."""
    if cfg.low_memory and isinstance(calib, str) and calib == "self":
        raise LLMPruneError("--low-memory cannot generate its own calibration text (that needs the whole model)",
                            "pass --calib with a text file or dataset")


def _describe(calib) -> str:
    return str(calib) if isinstance(calib, (str, os.PathLike)) else "texts"


def calibrate(model: Model, calib: str | os.PathLike | list[str] = "python-docs", config: CompressConfig | None = None, *,
              tokenizer=None, _source_obj=None) -> Calibration:
    """Score once: one streamed calibration pass over `model` (a loaded nn.Module with its
    `tokenizer`, or any spec `llmprune.load` takes; with config.low_memory a safetensors folder).
    `calib`: texts, a data spec (see `llmprune.load_texts`; default `python-docs`) or 'self'. The
    calibration size defaults to 16×256 for 'self' and 32×512 for data, as on the command line."""
    cfg = (config or CompressConfig(of="decoder")).with_calibration_defaults(calib)
    _refuse_vocabulary(cfg, "calibrate")
    _refuse_self_when_streamed(calib, cfg)
    source = _source_obj or _source(model, cfg, tokenizer)
    calibration = run_calibration(source, _texts(calib, source, cfg), cfg)
    calibration.calibration_data = _describe(calib)
    return calibration


def prune(model: Model, calibration: Calibration, plan_or_ratio: Plan | float | None = None, *,
          config: CompressConfig | None = None, tokenizer=None, out: str | os.PathLike | None = None,
          overwrite: bool = False, _source_obj=None) -> CompressResult:
    """Cut many: prune `model` (in place when it is a loaded nn.Module — pass a copy to cut again)
    by `plan_or_ratio` — a Plan, or a ratio resolved into plans from the calibration (layer_share
    'auto' keeps the candidate with the lowest calibration loss); None: the config's ratio. The
    Calibration is not changed, so it can be cut again. `config` (default: the calibration's)
    sets fit, heads, method...; with `out` the checkpoint is written there, atomically."""
    ratio = plan_or_ratio if isinstance(plan_or_ratio, (int, float)) else None
    cfg = cut_config(calibration, ratio, config)
    _refuse_vocabulary(cfg, "prune")
    _check_cut(calibration, cfg)
    if out is not None:
        check_output_dir(out, overwrite)  # fail on a bad --out before any heavy work
    source = _source_obj or _source(model, cfg, tokenizer, need_tokenizer=False)
    plans = [plan_or_ratio] if isinstance(plan_or_ratio, Plan) else candidate_plans(calibration, cfg, source.can_search)
    return prune_with(source, calibration, plans, cfg, out=out, overwrite=overwrite)


def _refuse_vocabulary(cfg: CompressConfig, name: str) -> None:
    """calibrate/prune cut the decoder (score once, cut many); a budget that also takes vocabulary
    rows ranks them on text first, which compress() does."""
    if cfg.prunes_vocabulary:
        raise LLMPruneError(f"{name}() cuts the decoder only, but this config also prunes the vocabulary "
                            f"(of='{cfg.of}', vocab={cfg.vocab!r})",
                            "pass CompressConfig(of='decoder', ...) without vocab, or call compress()")


def _check_cut(calibration: Calibration, cfg: CompressConfig) -> None:
    """Refuse a cut the calibration has not measured for, before any work."""
    streamed = calibration.stats is None
    if cfg.low_memory != streamed:
        raise LLMPruneError("this calibration was made " + ("with" if streamed else "without") + " low_memory",
                            "cut it with the same low_memory setting it was calibrated with")
    if streamed:
        return
    if cfg.prune_heads and calibration.stats[0].attn is None:
        raise LLMPruneError("this calibration has no attention statistics", "calibrate with prune_heads=True")
    if cfg.pruning_method.needs_gradients and calibration.stats[0].grads is None:
        raise LLMPruneError(f"--method {cfg.method} needs gradients this calibration has not measured",
                            f"calibrate with method='{cfg.method}'")


def compress(model: Model = None, config: CompressConfig | None = None, *, tokenizer=None,
             calib: str | os.PathLike | list[str] = "python-docs", out: str | os.PathLike | None = None,
             overwrite: bool = False) -> CompressResult:
    """Prune a model (an nn.Module with its tokenizer, or any spec `llmprune.load` takes) by
    `config.ratio` of its parameters — of the whole model by default, the vocabulary rows the
    ranking text never uses first (`of='total'`), or of the decoder layers (`of='decoder'`:
    `calibrate` then `prune`). `calib` is a data spec (see
    `llmprune.load_texts`; default `python-docs`, the Python language reference this interpreter
    carries), `'self'` (text the model generates) or a list of texts.
    With `out`, the pruned checkpoint is written there (atomically) and the result's report says where."""
    cfg = (config or CompressConfig()).with_calibration_defaults(calib)
    if out is not None:
        check_output_dir(out, overwrite)  # fail on a bad --out before any heavy work
    if cfg.low_memory and out is None:
        raise LLMPruneError("--low-memory writes the checkpoint as it goes", "pass --out")
    _refuse_self_when_streamed(calib, cfg)
    source = _source(model, cfg, tokenizer)  # shared by both calls: the model is loaded once
    if cfg.target_mb is not None:
        return _compress_to_size(source, calib, cfg, out, overwrite)
    if cfg.prunes_vocabulary:
        return _compress_with_vocabulary(source, calib, cfg, out, overwrite)
    calibration = calibrate(model, calib, cfg, _source_obj=source)
    return prune(model, calibration, config=cfg, out=out, overwrite=overwrite, _source_obj=source)


def _compress_with_vocabulary(source, calib, cfg: CompressConfig, out, overwrite: bool) -> CompressResult:
    """The decoder cut (if the budget leaves one), then the vocabulary rows and the tokenizer; the
    checkpoint is written once, at the end."""
    import time

    from llmprune.data import load_texts
    from llmprune.params import layer_shapes

    from . import vocab_step

    start = time.perf_counter()
    model, tokenizer = source.model, source.tokenizer
    calib_texts = _texts(calib, source, cfg)
    texts = load_texts(cfg.vocab_data) if cfg.vocab_data is not None else calib_texts
    plan = vocab_step.plan_vocabulary(model, tokenizer, texts, cfg)
    shapes, layer_map = layer_shapes(model), vocab_step.current_layer_map(model)
    if plan.decoder_ratio > 0:
        decoder_cfg = dataclasses.replace(cfg, ratio=plan.decoder_ratio, of="decoder", vocab=None, vocab_data=None)
        calibration = calibrate(model, calib_texts, decoder_cfg, _source_obj=source)
        calibration.calibration_data = _describe(calib)
        report = prune(model, calibration, config=decoder_cfg, _source_obj=source).report
        report["config"], report["ratio_requested"] = cfg.to_dict(), cfg.ratio
    else:
        report = vocab_step.vocabulary_only_report(model, cfg, source.description)
    return _cut_vocabulary(model, tokenizer, report, plan, texts, (shapes, layer_map), source, calib, cfg, out,
                           overwrite, start)


def _cut_vocabulary(model, tokenizer, report: dict, plan, texts: list[str], before: tuple, source, calib,
                    cfg: CompressConfig, out, overwrite: bool, start: float) -> CompressResult:
    """The vocabulary rows and the tokenizer, then the report and the checkpoint (written once)."""
    import time

    from . import vocab_step

    vocab_start = time.perf_counter()
    new_tokenizer, vocab_json = vocab_step.cut_vocabulary(model, tokenizer, plan.selection, source.description)
    vocab_step.finish_report(report, model, plan, vocab_json, texts, (tokenizer, new_tokenizer), *before,
                             time.perf_counter() - vocab_start)
    report["vocabulary"]["data"] = _describe(cfg.vocab_data if cfg.vocab_data is not None else calib)
    if cfg.target_mb is not None:
        from .target import describe_fit

        report["target"].update(describe_fit(model, new_tokenizer, cfg, report["target"]["chosen"]["keep_8bit"]))
    report["seconds"] = time.perf_counter() - start
    if out is not None:
        report["out"] = str(out)
        vocab_step.save_with_vocabulary(model, new_tokenizer, out, report, vocab_json, overwrite)
    return CompressResult(model=model, report=report, tokenizer=new_tokenizer)


def _compress_to_size(source, calib, cfg: CompressConfig, out, overwrite: bool) -> CompressResult:
    """--target-mb: the plan that fits, chosen by measured cost (compress/target.py), then the
    decoder cut it chose and its vocabulary."""
    import time

    from llmprune.data import load_texts
    from llmprune.params import layer_shapes

    from . import target, vocab_step

    start = time.perf_counter()
    model, tokenizer = source.model, source.tokenizer
    fit_texts, heldout = target.split_heldout(_texts(calib, source, cfg))
    ranking = load_texts(cfg.vocab_data) if cfg.vocab_data is not None else fit_texts
    budget = int(cfg.target_mb * target.artifact.MB)
    target.check_reachable(model, tokenizer, ranking, budget, cfg.precision)
    before = (layer_shapes(model), vocab_step.current_layer_map(model))
    decoder_cfg = dataclasses.replace(cfg, of="decoder", vocab=None, vocab_data=None, target_mb=None, precision="int4")
    calibration = None

    def cut(ratio: float):
        nonlocal calibration
        if calibration is None:
            calibration = calibrate(model, fit_texts, decoder_cfg, _source_obj=source)
            calibration.calibration_data = _describe(calib)
        result = prune(copy.deepcopy(model), calibration, ratio, config=dataclasses.replace(decoder_cfg, ratio=ratio))
        return result.model, result.report

    found = target.search(model, tokenizer, ranking, budget, cfg.precision, cut,
                          target.heldout_measure(tokenizer, heldout))
    report = found.prune_report or vocab_step.vocabulary_only_report(model, cfg, source.description)
    report["config"], report["ratio_requested"] = cfg.to_dict(), None
    report["target"] = found.describe(cfg, heldout)
    plan = vocab_step.VocabularyPlan(found.selection, found.chosen.decoder_ratio, {"of": "target-mb"})
    return _cut_vocabulary(found.model, tokenizer, report, plan, ranking, before, source, calib, cfg, out,
                           overwrite, start)
