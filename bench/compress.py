"""Compress benchmark on the real Gemma-3-270M: dense vs every method at several ratios.

Each compression runs in its own process (`llmprune compress --json`), so its peak RSS and wall
time are its own; each pruned checkpoint is then evaluated (`llmprune eval --json`) on
WikiText-2 test and on the Python docs (out of domain). Results go to bench/results/compress.json
(updated after every run, so an interrupted benchmark resumes with --resume), a table into
docs/benchmarks.md and a plot to docs/img/compress_ppl.png. Nothing here asserts a timing.

    python bench/compress.py                      # everything (about an hour on 2 cores)
    python bench/compress.py --methods comp wanda-sp --ratios 0.2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, load_results, run_json, save_results  # noqa: E402

METHODS = ["comp", "layer-only", "wanda-sp", "magnitude", "fluctuation", "random", "taylor"]
CORPORA = {"wikitext2": "wikitext2/wiki.test.raw", "pydocs": "pydocs/library.txt"}
# Forced splits for the layer/neuron sweep at 0.2 (layer shares giving 1, 2 and 3 whole layers).
SPLIT_SHARES = {"1 layer": 0.3}
# Ablations of comp at 0.2: each changes one default.
ABLATIONS = {
    "selection=pivot": ["--selection", "pivot"],
    "fit=scales": ["--fit", "scales"],
    "allocation=uniform": ["--allocation", "uniform"],
    "heads 1/4": ["--prune-heads", "--head-ratio", "0.25", "--layer-share", "0"],
}


def evaluate(model: str, windows: int, work: Path) -> dict:
    scores = {}
    for name, rel in CORPORA.items():
        out, _ = run_json(["eval", "--model", model, "--data", str(SHARED / rel), "--seq-len", "512",
                           "--max-windows", str(windows)], work / f"eval-{name}.log")
        scores[name] = out["perplexity"]
    return scores


def compress_run(key: str, extra: list[str], ratio: float, args, work: Path) -> dict:
    out_dir = work / key
    report, wall = run_json(["compress", "--model", args.model, "--ratio", str(ratio), "--of", "decoder", "--out", str(out_dir),
                             "--overwrite",
                             "--calib", str(SHARED / "wikitext2/wiki.valid.tokens"), "--calib-samples", str(args.calib_samples),
                             "--calib-seq-len", str(args.calib_seq_len), "--seed", "0", *extra], work / f"{key}.log")
    row = {
        "ratio": ratio, "ratio_achieved": report["ratio_achieved"], "total_reduction": report["total_reduction"],
        "layers_dropped": report["layers_dropped"], "calibration_loss": report["calibration_loss"],
        "split_candidates": report.get("split_candidates"), "compress_seconds": report["seconds"],
        "process_seconds": wall, "peak_rss_mb": report["peak_rss_mb"], "extra_args": extra,
    }
    row["perplexity"] = evaluate(str(out_dir), args.eval_windows, work)
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8, help="512-token windows per corpus (8)")
    p.add_argument("--no-extras", action="store_true", help="skip the split sweep and the --low-memory run")
    p.add_argument("--resume", action="store_true", help="skip runs already in the results file")
    p.add_argument("--keep", action="store_true", help="keep the pruned checkpoints")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/compress.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench/work/compress")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results) if args.resume else {}
    results.setdefault("setup", {})
    results["setup"].update(model=args.model, calib=f"wikitext2/wiki.valid.tokens {args.calib_samples}x{args.calib_seq_len}",
                            eval=f"{args.eval_windows}x512 windows (+BOS) of " + ", ".join(CORPORA.values()))
    runs = results.setdefault("runs", {})

    # The headline comparison at 0.2 first, then comp's variants, then the other ratios.
    jobs = [("dense", None, [], 0.0)]
    order = sorted(args.ratios, key=lambda r: (abs(r - 0.2), r))
    jobs += [(f"{m}@{order[0]}", m, ["--method", m], order[0]) for m in args.methods]
    if not args.no_extras and "comp" in args.methods:
        jobs += [("comp[low-memory]@0.2", "comp", ["--method", "comp", "--low-memory"], 0.2)]
        jobs += [(f"comp[{name}]@0.2", "comp", ["--method", "comp", *flags], 0.2) for name, flags in ABLATIONS.items()]
        jobs += [(f"comp[{name}]@0.2", "comp", ["--method", "comp", "--layer-share", str(s)], 0.2)
                 for name, s in SPLIT_SHARES.items()]
    jobs += [(f"{m}@{r}", m, ["--method", m], r) for r in order[1:] for m in args.methods]
    for key, method, extra, ratio in jobs:
        if key in runs and args.resume:
            continue
        print(f"[bench] {key} ...", flush=True)
        try:
            if method is None:
                runs[key] = {"ratio": 0.0, "perplexity": evaluate(args.model, args.eval_windows, args.work)}
            else:
                slug = "".join(c if c.isalnum() or c in ".-" else "_" for c in key)
                runs[key] = {"method": method, **compress_run(slug, extra, ratio, args, args.work)}
        except RuntimeError as exc:
            runs[key] = {"method": method, "ratio": ratio, "error": str(exc)}
        print(f"[bench] {key}: {runs[key].get('perplexity', runs[key].get('error'))}", flush=True)
        save_results(args.results, results)
    from report import render_compress

    render_compress(results, ROOT / "docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
