"""The vocabulary step of compress, and budgets stated on the whole model (`--of total`).

Bookkeeping around `compress/vocab.py`'s maths: which texts rank the tokens, how a whole-model
budget is split between vocabulary rows and the decoder, and the report. The decoder is cut first
(its calibration runs with the original tokenizer), then the vocabulary rows are sliced and the
tokenizer rebuilt; the checkpoint is written once, with vocabulary.json beside it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from llmprune.checkpoint import save_pruned
from llmprune.errors import LLMPruneError
from llmprune.memory import peak_rss_mb
from llmprune.params import layer_shapes, parameter_breakdown

from .config import CompressConfig
from .report import versions
from .vocab import (
    VOCAB_FILE,
    VocabularySelection,
    load_vocabulary_map,
    rebuild_tokenizer,
    select_vocabulary,
    slice_vocabulary,
    vocabulary_map,
)

log = logging.getLogger(__name__)

# A decoder share below this is not worth a calibration pass: the vocabulary takes the whole budget.
MIN_DECODER_RATIO = 0.005
MAX_DECODER_RATIO = 0.95


@dataclasses.dataclass
class VocabularyPlan:
    """What the vocabulary step keeps and what is left of the budget for the decoder."""

    selection: VocabularySelection
    decoder_ratio: float  # 0: the decoder is not pruned
    budget: dict | None = None  # --of total: the requested and the planned split


def row_params(model) -> int:
    """Parameters one vocabulary row costs: its embedding row, plus its LM-head row when untied."""
    params = parameter_breakdown(model)
    rows = model.get_input_embeddings().weight.shape[0]
    head = params["lm_head"] // max(model.get_output_embeddings().weight.shape[0], 1) if params["lm_head"] else 0
    return params["embeddings"] // rows + head


def plan_vocabulary(model, tokenizer, texts: list[str], cfg: CompressConfig) -> VocabularyPlan:
    """The vocabulary to keep and the decoder ratio. --of decoder: --vocab as given, --ratio for
    the decoder. --of total: ratio × all parameters; with --vocab the decoder takes the rest;
    without, the vocabulary rows the data never uses go first (they cost nothing measurable on
    it), and the decoder, where COMP's calibration loss splits layers from neurons, the rest."""
    if cfg.of == "decoder":
        return VocabularyPlan(select_vocabulary(tokenizer, texts, cfg.vocab), cfg.ratio)
    params, per_row = parameter_breakdown(model), row_params(model)
    rows = model.get_input_embeddings().weight.shape[0]
    budget = cfg.ratio * params["total"]
    if cfg.vocab is not None:
        selection = select_vocabulary(tokenizer, texts, cfg.vocab)
    else:
        selection = select_vocabulary(tokenizer, texts, 1.0)  # every id the data uses: the zero-cost cut
        by_budget = rows - int(budget // per_row)
        if by_budget >= selection.size:
            selection = select_vocabulary(tokenizer, texts, int(by_budget))
    vocab_removed = (rows - selection.size) * per_row
    decoder_ratio = (budget - vocab_removed) / params["decoder_layers"]
    _check_split(cfg, selection, vocab_removed, params, decoder_ratio)
    decoder_ratio = decoder_ratio if decoder_ratio >= MIN_DECODER_RATIO else 0.0
    split = {"of": "total", "ratio": cfg.ratio, "params": int(budget), "vocabulary_params": int(vocab_removed),
             "decoder_params": int(max(budget - vocab_removed, 0)), "decoder_ratio": decoder_ratio}
    return VocabularyPlan(selection, decoder_ratio, split)


def _check_split(cfg: CompressConfig, selection: VocabularySelection, vocab_removed: int, params: dict,
                 decoder_ratio: float) -> None:
    share = vocab_removed / params["total"]
    if decoder_ratio < -MIN_DECODER_RATIO:
        raise LLMPruneError(f"--vocab {cfg.vocab} alone removes {share:.1%} of the model, more than --ratio {cfg.ratio}"
                            " --of total", "pass a larger --vocab or --ratio, or drop --vocab to let the budget choose")
    if decoder_ratio > MAX_DECODER_RATIO:
        most = (vocab_removed + MAX_DECODER_RATIO * params["decoder_layers"]) / params["total"]
        most = math.floor(most * 100) / 100      # rounded down: the ratio suggested is one that is accepted
        raise LLMPruneError(f"--ratio {cfg.ratio} --of total would remove {decoder_ratio:.0%} of the decoder layers"
                            f" after the vocabulary ({selection.size} ids kept)", f"pass --ratio {most:.2f} or less")


def previous_map(description: str | None) -> dict | None:
    """vocabulary.json of the checkpoint being pruned, when it was pruned before (ids compose)."""
    if description and Path(description).is_dir():
        return load_vocabulary_map(description)
    return None


def cut_vocabulary(model, tokenizer, selection: VocabularySelection, description: str | None = None):
    """Slice the model's vocabulary rows (in place) and rebuild its tokenizer; returns the new
    tokenizer and the content of vocabulary.json (ids mapped to the very first vocabulary)."""
    new_tokenizer = rebuild_tokenizer(tokenizer, selection.kept_ids)
    slice_vocabulary(model, selection.kept_ids)
    content = vocabulary_map(selection)
    earlier = previous_map(description)
    if earlier is not None:
        content["original_vocab_size"] = earlier.get("original_vocab_size", content["original_vocab_size"])
        content["kept_ids"] = [int(earlier["kept_ids"][i]) for i in selection.kept_ids]
        content["pruned_before"] = len(earlier["kept_ids"])
    return new_tokenizer, content


def tokens_per_byte(tokenizer, texts: list[str]) -> float:
    """How finely a tokenizer splits the ranking text (a trimmed vocabulary splits some words more)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return sum(len(e.ids) for e in encodings) / max(n_bytes, 1)


def current_layer_map(model) -> list[int]:
    """The original index of each of the model's decoder layers (a pruned checkpoint records it)."""
    recorded = (getattr(model.config, "llmprune", None) or {}).get("layer_map")
    return list(recorded) if recorded else list(range(len(layer_shapes(model))))


def vocabulary_only_report(model, cfg: CompressConfig, description: str | None) -> dict:
    """The report's frame when the decoder is not pruned (the vocabulary step fills it in)."""
    layer_map = current_layer_map(model)
    params = parameter_breakdown(model)
    return {"method": "vocab", "config": cfg.to_dict(), "low_memory": False, "ratio_requested": cfg.ratio,
            "ratio_achieved": 0.0, "params_before": params, "params_after": params, "layers_dropped": [],
            "layer_map": layer_map, "calibration_loss": None, "seed": cfg.seed, "versions": versions(),
            "model": description, "seconds": 0.0}


def budget_shares(report: dict, shapes_before: list[dict], layer_map_before: list[int]) -> dict:
    """Parameters removed by each part: vocabulary rows, whole layers, neurons and heads."""
    before, after = report["params_before"], report["params_after"]
    vocabulary = (before["embeddings"] + before["lm_head"]) - (after["embeddings"] + after["lm_head"])
    dropped = set(report.get("layers_dropped") or [])
    layers = sum(row["params"] for row, original in zip(shapes_before, layer_map_before) if original in dropped)
    neurons = before["decoder_layers"] - after["decoder_layers"] - layers
    removed = max(before["total"] - after["total"], 1)
    parts = {"vocabulary": vocabulary, "layers": layers, "neurons": neurons}
    return {name: {"params": int(value), "share": value / removed} for name, value in parts.items()}


def finish_report(report: dict, model, plan: VocabularyPlan, vocab_json: dict, texts: list[str], tokenizers: tuple,
                  shapes_before: list[dict], layer_map_before: list[int], seconds: float) -> dict:
    """The report after the vocabulary step: parameters after, the vocabulary and the budget split."""
    report["params_after"] = parameter_breakdown(model)
    report["total_reduction"] = 1.0 - report["params_after"]["total"] / report["params_before"]["total"]
    sel = plan.selection
    report["vocabulary"] = {
        "original": int(vocab_json["original_vocab_size"]), "before": int(sel.original_size), "kept": sel.size,
        "requested": sel.size_requested, "forced": sel.forced, "coverage": sel.coverage,
        "data_tokens": sel.data_tokens, "distinct_in_data": sel.distinct_in_data,
        "tokens_per_byte_before": tokens_per_byte(tokenizers[0], texts),
        "tokens_per_byte_after": tokens_per_byte(tokenizers[1], texts), "seconds": seconds,
    }
    report["peak_rss_mb"] = peak_rss_mb()
    report["budget"] = {**(plan.budget or {"of": "decoder", "ratio": report.get("ratio_requested")}),
                        "removed": budget_shares(report, shapes_before, layer_map_before)}
    return report


def vocabulary_file(vocab_json: dict) -> dict[str, str]:
    return {VOCAB_FILE: json.dumps(vocab_json, indent=1) + "\n"}


def save_with_vocabulary(model, tokenizer, out, report: dict, vocab_json: dict, overwrite: bool) -> None:
    save_pruned(model, tokenizer, out, report, layer_map=report["layer_map"], overwrite=overwrite,
                extra_files=vocabulary_file(vocab_json))

