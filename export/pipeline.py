"""The export pipeline: fp32 ONNX (optimum layout) -> parity -> optional int8/int4 -> .ort ->
genai_config, all written into a temporary folder that replaces the output only on success."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.arch import adapter_for
from llmprune.checkpoint import atomic_output_dir, check_output_dir
from llmprune.data import cut_windows, tokenize_stream
from llmprune.errors import LLMPruneError

from .config import DEFAULT_EVAL_TEXT, ExportConfig
from .genai import convert_to_ort, write_genai_config
from .onnx import MODEL_FILE, export_fp32, folder_size
from .parity import fixed_inputs, generation_parity, logit_parity, perplexities, prompt_ids
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
        return torch.cat([fixed_inputs(vocab, config.eval_seq_len + 1, bos, seed=4321 + i)[:1] for i in range(config.eval_windows)])
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
                eval_texts: list[str] | None = None) -> ExportResult:
    """Export an in-memory causal LM (dense or pruned) to ONNX with KV cache, check it against
    PyTorch, optionally quantize, convert and describe it for onnxruntime-genai; writes `out`
    atomically and returns the report (also in out/export_report.json)."""
    config = config or ExportConfig()
    if out is None:
        raise LLMPruneError("no output folder given", "pass out=... (--out)")
    adapter_for(model)
    check_output_dir(out, config.overwrite)
    model.eval()
    start = time.perf_counter()
    mc = model.config
    report: dict = {
        "model": {
            "model_type": mc.model_type, "num_hidden_layers": mc.num_hidden_layers, "hidden_size": mc.hidden_size,
            "num_key_value_heads": mc.num_key_value_heads, "vocab_size": mc.vocab_size,
            "tie_word_embeddings": bool(getattr(mc, "tie_word_embeddings", False)),
            "layer_types": list(getattr(mc, "layer_types", None) or []) or None,
            "pruned_layers": ((getattr(mc, "llmprune", None) or {}).get("layers")),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "config": {k: v for k, v in config.__dict__.items() if k not in ("overwrite", "threads")},
        "variants": {},
    }
    with atomic_output_dir(out, config.overwrite) as tmp:
        t = time.perf_counter()
        facts = export_fp32(model, tmp, config.opset)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report["export_seconds"] = round(time.perf_counter() - t, 3)
        report["dedupe"] = {k: facts[k] for k in ("raw_bytes", "bytes")} | {
            "removed": facts["dedupe"]["removed"], "bytes_saved": facts["dedupe"]["bytes_saved"]}
        report["opset"] = facts["opset"]

        threads = config.threads
        fp32 = OnnxCausalLM(tmp, threads=threads)
        bos = tokenizer.bos_token_id if tokenizer is not None else mc.bos_token_id
        ids = fixed_inputs(mc.vocab_size, config.parity_seq_len, bos)
        if tokenizer is not None:
            prompts = [prompt_ids(tokenizer, p) for p in config.prompts]
        else:
            prompts = [row.tolist() for row in fixed_inputs(mc.vocab_size, 8, bos, seed=99)] + [ids[0, :5].tolist()]
        eos = _eos(model)
        windows = _eval_windows(tokenizer, eval_texts, config, mc.vocab_size, bos)

        t = time.perf_counter()
        logits = logit_parity(model, fp32, ids)
        gen = generation_parity(model, fp32, prompts, config.parity_tokens, eos)
        ppl = perplexities(model, fp32, windows)
        report["variants"]["fp32"] = {"folder": ".", "logits": logits, "generation": gen, "perplexity": ppl,
                                      "check_seconds": round(time.perf_counter() - t, 3)}
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

        folders = {"fp32": tmp}
        for mode in config.modes:
            qdir = tmp / mode
            qdir.mkdir()
            t = time.perf_counter()
            info = quantize(mode, tmp / MODEL_FILE, qdir / MODEL_FILE, config)
            q_seconds = time.perf_counter() - t
            for p in tmp.iterdir():  # config, generation config, tokenizer files
                if p.is_file() and (p.suffix in (".json", ".model", ".txt")) and p.name != REPORT_FILE:
                    shutil.copy2(p, qdir / p.name)
            qsession = OnnxCausalLM(qdir, threads=threads)
            t = time.perf_counter()
            report["variants"][mode] = {
                "folder": mode, "quantization": info, "quantize_seconds": round(q_seconds, 3),
                "logits": logit_parity(model, qsession, ids),
                "generation": generation_parity(model, qsession, prompts, config.parity_tokens, eos),
                "perplexity": perplexities(None, qsession, windows, reference_ppl=ppl["onnx"]),
            }
            report["variants"][mode]["check_seconds"] = round(time.perf_counter() - t, 3)
            folders[mode] = qdir
            del qsession

        if config.genai:
            if tokenizer is None:
                raise LLMPruneError("--genai needs the tokenizer files", "export a checkpoint folder that has a tokenizer")
            for folder in folders.values():
                write_genai_config(folder, mc, fp32.input_names, config.max_context, getattr(model, "generation_config", None))

        for name, folder in folders.items():
            if config.ort:
                t = time.perf_counter()
                convert_to_ort(folder)
                ort = OnnxCausalLM(folder, threads=threads, prefer_ort=True)
                onnx_logits, _ = (fp32 if name == "fp32" else OnnxCausalLM(folder, threads=threads)).forward(ids.numpy())
                ort_logits, _ = ort.forward(ids.numpy())
                report["variants"][name]["ort"] = {
                    "file": ort.path.name, "seconds": round(time.perf_counter() - t, 3),
                    "max_abs_logit_diff_vs_onnx": float(abs(ort_logits - onnx_logits).max()),
                }
            report["variants"][name]["sizes"] = _sizes(folder)
        fp32_bytes = report["variants"]["fp32"]["sizes"]["onnx_bytes"]
        for name, variant in report["variants"].items():
            variant["size_vs_fp32"] = variant["sizes"]["onnx_bytes"] / fp32_bytes
        report["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return ExportResult(Path(out), report)


def export_checkpoint(spec, config: ExportConfig | None = None, out=None, eval_data: str | None = None) -> ExportResult:
    """Load a checkpoint (folder, .gguf, packaged name; pruned ones included) and export it."""
    from llmprune.data import load_texts
    from llmprune.models import load

    config = config or ExportConfig()
    if out is None:
        raise LLMPruneError("no output folder given", "pass --out")
    check_output_dir(out, config.overwrite)  # fail before the (slow) load
    model, tokenizer = load(spec, dtype=torch.float32)
    texts = load_texts(eval_data) if eval_data else None
    return export_onnx(model, config, out, tokenizer=tokenizer, eval_texts=texts)
