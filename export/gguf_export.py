"""`llmprune export --format gguf`: one GGUF file per requested type in an output folder written
atomically, each read back with the gguf package and, where llama.cpp is installed, run in it
against PyTorch (perplexity on the same windows, greedy tokens on the parity prompts)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from llmprune.checkpoint import atomic_output_dir
from llmprune.errors import LLMPruneError

from .config import ExportConfig
from .gguf import LLAMA_CPP_TYPES, check_block_rows, plan_layout, read_back, write_gguf
from .gguf_layout import GGUFLayout, pad_for_llama_cpp
from .gguf_vocab import vocab_fields
from .llama_cpp import LlamaCppModel, llama_cpp_module, llama_cpp_version, quantize_file, require_quantizer

log = logging.getLogger(__name__)

# Unquantized files must compute what PyTorch does: llama.cpp's perplexity within this of PyTorch's.
FLOAT_PPL_TOLERANCE = 0.01
FLOAT_TYPES = ("f32", "f16")


def gguf_file(kind: str) -> str:
    return f"model-{kind}.gguf"


def prepare_gguf(model, config: ExportConfig, tokenizer) -> GGUFLayout:
    """Before any slow work: pad the model in place where its llama.cpp architecture needs one
    width (exact: no output changes), then check everything that would stop the export, one line
    each (block sizes are checked on the padded widths, which are what the file stores). Returns
    the layout the checkpoint had."""
    if tokenizer is None:
        raise LLMPruneError("a GGUF file carries its tokenizer, and this checkpoint has none",
                            "export a checkpoint folder saved with its tokenizer")
    plan_layout(model)  # refuses what llama.cpp cannot run before the slower checks
    vocab_fields(tokenizer, int(model.get_input_embeddings().weight.shape[0]))
    for kind in config.modes:
        if kind in LLAMA_CPP_TYPES:
            require_quantizer(kind)
    layout = pad_for_llama_cpp(model)
    for kind in config.modes:
        check_block_rows(model, kind)
    return layout


def export_gguf(model, config: ExportConfig, out, tokenizer, checks, source: str | None, steps, report: dict,
                layout: GGUFLayout) -> dict:
    """Write, read back and check the GGUF files of `config.modes` into `out` (atomically);
    `checks`: the PyTorch reference (windows, greedy prompts) built by the export pipeline;
    `layout`: the checkpoint's, from `prepare_gguf` (which padded the model where needed)."""
    kinds = config.modes
    report["gguf"] = {"architecture": layout.arch, "padded": layout.pad, "uniform": layout.uniform,
                      "llama_cpp": llama_cpp_version(), "widths_before_padding": _widths(layout)}
    with atomic_output_dir(out, config.overwrite, marker="export_report.json") as tmp:
        written = _write_files(model, tokenizer, tmp, kinds, source, steps, config)
        report["gguf"]["widths"] = _widths(plan_layout(model))
        for kind in kinds:
            with steps(f"check {kind} (read back{', llama.cpp' if report['gguf']['llama_cpp'] else ''})"):
                report["variants"][kind] = _check(tmp / gguf_file(kind), kind, model, written, checks, config)
        report["seconds"] = round(time.perf_counter() - report.pop("_start"), 3)
        report["peak_rss_mb"] = round(steps.process_peak_mb(), 1)
        report["steps"] = steps.record
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _widths(layout) -> dict:
    return {"intermediate": layout.per_layer("intermediate"), "query_heads": layout.per_layer("query_heads")}


def _write_files(model, tokenizer, tmp: Path, kinds, source, steps, config: ExportConfig) -> dict:
    """Every requested file; K-quants from an f32 file (removed unless asked for). Returns the
    layout each written-here file was made with (for the read-back)."""
    written = {}
    base = [k for k in kinds if k not in LLAMA_CPP_TYPES]
    needs_f32 = any(k in LLAMA_CPP_TYPES for k in kinds) and "f32" not in base
    for kind in base + (["f32"] if needs_f32 else []):
        with steps(f"write {gguf_file(kind)}"):
            written[kind] = write_gguf(model, tokenizer, tmp / gguf_file(kind), kind, name=source)
    for kind in kinds:
        if kind in LLAMA_CPP_TYPES:
            with steps(f"quantize {kind} with llama.cpp"):
                quantize_file(tmp / gguf_file("f32"), tmp / gguf_file(kind), kind, config.threads)
    if needs_f32:
        (tmp / gguf_file("f32")).unlink()
        written.pop("f32")
    return written


def _check(path: Path, kind: str, model, written: dict, checks, config: ExportConfig) -> dict:
    row = {"file": path.name, "bytes": path.stat().st_size}
    if kind in written:
        row["read_back"] = read_back(path, model, written[kind])
    if llama_cpp_module() is None:
        row["llama_cpp"] = None  # not installed: the file was read back, not run
        return row
    row["llama_cpp"] = _run_in_llama_cpp(path, checks, config)
    change = row["llama_cpp"]["perplexity_change_vs_torch"]
    if kind in FLOAT_TYPES and not abs(change) <= FLOAT_PPL_TOLERANCE:
        raise LLMPruneError(f"llama.cpp's perplexity of {path.name} differs from PyTorch's by {change:+.2%} "
                            f"(an unquantized file must be within {FLOAT_PPL_TOLERANCE:.0%})",
                            "the GGUF conversion is wrong for this model: export ONNX (--format onnx) and report it")
    return row


def _run_in_llama_cpp(path: Path, checks, config: ExportConfig) -> dict:
    from llmprune.evaluate import text_measures

    ref = checks.reference
    longest = max([checks.windows.shape[1]] + [len(g.prompt) + ref.max_new_tokens for g in ref.greedy])
    engine = LlamaCppModel(path, n_ctx=longest + 8, threads=config.threads)
    try:
        total, count = engine.nll(checks.windows.numpy())
        prompts = []
        for greedy in ref.greedy:
            tokens, speed = engine.generate(greedy.prompt, ref.max_new_tokens, eos_token_id=ref.eos)
            prompts.append({"equal": tokens == greedy.tokens, "llama_cpp": tokens, "torch": greedy.tokens,
                            "tokens_per_s": round(speed, 1)})
    finally:
        engine.close()
    ppl = math.exp(total / max(count, 1))
    n_bytes = text_measures(checks.tokenizer, checks.windows)[0] if checks.tokenizer is not None else None
    return {"perplexity": ppl, "torch_perplexity": ref.perplexity, "perplexity_change_vs_torch": ppl / ref.perplexity - 1,
            "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None,
            "torch_bits_per_byte": ref.bits_per_byte, "windows": int(checks.windows.shape[0]),
            "greedy_all_equal": all(p["equal"] for p in prompts), "prompts": prompts,
            "decode_tokens_per_s": float(np.median([p["tokens_per_s"] for p in prompts]))}
