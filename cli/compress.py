"""`llmprune compress`: prune a model by a fraction of its decoder parameters and write a checkpoint."""

from __future__ import annotations

import argparse

from .common import emit_json, positive_int


def ratio_type(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def add_parser(sub) -> None:
    from llmprune.compress.config import ALLOCATIONS, FIT_MODES, METHODS, SELECTIONS

    p = sub.add_parser("compress", help="prune a model (COMP or a baseline) and write a checkpoint", description=__doc__)
    p.add_argument("--model", default=None, help="HF folder, .gguf, hub id or 'gemma-3-270m' (default)")
    p.add_argument("--ratio", type=ratio_type, required=True, help="fraction of decoder-layer parameters to remove, in (0, 1)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--calib", default="self", help="calibration data: file, folder, HF dataset name, or 'self' (default: "
                   "text the model generates, 16×256 unless --calib-samples/--calib-seq-len are given)")
    p.add_argument("--method", choices=METHODS, default="comp", help="comp (default) or a baseline")
    p.add_argument("--calib-samples", type=positive_int, default=None, help="calibration windows N (32)")
    p.add_argument("--calib-seq-len", type=positive_int, default=None, help="tokens per calibration window L (512)")
    p.add_argument("--layer-share", default=None, help="'auto' or the fraction of the budget taken as whole layers "
                   "(default: auto for comp, 1 for layer-only, 0 for the other baselines)")
    p.add_argument("--fit", choices=FIT_MODES, default="refit", help="comp's least-squares tuning: refit (default), scales (mask tuning), none")
    p.add_argument("--refit", dest="fit", action="store_const", const="refit", help="same as --fit refit")
    p.add_argument("--selection", choices=SELECTIONS, default="energy", help="comp's neuron order: energy (default) or pivot (pivoted Cholesky)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None, help="neurons per layer: error (comp default) or uniform")
    p.add_argument("--prune-heads", action="store_true", help="also prune query heads, evenly within KV groups")
    p.add_argument("--head-ratio", type=ratio_type, default=None, help="fraction of query heads removed per layer (default: --ratio)")
    p.add_argument("--intercept", action="store_true", help="comp: also fit an output bias")
    p.add_argument("--low-memory", action="store_true", help="load one layer at a time from safetensors")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(run=run)


def build_config(args):
    from llmprune.compress import SELF_CALIB_DEFAULTS, CompressConfig

    use_self = args.calib == "self"
    samples = args.calib_samples or (SELF_CALIB_DEFAULTS["calib_samples"] if use_self else 32)
    seq_len = args.calib_seq_len or (SELF_CALIB_DEFAULTS["calib_seq_len"] if use_self else 512)
    return CompressConfig(
        ratio=args.ratio, method=args.method, calib_samples=samples, calib_seq_len=seq_len,
        layer_share=args.layer_share, fit=args.fit, selection=args.selection, allocation=args.allocation, prune_heads=args.prune_heads,
        head_ratio=args.head_ratio, intercept=args.intercept, low_memory=args.low_memory, seed=args.seed,
    )


def run(args) -> int:
    from llmprune.compress import compress

    config = build_config(args)
    result = compress(args.model, config, calib=args.calib, out=args.out, overwrite=args.overwrite)
    report = result.report
    if args.json:
        emit_json(report)
        return 0
    before, after = report["params_before"], report["params_after"]
    loss = report["calibration_loss"]
    print(f"{report['method']}: removed {report['ratio_achieved']:.1%} of decoder parameters "
          f"({before['decoder_layers']:,} -> {after['decoder_layers']:,}); total {before['total']:,} -> {after['total']:,} "
          f"(-{report['total_reduction']:.1%})")
    print(f"layers dropped: {report['layers_dropped'] or 'none'} | calibration loss dense {loss['dense']:.4f} -> pruned {loss['pruned']:.4f}"
          + (f" (before tuning {loss['pruned_before_tuning']:.4f})" if loss.get("pruned_before_tuning") is not None else ""))
    print(f"{report['seconds']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MiB -> {args.out}")
    return 0
