"""`compress --target-mb M`: the plan whose exported artifact fits in M megabytes, chosen by
measured cost rather than by a fixed order.

Three things shrink an artifact: vocabulary rows (each costs the bytes of its table row; dropping
it splits the text that used it into pieces the model never saw), the decoder (COMP's cut: whole
layers and neurons, split by calibration loss) and, at int4, how many MatMuls keep 8 bits (export's
--keep-8bit: the MLP and v_proj by default, down_proj and v_proj alone in the lean layout). For each
decoder ratio on a grid and each layout the plan keeps the most vocabulary rows that still fit (the
size predicted by `llmprune.artifact`, the tokenizer files rebuilt and measured), then measures the
candidate — the cut model with that vocabulary, its weights rounded as the export will store them
(`llmprune.quant_sim`) — in bits per byte of held-out text (the tail of the calibration text, never
calibrated on, so tokenizers compare). The candidate with the fewest bits per byte wins. Larger
cuts are not tried once the decoder cut alone costs more than the best candidate: a smaller
vocabulary only adds.

Bookkeeping (the held-out split, the search, the report) is here; the cut is `prune`, the
vocabulary's maths `vocab.py`, the sizes `llmprune/artifact.py`."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

from llmprune import artifact
from llmprune.errors import LLMPruneError

from .vocab import rebuild_tokenizer, select_vocabulary, slice_vocabulary

log = logging.getLogger(__name__)

DECODER_STEPS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)   # decoder ratios tried, smallest first
HELDOUT_CHARS = 12_000                          # the calibration text's tail the plan is measured on
HELDOUT_SEQ_LEN = 256
MIN_CHARS = 10_000                              # calibration text --target-mb needs (a fifth at most held out)


@dataclass
class Candidate:
    """One plan tried: a decoder ratio, the vocabulary that fits beside it, and what it measured."""

    decoder_ratio: float
    keep_8bit: list[str] = field(default_factory=lambda: list(artifact.WIDE))   # the export's layout
    vocab: int | None = None            # ids kept (None: the plan cannot fit at this ratio)
    predicted_bytes: int | None = None
    heldout_bpb: float | None = None    # bits per byte of the held-out text, this vocabulary
    decoder_only_bpb: float | None = None  # the cut with the whole vocabulary
    stopped: bool = False               # the cut alone cost more than the best plan: not completed
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TargetResult:
    chosen: Candidate
    model: object                       # the decoder-cut model of the chosen plan (vocabulary not cut yet)
    prune_report: dict | None           # prune's report for that cut (None: decoder untouched)
    selection: object                   # the VocabularySelection that fits beside it
    candidates: list[Candidate] = field(default_factory=list)
    dense_bpb: float = math.nan

    def describe(self, cfg, heldout: str) -> dict:
        """The report's `target` entry (the predicted sizes are added once the vocabulary is cut)."""
        return {"mb": cfg.target_mb, "precision": cfg.precision, "bytes": int(cfg.target_mb * artifact.MB),
                "chosen": self.chosen.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
                "heldout": {"characters": len(heldout), "seq_len": HELDOUT_SEQ_LEN, "dense_bpb": self.dense_bpb},
                "decoder_steps": list(DECODER_STEPS)}


def describe_fit(model, tokenizer, cfg, keep_8bit: list[str] | None = None) -> dict:
    """The artifact predicted for the finished model, and whether it fits the budget."""
    wide = tuple(keep_8bit) if keep_8bit is not None else artifact.WIDE
    predicted = artifact.predict_bytes(model, tokenizer, cfg.precision, wide=wide)
    command = "llmprune export" + ("" if cfg.precision == "fp32" else f" --quantize {cfg.precision}")
    if cfg.precision == "int4":
        command = " ".join([command, *artifact.keep_8bit_flags(wide)])
    return {"predicted": predicted, "fits": predicted["total"] <= int(cfg.target_mb * artifact.MB), "export": command}


def split_heldout(texts: list[str], chars: int = HELDOUT_CHARS) -> tuple[list[str], str]:
    """(the texts to calibrate and rank on, the held-out tail): the last `chars` characters of the
    texts taken together, cut at a line break when there is one."""
    total = sum(len(t) for t in texts)
    if total < MIN_CHARS:
        raise LLMPruneError(f"--target-mb measures its plan on held-out calibration text, but the calibration text "
                            f"has {total:,} characters (at least {MIN_CHARS:,} needed)",
                            "pass more --calib text, or use --ratio")
    kept, tail, need = list(texts), [], min(chars, total // 5)
    while need > 0:
        last = kept.pop()
        if len(last) <= need:
            tail.insert(0, last)
            need -= len(last)
            continue
        cut = last.rfind("\n", 0, len(last) - need)
        cut = cut if cut > 0 else len(last) - need
        kept.append(last[:cut])
        tail.insert(0, last[cut:])
        need = 0
    return kept, "\n".join(tail)


def heldout_bpb(model, tokenizer, text: str) -> float:
    """Bits per byte of `text` under (model, tokenizer): every window of the text, so two
    tokenizers cover the same bytes."""
    from llmprune.data import token_windows
    from llmprune.evaluate import perplexity

    windows = token_windows(tokenizer, [text], HELDOUT_SEQ_LEN)
    return perplexity(model, windows, batch_size=4, progress=False, tokenizer=tokenizer).bits_per_byte


def fitting_vocabulary(model, tokenizer, texts: list[str], budget: int, precision: str,
                       floor: int | None = None, wide: tuple[str, ...] | None = None) -> tuple | None:
    """The most vocabulary ids (ranked on `texts`) with which `model` fits `budget` bytes at
    `precision` (`wide`: the MatMuls kept at 8 bits): (selection, rebuilt tokenizer, predicted
    bytes), or None when even the smallest vocabulary does not fit. The weights give the first
    guess; the tokenizer files, rebuilt and measured, move it down until it fits, then up by the
    room left."""
    rows = model.get_input_embeddings().weight.shape[0]
    per_row = artifact.row_bytes(model, precision)
    full = artifact.weight_bytes(model, precision, wide=wide) + artifact.graph_bytes(model, precision)
    files_full = artifact.files_bytes(model, tokenizer)
    floor = minimum_vocabulary(tokenizer, texts) if floor is None else floor
    size = min(rows, int((budget - full + rows * per_row - files_full * 0.1) // per_row))
    best = None
    for _ in range(8):
        if size < floor:
            break
        selection = select_vocabulary(tokenizer, texts, int(size))
        new_tok = rebuild_tokenizer(tokenizer, selection.kept_ids) if selection.size < rows else tokenizer
        predicted = int(full - (rows - selection.size) * per_row + _files_bytes_at(model, new_tok, selection.size))
        if predicted > budget:
            if best is not None:
                break                        # the step up overshot: keep the last fit
            size = selection.size - math.ceil((predicted - budget) / per_row) - 1
            continue
        best = (selection, new_tok, predicted)
        room = int((budget - predicted) // per_row)
        if selection.size == rows or room < 2:
            break
        size = min(rows, selection.size + room - 1)
    return best


def _files_bytes_at(model, tokenizer, vocab: int) -> int:
    """The runtime files with the config saying `vocab` ids (without slicing the model)."""
    config = copy.copy(model.config)
    config.vocab_size = vocab
    shell = type("Shell", (), {"config": config, "generation_config": getattr(model, "generation_config", None)})
    return artifact.files_bytes(shell, tokenizer)


def minimum_vocabulary(tokenizer, texts: list[str]) -> int:
    """The fewest ids any pruned vocabulary keeps (special and byte tokens and what builds them)."""
    from .vocab import _build_index, _close, tokenizer_json

    index = _build_index(tokenizer_json(tokenizer))
    return len(_close(index, index.forced))


def heldout_measure(tokenizer, text: str):
    """measure(model, selection, layout) for `search`: held-out bits per byte of a copy of `model`
    with the vocabulary of `selection` (None: all of it) and its weights rounded as `layout`
    (an artifact.Layout) stores them."""
    from llmprune.quant_sim import simulate

    def measure(model, selection, layout) -> float:
        whole = selection is None or selection.size == model.get_input_embeddings().weight.shape[0]
        if whole and not layout.layer_bits and not layout.table_bits:
            return heldout_bpb(model, tokenizer, text)
        trimmed = copy.deepcopy(model)
        if whole:
            return heldout_bpb(simulate(trimmed, layout), tokenizer, text)
        slice_vocabulary(trimmed, selection.kept_ids)
        return heldout_bpb(simulate(trimmed, layout), rebuild_tokenizer(tokenizer, selection.kept_ids), text)

    return measure


def smallest_artifact(model, tokenizer, texts: list[str], precision: str) -> int:
    """Bytes of the smallest artifact the grid can make, estimated before any cut: the largest
    decoder cut (the decoder's bytes shrink by the ratio) with the smallest vocabulary."""
    rows = model.get_input_embeddings().weight.shape[0]
    table = artifact.row_bytes(model, precision) * rows
    decoder = artifact.weight_bytes(model, precision, wide=artifact.keep_8bit_options(precision)[-1]) - table
    share = minimum_vocabulary(tokenizer, texts) / rows
    return int(decoder * (1 - DECODER_STEPS[-1]) + table * share + artifact.graph_bytes(model, precision)
               + artifact.files_bytes(model, tokenizer) * share)


def check_reachable(model, tokenizer, texts: list[str], budget: int, precision: str) -> None:
    """Refuse a budget below the smallest artifact, before calibrating."""
    smallest = smallest_artifact(model, tokenizer, texts, precision)
    if budget < smallest:
        raise_too_small(budget, smallest, precision)


def raise_too_small(budget: int, smallest: int, precision: str) -> None:
    raise LLMPruneError(f"--target-mb {budget / artifact.MB:g} is below the smallest {precision} artifact this model "
                        f"can make (about {smallest / artifact.MB:.1f} MB: the decoder cut by {DECODER_STEPS[-1]:.0%}, "
                        "the smallest vocabulary)",
                        f"pass --target-mb {math.ceil(smallest / artifact.MB * 1.02 * 10) / 10:g} or more"
                        + (", or a lower --precision" if precision != "int4" else ""))


def search(model, tokenizer, texts: list[str], budget: int, precision: str, cut, measure) -> TargetResult:
    """Try the decoder ratios in order, and at each the layouts `precision` has. `cut(ratio)`
    returns (a decoder-cut copy, prune's report); `measure(model, selection, layout)` the bits per
    byte of a model with a vocabulary (None: all of it) at a layout."""
    import time

    layouts = [artifact.layout(precision, wide=wide) for wide in artifact.keep_8bit_options(precision)]
    rows = model.get_input_embeddings().weight.shape[0]
    dense_bpb = measure(model, None, layouts[0])
    floor = minimum_vocabulary(tokenizer, texts)         # the index over every merge: built once
    best: TargetResult | None = None
    tried: list[Candidate] = []
    for ratio in DECODER_STEPS:
        start = time.perf_counter()
        cut_model, report = (model, None) if ratio == 0 else cut(ratio)
        alone = dense_bpb if ratio == 0 else measure(cut_model, None, layouts[0])
        if best is not None and alone >= best.chosen.heldout_bpb:
            tried.append(Candidate(ratio, decoder_only_bpb=alone, stopped=True, seconds=time.perf_counter() - start))
            log.info("target: the decoder cut by %.0f%% alone costs %.4f bits/byte, more than the best plan (%.4f): "
                     "larger cuts are not tried", 100 * ratio, alone, best.chosen.heldout_bpb)
            break
        for lay in layouts:
            cand = Candidate(ratio, keep_8bit=list(lay.wide), decoder_only_bpb=alone)
            tried.append(cand)
            best = _try_layout(cand, cut_model, report, lay, best, (tokenizer, texts, budget, precision, floor), measure)
            cand.seconds, start = time.perf_counter() - start, time.perf_counter()
            if cand.vocab in (None, rows):
                break                   # a leaner layout helps only where the vocabulary had to give way
        if ratio == 0 and tried[0].vocab == rows:
            break                                   # the whole model fits: nothing to trade
    if best is None:
        raise_too_small(budget, smallest_artifact(model, tokenizer, texts, precision), precision)
    best.candidates, best.dense_bpb = tried, dense_bpb
    return best


def _try_layout(cand: Candidate, cut_model, report, lay, best: TargetResult | None, fitting: tuple, measure):
    """Fit the vocabulary beside `cut_model` at layout `lay`, measure it; the better of it and `best`."""
    tokenizer, texts, budget, precision, floor = fitting
    fit = fitting_vocabulary(cut_model, tokenizer, texts, budget, precision, floor, wide=lay.wide)
    if fit is not None:
        selection, _, cand.predicted_bytes = fit
        cand.vocab = selection.size
        cand.heldout_bpb = measure(cut_model, selection, lay)
        if best is None or cand.heldout_bpb < best.chosen.heldout_bpb:
            best = TargetResult(cand, cut_model, report, selection)
    log.info("target: decoder -%.0f%%, 8-bit %s, vocabulary %s: %s bits/byte", 100 * cand.decoder_ratio,
             "+".join(lay.wide) or "none", f"{cand.vocab:,} ids" if cand.vocab is not None else "does not fit",
             f"{cand.heldout_bpb:.4f}" if cand.heldout_bpb is not None else "—")
    return best
