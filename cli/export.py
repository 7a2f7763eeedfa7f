"""`llmprune export`: a (pruned) checkpoint to ONNX with KV cache, parity-checked against PyTorch,
optionally quantized (int8 / int4), converted to .ort and described for onnxruntime-genai."""

from __future__ import annotations

from .common import add_push_argument, emit_json


def add_parser(sub) -> None:
    from llmprune.export.config import ExportConfig
    from llmprune.options import add_config_arguments

    p = sub.add_parser("export", help="export a checkpoint to ONNX (KV cache, parity check, int8/int4, .ort, genai)",
                       description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint: HF folder (pruned ones included), .gguf, or 'gemma-3-270m'")
    p.add_argument("--out", required=True, help="output folder (fp32 model at the top, a quantized one in a sub-folder)")
    add_config_arguments(p, ExportConfig)
    p.add_argument("--eval-data", default=None, help="text for the quantized perplexity change (file, folder or HF "
                   "dataset; default: a built-in paragraph)")
    p.add_argument("--json", action="store_true", help="print the export report as JSON on stdout")
    add_push_argument(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from llmprune.export import ExportConfig, export_checkpoint
    from llmprune.options import config_from_args
    from llmprune.paths import printable

    config = config_from_args(ExportConfig, args)
    result = export_checkpoint(args.model, config, args.out, eval_data=args.eval_data)
    report = result.report
    if args.json:
        emit_json(report)
        return 0
    if report.get("format") == "gguf":
        _print_gguf(report)
    else:
        _print_onnx(report)
    rss = f", peak RSS {report['peak_rss_mb']:.0f} MiB" if report.get("peak_rss_mb") else ""
    print(f"{report['seconds']:.0f} s{rss} -> {printable(result.path)}")
    return 0


def _print_gguf(report: dict) -> None:
    facts = report["gguf"]
    how = "padded to its widest layer" if facts["padded"] else ("per-layer widths" if facts["architecture"] == "deci"
                                                               else "uniform")
    runtime = facts["llama_cpp"] or "not installed: files read back, not run"
    print(f"GGUF architecture {facts['architecture']} ({how}); llama.cpp {runtime}")
    for kind, v in report["variants"].items():
        line = f"{kind:7s} {v['bytes'] / 2**20:9.1f} MiB  {v['file']}"
        if v.get("read_back"):
            line += f" | read back: max |diff| {v['read_back']['max_abs_diff']:.2g}"
        run = v.get("llama_cpp")
        if run:
            bpb = f", {run['bits_per_byte']:.4f} bits/byte" if run.get("bits_per_byte") else ""
            equal = sum(p["equal"] for p in run["prompts"])
            line += (f" | llama.cpp ppl {run['perplexity']:.3f} ({run['perplexity_change_vs_torch']:+.2%} vs PyTorch){bpb}"
                     f" | greedy equal on {equal}/{len(run['prompts'])} prompts | {run['decode_tokens_per_s']:.0f} tokens/s")
        print(line)


def _print_onnx(report: dict) -> None:
    for name, v in report["variants"].items():
        gen = v["generation"]
        equal = sum(r["equal"] for r in gen["prompts"])
        ppl = v["perplexity"]
        ppl_text = f"ppl {ppl['onnx']:.3f}" + (f" ({ppl['change']:+.2%} vs fp32)" if "change" in ppl else "")
        if ppl.get("bits_per_byte") is not None:
            ppl_text += f", {ppl['bits_per_byte']:.4f} bits/byte"
        size = v["sizes"]["onnx_bytes"] / 2**20
        print(f"{name:5s} {size:9.1f} MiB ({v['size_vs_fp32']:.0%} of fp32) | "
              f"max |logit diff| {v['logits']['max_abs_logit_diff']:.2g}"
              f" | greedy {gen['tokens']} tokens equal to PyTorch on {equal}/{len(gen['prompts'])} prompts | {ppl_text}"
              + (f" | {v['ort']['file']}" if "ort" in v else ""))
