"""The export pipeline: fp32 ONNX (optimum layout) -> parity -> optional int8/int4 -> .ort ->
genai_config, all written into a temporary folder that replaces the output only on success."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.arch import adapter_for
from llmprune.checkpoint import atomic_output_dir, check_output_dir
from llmprune.data import cut_windows, tokenize_stream
from llmprune.errors import LLMPruneError
from llmprune.memory import peak_rss_mb, release_freed_memory, reset_peak_rss, window_peak_rss_mb
from llmprune.model_card import CARD_FILE, card_text
from llmprune.paths import check_writable_output, find_write_error, write_error

from .config import DEFAULT_EVAL_TEXT, GGUF_K_QUANTS, ExportConfig
from .genai import convert_to_ort, write_genai_config
from .gguf_export import export_gguf, prepare_gguf
from .onnx import MODEL_FILE, check_opset, export_fp32, folder_size
from .parity import TorchReference, fixed_inputs, generation_parity, logit_parity, perplexities, prompt_ids
from .quantize import quantize
from .runtime import OnnxCausalLM

log = logging.getLogger(__name__)

REPORT_FILE = "export_report.json"
_COPIED = ("config.json", "generation_config.json")


@dataclass
class ExportResult:
    path: Path
    report: dict


def _eval_windows(tokenizer, texts: list[str] | None, config: ExportConfig, vocab: int, bos) -> torch.Tensor:
    """A few windows of evaluation text (random ids when there is no tokenizer)."""
    if tokenizer is None:
        return torch.cat([fixed_inputs(vocab, config.eval_seq_len + 1, bos, seed=4321 + i)[:1]
                          for i in range(config.eval_windows)])
    stream = tokenize_stream(tokenizer, texts or [DEFAULT_EVAL_TEXT])
    seq_len = min(config.eval_seq_len, max(2, stream.numel() // config.eval_windows))
    return cut_windows(stream, seq_len, config.eval_windows, tokenizer.bos_token_id)


def _sizes(folder: Path) -> dict:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {"files": files, "onnx_bytes": folder_size(folder), "ort_bytes": folder_size(folder, (".ort",)) or None}


def _eos(model):
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    return eos if eos is not None else model.config.eos_token_id


def export_onnx(model, config: ExportConfig | None = None, out: str | os.PathLike | None = None, tokenizer=None,
                eval_texts: list[str] | None = None, source: str | None = None,
                release_model: bool = False) -> ExportResult:
    """Export an in-memory causal LM (dense or pruned) to ONNX with KV cache, check it against
    PyTorch, optionally quantize, convert and describe it for onnxruntime-genai; writes `out`
    atomically and returns the report (also in out/export_report.json) with a model card
    (README.md); `source`: the model spec it was loaded from, for the card. `release_model`
    frees the model's weights (moved to the meta device: the model is unusable afterwards) once
    the ONNX file is written and PyTorch's side of the checks is taken, so that no ONNX Runtime
    session or quantizer holds its copy of the weights beside them (`export_checkpoint` does).
    With `config.format == "gguf"` it writes GGUF files for llama.cpp instead (export/gguf_export.py;
    a non-uniform Gemma-3 or Qwen model is zero-padded in place first, which changes no output)."""
    config = config or ExportConfig()
    if out is None:
        raise LLMPruneError("no output folder given", "pass out=... (--out)")
    adapter_for(model)
    check_output_dir(out, config.overwrite, marker=REPORT_FILE)
    check_writable_output(out)
    check_opset(config.opset)
    model.eval()
    try:
        if config.format == "gguf":
            return _export_gguf(model, config, out, tokenizer, eval_texts, source)
        return _export(model, config, out, tokenizer, eval_texts, source, release_model)
    except LLMPruneError:
        raise
    except Exception as exc:  # disk full, read-only...: one line; the temporary folder is already gone
        cause = find_write_error(exc)
        if cause is None:
            raise
        raise write_error(out, cause) from exc


def _export(model, config: ExportConfig, out, tokenizer, eval_texts, source: str | None,
            release_model: bool) -> ExportResult:
    start = time.perf_counter()
    report: dict = {"source": source, "model": _model_facts(model),
                    "config": {k: v for k, v in config.__dict__.items() if k not in ("overwrite", "threads")},
                    "variants": {}}
    step = _Steps(config)
    with atomic_output_dir(out, config.overwrite, marker=REPORT_FILE) as tmp, step:
        t = time.perf_counter()
        with step("trace and write the fp32 ONNX"):
            facts = export_fp32(model, tmp, config.opset)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report["export_seconds"] = round(time.perf_counter() - t, 3)
        report["dedupe"] = {k: facts[k] for k in ("raw_bytes", "bytes")} | {
            "removed": facts["dedupe"]["removed"], "bytes_saved": facts["dedupe"]["bytes_saved"]}
        report["opset"] = facts["opset"]
        with step("run PyTorch on the parity inputs (logits, greedy tokens, perplexity)"):
            checks = _ParityInputs.build(model, tokenizer, eval_texts, config)
            if release_model:
                model.to("meta")  # every later check reads `checks.reference`: the weights are not needed
                release_freed_memory()
        with step("check fp32 against PyTorch"):
            # No repacked weights: the session reads them from the mapped model.onnx_data alone.
            fp32 = OnnxCausalLM(tmp, threads=config.threads, prepack=False)
            report["variants"]["fp32"] = _check_fp32(fp32, checks, config)
            input_names = fp32.input_names
            del fp32      # the fp32 session maps every weight: not kept through quantization
            release_freed_memory()
        folders = {"fp32": tmp}
        for mode in config.modes:
            with step(f"quantize {mode} and check it"):
                report["variants"][mode], folders[mode] = _write_quantized(mode, tmp, checks, config,
                                                                           report["variants"]["fp32"]["perplexity"])
                release_freed_memory()
        if config.genai:
            if tokenizer is None:
                raise LLMPruneError("--genai needs the tokenizer files", "export a checkpoint folder that has a tokenizer")
            with step("write the onnxruntime-genai config"):
                for folder in folders.values():
                    write_genai_config(folder, model.config, input_names, config.max_context,
                                       getattr(model, "generation_config", None))
        for name, folder in folders.items():
            if config.ort:
                with step(f"convert {name} to .ort and check it"):
                    report["variants"][name]["ort"] = _convert_and_check_ort(folder, checks.ids, config.threads)
            report["variants"][name]["sizes"] = _sizes(folder)
        fp32_bytes = report["variants"]["fp32"]["sizes"]["onnx_bytes"]
        for variant in report["variants"].values():
            variant["size_vs_fp32"] = variant["sizes"]["onnx_bytes"] / fp32_bytes
        report["seconds"] = round(time.perf_counter() - start, 3)
        report["peak_rss_mb"] = round(step.process_peak_mb(), 1)  # this process's, model load and every check included
        report["steps"] = step.record
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / CARD_FILE).write_text(card_text(report, Path(out)), encoding="utf-8")
    return ExportResult(Path(out), report)


def _export_gguf(model, config: ExportConfig, out, tokenizer, eval_texts, source: str | None) -> ExportResult:
    """--format gguf: PyTorch's side of the checks, then the files (export/gguf_export.py)."""
    report: dict = {"source": source, "format": "gguf", "model": _model_facts(model),
                    "config": {k: v for k, v in config.__dict__.items() if k not in ("overwrite", "threads")},
                    "variants": {}, "_start": time.perf_counter()}
    layout = prepare_gguf(model, config, tokenizer)
    total = 1 + 2 * len(config.modes) + any(k in GGUF_K_QUANTS for k in config.modes)
    with _Steps(config, total) as step:
        with step("run PyTorch on the parity inputs (perplexity, greedy tokens)"):
            checks = _ParityInputs.build(model, tokenizer, eval_texts, config)
        export_gguf(model, config, out, tokenizer, checks, source, step, report, layout)
    return ExportResult(Path(out), report)


class _Steps:
    """The export's long steps as they happen: a progress bar over the planned steps (the current
    one named), and each step's time in the log."""

    def __init__(self, config: ExportConfig, total: int | None = None) -> None:
        from tqdm import tqdm

        total = total or 3 + len(config.modes) + bool(config.genai) + (1 + len(config.modes)) * bool(config.ort)
        self.bar = tqdm(total=total, desc="export", unit="step", disable=None)
        self.record: list[dict] = []      # each step's seconds and the RSS high-water mark within it
        self.peak_before = peak_rss_mb()  # resetting the high-water mark per step also resets the process's

    @contextmanager
    def __call__(self, name: str):
        self.bar.set_postfix_str(name)
        started = time.perf_counter()
        measured = reset_peak_rss()
        yield
        self.bar.update(1)
        seconds, peak = time.perf_counter() - started, window_peak_rss_mb() if measured else None
        self.record.append({"step": name, "seconds": round(seconds, 2), "peak_rss_mb": peak and round(peak, 1)})
        log.info("export: %s: %.1f s%s", name, seconds, f", peak RSS {peak:.0f} MiB" if peak else "")

    def process_peak_mb(self) -> float:
        """The process's peak RSS so far: the most of the peak before the first step and each
        step's (the kernel's own figure restarts at every step's reset)."""
        return max([self.peak_before, peak_rss_mb()] + [r["peak_rss_mb"] for r in self.record if r["peak_rss_mb"]])

    def __enter__(self) -> _Steps:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _model_facts(model) -> dict:
    mc = model.config
    return {
        "model_type": mc.model_type, "num_hidden_layers": mc.num_hidden_layers, "hidden_size": mc.hidden_size,
        "num_key_value_heads": mc.num_key_value_heads, "vocab_size": mc.vocab_size,
        "tie_word_embeddings": bool(getattr(mc, "tie_word_embeddings", False)),
        "layer_types": list(getattr(mc, "layer_types", None) or []) or None,
        "pruned_layers": ((getattr(mc, "llmprune", None) or {}).get("layers")),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


@dataclass
class _ParityInputs:
    """What every variant is checked on: evaluation windows for perplexity and what PyTorch
    made of them, of a fixed id sequence (logits) and of prompts (greedy generation).
    `tokenizer` cut the windows from text (None: random ids), for bits per byte."""

    windows: torch.Tensor
    reference: TorchReference
    tokenizer: object = None

    @property
    def ids(self) -> torch.Tensor:
        return self.reference.ids

    @classmethod
    def build(cls, model, tokenizer, eval_texts, config: ExportConfig) -> "_ParityInputs":
        mc = model.config
        bos = tokenizer.bos_token_id if tokenizer is not None else mc.bos_token_id
        ids = fixed_inputs(mc.vocab_size, config.parity_seq_len, bos)
        if tokenizer is not None:
            prompts = [prompt_ids(tokenizer, p) for p in config.prompts]
        else:
            prompts = [row.tolist() for row in fixed_inputs(mc.vocab_size, 8, bos, seed=99)] + [ids[0, :5].tolist()]
        windows = _eval_windows(tokenizer, eval_texts, config, mc.vocab_size, bos)
        reference = TorchReference.build(model, ids, prompts, config.parity_tokens, _eos(model), windows, tokenizer)
        return cls(windows, reference, tokenizer)


def _check_fp32(fp32: OnnxCausalLM, checks: _ParityInputs, config: ExportConfig) -> dict:
    """Logit, greedy-generation and perplexity parity of the fp32 export; a one-line error when
    the logits differ beyond the tolerance or generation differs away from a near tie."""
    t = time.perf_counter()
    logits = logit_parity(checks.reference, fp32)
    gen = generation_parity(checks.reference, fp32)
    ppl = perplexities(checks.reference, fp32, checks.windows, tokenizer=checks.tokenizer)
    worst = max(logits["max_abs_logit_diff"], logits["max_abs_logit_diff_kv_cache"])
    if not worst <= config.atol:
        raise LLMPruneError(
            f"fp32 ONNX logits differ from PyTorch by {worst:.3g} (tolerance {config.atol:g})",
            "the export is wrong for this model; rerun with --debug, or raise --atol if the difference is expected")
    # A difference is accepted only at a near tie: PyTorch's own margin between the two tokens
    # within twice the logit tolerance (float rounding alone can flip such a choice).
    bad = [r for r in gen["prompts"] if not r["equal"]
           and not (r.get("tie_gap") is not None and abs(r["tie_gap"]) <= 2 * config.atol)]
    gen["all_equal_or_near_tie"] = not bad
    if config.check_generation and bad:
        raise LLMPruneError(
            f"fp32 ONNX greedy generation differs from PyTorch at token {bad[0]['first_difference']} of a prompt"
            f" (PyTorch margin {bad[0].get('tie_gap')})",
            "the KV-cache path of the export is wrong for this model; rerun with --debug")
    return {"folder": ".", "logits": logits, "generation": gen, "perplexity": ppl,
            "check_seconds": round(time.perf_counter() - t, 3)}


def _write_quantized(mode: str, tmp: Path, checks: _ParityInputs, config: ExportConfig,
                     fp32_ppl: dict) -> tuple[dict, Path]:
    """One quantized variant in its own complete sub-folder, checked against PyTorch."""
    qdir = tmp / mode
    qdir.mkdir()
    t = time.perf_counter()
    info = quantize(mode, tmp / MODEL_FILE, qdir / MODEL_FILE, config)
    q_seconds = time.perf_counter() - t
    for p in tmp.iterdir():  # config, generation config, tokenizer files
        if p.is_file() and (p.suffix in (".json", ".model", ".txt")) and p.name != REPORT_FILE:
            shutil.copy2(p, qdir / p.name)
    qsession = OnnxCausalLM(qdir, threads=config.threads)
    t = time.perf_counter()
    variant = {
        "folder": mode, "quantization": info, "quantize_seconds": round(q_seconds, 3),
        "logits": logit_parity(checks.reference, qsession),
        "generation": generation_parity(checks.reference, qsession),
        "perplexity": perplexities(None, qsession, checks.windows, reference_ppl=fp32_ppl["onnx"],
                                   tokenizer=checks.tokenizer),
    }
    variant["check_seconds"] = round(time.perf_counter() - t, 3)
    return variant, qdir


def _convert_and_check_ort(folder: Path, ids: torch.Tensor, threads) -> dict:
    """model.ort beside model.onnx, and its largest logit difference from the .onnx session."""
    t = time.perf_counter()
    convert_to_ort(folder)
    # One session at a time, neither with repacked weights: the check costs the weights once.
    onnx_logits, _ = OnnxCausalLM(folder, threads=threads, prepack=False).forward(ids.numpy())
    release_freed_memory()
    ort = OnnxCausalLM(folder, threads=threads, prefer_ort=True, prepack=False)
    ort_logits, _ = ort.forward(ids.numpy())
    return {"file": ort.path.name, "seconds": round(time.perf_counter() - t, 3),
            "max_abs_logit_diff_vs_onnx": float(abs(ort_logits - onnx_logits).max())}


def export_checkpoint(spec, config: ExportConfig | None = None, out=None, eval_data: str | None = None) -> ExportResult:
    """Load a checkpoint (folder, .gguf, packaged name; pruned ones included) and export it."""
    from llmprune.data import load_texts
    from llmprune.models import load

    config = config or ExportConfig()
    if out is None:
        raise LLMPruneError("no output folder given", "pass --out")
    check_output_dir(out, config.overwrite, marker=REPORT_FILE)  # fail before the (slow) load
    check_writable_output(out)
    check_opset(config.opset)
    model, tokenizer = load(spec, dtype=torch.float32)
    _warn_off_plan(spec, config)
    texts = load_texts(eval_data) if eval_data else None
    return export_onnx(model, config, out, tokenizer=tokenizer, eval_texts=texts, source=str(spec),
                       release_model=config.format == "onnx")


def _warn_off_plan(spec, config: ExportConfig) -> None:
    """A `compress --target-mb` checkpoint was planned for one int4 layout: one warning when the
    export stores int4 another way (its files would not have the planned size)."""
    from llmprune.checkpoint import REPORT_FILE as PLAN_FILE

    path = Path(str(spec)) / PLAN_FILE
    if "int4" not in config.modes or not path.is_file():
        return
    try:
        planned = ((json.loads(path.read_text()).get("target") or {}).get("chosen") or {}).get("keep_8bit")
    except (OSError, ValueError, AttributeError):
        return
    if planned is not None and tuple(planned) != tuple(config.keep_8bit):
        log.warning("this checkpoint was planned by --target-mb for int4 with --keep-8bit %s; exported with "
                    "--keep-8bit %s its int4 files will not have the planned size — pass --keep-8bit %s",
                    " ".join(planned), " ".join(config.keep_8bit) or "(none)", " ".join(planned))
