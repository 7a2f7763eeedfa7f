"""`llmprune export`: a (pruned) checkpoint to ONNX with KV cache, parity-checked against PyTorch,
optionally quantized (int8 / int4), converted to .ort and described for onnxruntime-genai."""

from __future__ import annotations

from .common import emit_json, positive_float, positive_int


def add_parser(sub) -> None:
    from llmprune.export.config import QUANTIZE_MODES

    p = sub.add_parser("export", help="export a checkpoint to ONNX (KV cache, parity check, int8/int4, .ort, genai)",
                       description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint: HF folder (pruned ones included), .gguf, or 'gemma-3-270m'")
    p.add_argument("--out", required=True, help="output folder (fp32 model at the top, a quantized one in a sub-folder)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, nargs="+", default=["none"],
                   help="also write an int8 and/or int4 model, each in its sub-folder (default none)")
    p.add_argument("--block-size", type=positive_int, default=32, help="int8/int4 block size (32)")
    p.add_argument("--no-quantize-embedding", dest="quantize_embedding", action="store_false",
                   help="int8/int4: keep the embedding lookup table in fp32 (the LM head is still quantized)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                   help="MatMulNBits compute type: 4 = int8 activations (fast, default), 0 = unset (fp32 on CPU; "
                        "very slow for 8-bit weights)")
    p.add_argument("--symmetric", action="store_true",
                   help="int4: blocks without zero points (default: a zero point per block, measured more accurate)")
    p.add_argument("--keep-8bit", nargs="*", default=["down_proj", "v_proj"], metavar="NAME",
                   help="int4: MatMuls whose node name contains one of these stay 8-bit (default: down_proj v_proj; none: give no NAME)")
    p.add_argument("--table-bits", type=int, choices=(4, 8), default=8,
                   help="int4: bits of the vocabulary table (LM head and tied embedding, stored once): 8 (default) or 4")
    p.add_argument("--ort", action="store_true", help="also write model.ort (ONNX Runtime Mobile) beside each model.onnx")
    p.add_argument("--genai", action="store_true", help="also write genai_config.json for onnxruntime-genai")
    p.add_argument("--atol", type=positive_float, default=1e-3, help="largest fp32 max |logit diff| vs PyTorch (1e-3)")
    p.add_argument("--eval-data", default=None, help="text for the quantized perplexity change (file, folder or HF "
                   "dataset; default: a built-in paragraph)")
    p.add_argument("--eval-windows", type=positive_int, default=4, help="evaluation windows (4)")
    p.add_argument("--eval-seq-len", type=positive_int, default=128, help="tokens per evaluation window (128)")
    p.add_argument("--opset", type=positive_int, default=None, help="ONNX opset (default: optimum's for the architecture)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the export report as JSON on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    from llmprune.export import ExportConfig, export_checkpoint

    config = ExportConfig(
        quantize=tuple(args.quantize), block_size=args.block_size, quantize_embedding=args.quantize_embedding,
        accuracy_level=args.accuracy_level or None, symmetric=args.symmetric, table_bits=args.table_bits,
        keep_8bit=tuple(args.keep_8bit),
        ort=args.ort, genai=args.genai, atol=args.atol, eval_windows=args.eval_windows,
        eval_seq_len=args.eval_seq_len, opset=args.opset, overwrite=args.overwrite,
    )
    result = export_checkpoint(args.model, config, args.out, eval_data=args.eval_data)
    report = result.report
    if args.json:
        emit_json(report)
        return 0
    for name, v in report["variants"].items():
        gen = v["generation"]
        equal = sum(r["equal"] for r in gen["prompts"])
        ppl = v["perplexity"]
        ppl_text = f"ppl {ppl['onnx']:.3f}" + (f" ({ppl['change']:+.2%} vs fp32)" if "change" in ppl else "")
        size = v["sizes"]["onnx_bytes"] / 2**20
        print(f"{name:5s} {size:9.1f} MiB ({v['size_vs_fp32']:.0%} of fp32) | max |logit diff| {v['logits']['max_abs_logit_diff']:.2g}"
              f" | greedy {gen['tokens']} tokens equal to PyTorch on {equal}/{len(gen['prompts'])} prompts | {ppl_text}"
              + (f" | {v['ort']['file']}" if "ort" in v else ""))
    print(f"{report['seconds']:.0f} s -> {result.path}")
    return 0
