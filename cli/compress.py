"""`llmprune compress`: prune a model by a fraction of its decoder parameters and write a checkpoint."""

from __future__ import annotations

import argparse

from .common import add_push_argument, emit_json


def ratio_type(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def add_parser(sub) -> None:
    from llmprune.compress import CompressConfig
    from llmprune.options import add_config_arguments, help_of

    p = sub.add_parser("compress", help="prune a model (COMP or a baseline) and write a checkpoint", description=__doc__)
    p.add_argument("--model", default=None, help="HF folder, .gguf, hub id or 'gemma-3-270m' (default)")
    p.add_argument("--ratio", type=ratio_type, default=None, help=help_of(CompressConfig, "ratio") + "; or --target-mb")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--calib", default="python-docs", help="calibration data: file, folder, HF dataset name, "
                   "'python-docs' (default: the Python language reference this interpreter carries, real text on any "
                   "machine) or 'self' (text the model samples itself; slow). Text of your own domain is best")
    # Every other knob: flags generated from CompressConfig's fields (their help and defaults live there).
    add_config_arguments(p, CompressConfig, exclude=("ratio",))
    p.add_argument("--refit", dest="fit", action="store_const", const="refit", help="same as --fit refit")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier compress/recover output in --out (one with "
                   "pruning_report.json; any other non-empty folder is refused)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    add_push_argument(p)
    p.set_defaults(run=run)


def build_config(args):
    """The config the flags describe, with the calibration size resolved for --calib exactly as
    the Python API resolves it."""
    from llmprune.compress import CompressConfig
    from llmprune.errors import LLMPruneError
    from llmprune.options import config_from_args

    if args.ratio is None and args.target_mb is None:
        raise LLMPruneError("no size given", "pass --ratio R (a fraction of the model, e.g. 0.2) or --target-mb MB "
                                             "(the exported artifact's size, e.g. 100)")
    if args.target_mb is not None:
        for flag, given in (("--ratio", args.ratio is not None), ("--of", args.of is not None)):
            if given:
                raise LLMPruneError(f"{flag} and --target-mb both set how much to remove",
                                    f"pass --target-mb alone (it chooses the cut), or drop it and keep {flag}")
    return config_from_args(CompressConfig, args).with_calibration_defaults(args.calib)


def run(args) -> int:
    from llmprune.compress import compress

    config = build_config(args)
    result = compress(args.model, config, calib=args.calib, out=args.out, overwrite=args.overwrite)
    report = result.report
    if args.json:
        emit_json(report)
        return 0
    print_summary(report, args.out)
    return 0


def print_summary(report: dict, out) -> None:
    before, after = report["params_before"], report["params_after"]
    if before["decoder_layers"] == after["decoder_layers"]:
        print(f"removed {report['total_reduction']:.1%} of the model's parameters ({before['total']:,} -> "
              f"{after['total']:,}); the decoder layers are untouched")
    else:
        print(f"{report['method']}: removed {report['ratio_achieved']:.1%} of decoder parameters "
              f"({before['decoder_layers']:,} -> {after['decoder_layers']:,}); total {before['total']:,} -> "
              f"{after['total']:,} (-{report['total_reduction']:.1%})")
    vocab = report.get("vocabulary")
    if vocab:
        growth = vocab["tokens_per_byte_after"] / vocab["tokens_per_byte_before"] - 1
        ranked = f" ranked on {vocab['data']}," if vocab.get("data") else ""
        print(f"vocabulary: {vocab['kept']:,} of {vocab['before']:,} ids kept,{ranked} covering {vocab['coverage']:.2%} "
              f"of its tokens ({growth:+.1%} tokens on it), {vocab['seconds']:.1f} s — keep more with --vocab K, "
              "rank on your own text with --vocab-data FILE")
    loss = report.get("calibration_loss")
    if loss:
        print(f"layers dropped: {report['layers_dropped'] or 'none'} | calibration loss dense {loss['dense']:.4f} -> "
              f"pruned {loss['pruned']:.4f}" + (f" (before tuning {loss['pruned_before_tuning']:.4f})"
                                                if loss.get("pruned_before_tuning") is not None else ""))
    source, calib = report.get("calibration_data"), report.get("calibration") or {}
    if source:
        size = f" ({calib['windows']}×{calib['seq_len']} tokens)" if calib.get("windows") else ""
        hint = (" — the Python language reference; for a model tuned to your text pass --calib FILE"
                if source == "python-docs" else "")
        print(f"calibrated on {source}{size}{hint}")
    if report.get("target"):
        print_target(report["target"])
    shares = (report.get("budget") or {}).get("removed")
    if shares and report["budget"].get("of") in ("total", "target-mb"):
        print("budget: " + ", ".join(f"{name} {part['share']:.0%}" for name, part in shares.items()))
    print(f"{report['seconds']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MiB -> {out}")


def _layout_note(candidate: dict, precision: str) -> str:
    """', 8-bit down_proj+v_proj' when a candidate is not export's default int4 layout."""
    from llmprune.artifact import WIDE

    wide = tuple(candidate.get("keep_8bit") or WIDE)
    return "" if precision != "int4" or wide == WIDE else f", 8-bit {'+'.join(wide) or 'none'}"


def print_target(target: dict) -> None:
    """What --target-mb tried, what it chose and the size it predicts."""
    mb = 1_000_000
    for c in target["candidates"]:
        fit = (f"vocabulary {c['vocab']:,} ids, {c['predicted_bytes'] / mb:.1f} MB: {c['heldout_bpb']:.4f} bits/byte"
               if c["vocab"] is not None else "the cut alone costs more than the best plan: stop" if c["stopped"]
               else "does not fit")
        alone = "" if c["decoder_ratio"] == 0 else f" (the cut alone {c['decoder_only_bpb']:.4f})"
        print(f"  decoder -{c['decoder_ratio']:.0%}{_layout_note(c, target['precision'])}: {fit}{alone}")
    chosen, pred = target["chosen"], target["predicted"]
    print(f"target {target['mb']:g} MB {target['precision']}: chose decoder -{chosen['decoder_ratio']:.0%}"
          f"{_layout_note(chosen, target['precision'])} and {chosen['vocab']:,} ids, {chosen['heldout_bpb']:.4f} bits/byte "
          f"on held-out calibration text as it will be stored (dense {target['heldout']['dense_bpb']:.4f}); "
          f"predicted {pred['total'] / mb:.1f} MB (weights "
          f"{pred['weights'] / mb:.1f}, tokenizer and config {pred['files'] / mb:.1f}, graph {pred['graph'] / mb:.1f}) "
          f"— export with `{target['export']}`")
