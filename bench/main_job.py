"""The README's main job, measured as a user runs it, offline: `llmprune compress --ratio 0.2
--out DIR` with no --calib (python-docs, the default calibration text; the budget counts the whole
model, `--of total`), against COMP's cut of the decoder (`--of decoder`) calibrated on python-docs,
on WikiText-2 valid (the benchmarks' reference) and on the model's own samples (`--calib self`,
when asked), and the whole-model budget at the decoder cut's size (7.5% of the model). Each
compress runs in its own process (wall time, peak RSS, the summary it prints); each result is
evaluated on WikiText-2 test and the Python docs' library text (8x512 windows, perplexity and bits
per byte), as bench/compress.py does; the README tour's dense eval is recorded too. The machine's
load is noted beside every timing. Results go to bench/results/main_job.json and a section of
docs/benchmarks.md. Nothing here asserts a timing.

    python bench/main_job.py                                   # default, decoder, wikitext: about 8 minutes
    python bench/main_job.py --arms default-same-size
    python bench/main_job.py --arms default readme-eval --rerun  # measure again
    python bench/main_job.py --arms self                         # self-sampling: 10-25 minutes more
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLMPRUNE, ROOT, SHARED, evaluate_texts, load_results, run_json, run_measured, save_results  # noqa: E402

CORPORA = {"wikitext2": "wikitext2/wiki.test.raw", "pydocs": "pydocs/library.txt"}
# name -> (flags after `compress --ratio R --out DIR`, R, the row's label)
ARMS = {
    # the default budget counts the whole model (--of total): the vocabulary rows the ranking text
    # never uses go first, then the decoder
    "default": ([], 0.2, "default: --ratio 0.2 (whole model, python-docs)"),
    "decoder": (["--of", "decoder"], 0.2, "--ratio 0.2 --of decoder (python-docs)"),
    "wikitext": (["--of", "decoder", "--calib", str(SHARED / "wikitext2/wiki.valid.tokens")], 0.2,
                 "--ratio 0.2 --of decoder --calib wiki.valid.tokens"),
    "self": (["--of", "decoder", "--calib", "self"], 0.2, "--ratio 0.2 --of decoder --calib self"),
    # the whole-model budget at the decoder cut's size (20% of the decoder is 7.5% of the model)
    "default-same-size": ([], 0.075, "--ratio 0.075 (whole model, python-docs): the decoder cut's size"),
}


def evaluate(model: str, windows: int, work: Path) -> dict:
    return evaluate_texts(model, CORPORA, windows, work)


def readme_eval(work: Path) -> dict:
    """The README tour's eval of the dense model (4x512 windows of WikiText-2 test), as JSON and as
    the line it prints without --json: the output the README and docs/cli.md show."""
    command = ["eval", "--model", "gemma-3-270m", "--data", str(SHARED / "wikitext2/wiki.test.raw"), "--seq-len", "512",
               "--max-windows", "4"]
    load = os.getloadavg()[0]
    as_json, _ = run_json(command, work / "readme-eval.log")
    printed, _, _ = run_measured(LLMPRUNE + ["-q", *command], work / "readme-eval-text.log")
    return {"json": as_json, "printed": printed.strip().splitlines(), "load_before": round(load, 2)}


def run_arm(name: str, args, work: Path) -> dict:
    out = work / name
    load = os.getloadavg()[0]
    flags, ratio, _ = ARMS[name]
    printed, wall, rss = run_measured(LLMPRUNE + ["compress", "--ratio", str(ratio), "--out", str(out), "--overwrite",
                                                  *flags], work / f"{name}.log")
    report = json.loads((out / "pruning_report.json").read_text())
    row = {"command": f"llmprune compress --ratio {ratio} --out DIR " + " ".join(flags).replace(str(SHARED), "../shared/data"),
           "calibration": report.get("calibration", {}), "printed": printed.strip().splitlines(),
           "wall_seconds": round(wall, 1), "compress_seconds": report["seconds"], "peak_rss_mb": round(rss, 1),
           "load_before": round(load, 2), "calibration_loss": report["calibration_loss"],
           "total_reduction": report["total_reduction"], "scores": evaluate(str(out), args.eval_windows, work)}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def render(results: dict, docs: Path) -> None:
    from report import _replace_section

    runs, dense = results["runs"], results.get("dense", {})
    ref = runs.get("wikitext", {}).get("scores")
    lines = ["## main job: `llmprune compress --ratio 0.2` offline, of the whole model and of the decoder", "",
             "Gemma-3-270M: the default budget counts the whole model (`--of total`: the vocabulary rows the "
             "calibration text never uses go first, then the decoder) at 20% and at 7.5% of the model — the size of "
             f"COMP's cut of 20% of the decoder (`--of decoder`), also shown. Evaluation: {results['eval']}. "
             "`vs wikitext` compares "
             "perplexity with the run calibrated on WikiText-2 valid (32x512). Wall time and peak RSS are of the whole "
             "`llmprune compress` process; load is the 1-minute load average when it started. Each calibration text is "
             "of one of the two evaluation domains (python-docs: the language reference, not the library text "
             "evaluated; wiki.valid: the same corpus as wiki.test), so the mean bits per byte over both texts is the "
             "fair single figure.", "",
             "| run | ppl WikiText-2 | vs wikitext | bits/byte WikiText-2 | ppl Python docs | vs wikitext | "
             "bits/byte Python docs | mean bits/byte | vs wikitext | bits/byte vs dense (WikiText-2, Python docs) | "
             "wall s | peak RSS MiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def mean_bpb(scores: dict) -> float:
        return sum(scores[c]["bits_per_byte"] for c in CORPORA) / len(CORPORA)

    def change_vs_dense(scores: dict) -> dict:
        return {c: scores[c]["bits_per_byte"] / dense[c]["bits_per_byte"] - 1 for c in CORPORA} if dense else {}

    def vs_dense(scores: dict) -> str:
        return ", ".join(f"{v:+.1%}" for v in change_vs_dense(scores).values()) or "—"

    if dense:
        lines.append(f"| dense (no pruning) | {dense['wikitext2']['perplexity']:.2f} | — | "
                     f"{dense['wikitext2']['bits_per_byte']:.4f} | {dense['pydocs']['perplexity']:.2f} | — | "
                     f"{dense['pydocs']['bits_per_byte']:.4f} | {mean_bpb(dense):.4f} | — | — | — | — | — |")
    for name in ARMS:
        row = runs.get(name)
        if not row:
            continue
        s = row["scores"]

        def vs(corpus: str, s=s) -> str:
            return f"{s[corpus]['perplexity'] / ref[corpus]['perplexity'] - 1:+.1%}" if ref else "—"
        label = f"{ARMS[name][2]}, model -{row['total_reduction']:.1%}"
        lines.append(f"| {label} | {s['wikitext2']['perplexity']:.2f} | {vs('wikitext2')} | "
                     f"{s['wikitext2']['bits_per_byte']:.4f} | {s['pydocs']['perplexity']:.2f} | {vs('pydocs')} | "
                     f"{s['pydocs']['bits_per_byte']:.4f} | {mean_bpb(s):.4f} | "
                     f"{f'{mean_bpb(s) / mean_bpb(ref) - 1:+.1%}' if ref else '—'} | {vs_dense(s)} | "
                     f"{row['wall_seconds']:.0f} | "
                     f"{row['peak_rss_mb']:.0f} | {row['load_before']:.2f} |")
    for name, row in runs.items():
        mean = mean_bpb(row["scores"])
        results.setdefault("summary", {})[name] = {"mean_bits_per_byte": mean,
                                                   "mean_bits_per_byte_vs_wikitext": mean / mean_bpb(ref) - 1 if ref else None,
                                                   "bits_per_byte_vs_dense": change_vs_dense(row["scores"])}
    for name in ("default", "decoder"):
        if name in runs:
            lines += ["", f"What `{runs[name]['command']}` printed:", "", "```", *runs[name]["printed"], "```"]
    _replace_section(docs / "benchmarks.md", "main-job", "\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", choices=[*ARMS, "readme-eval"], default=["default", "decoder", "wikitext"])
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the pruned checkpoints")
    p.add_argument("--rerun", action="store_true", help="measure again what the results file already holds")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/main_job.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench/work/main_job")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results)
    results["eval"] = f"{args.eval_windows}x512 windows (+BOS) of " + ", ".join(CORPORA.values())
    if "dense" not in results:
        results["dense"] = evaluate("gemma-3-270m", args.eval_windows, args.work)
    if "readme_eval" not in results or (args.rerun and "readme-eval" in args.arms):
        results["readme_eval"] = readme_eval(args.work)
        save_results(args.results, results)
    runs = results.setdefault("runs", {})
    for stale in [name for name in runs if name not in ARMS]:    # arms this script no longer measures
        del runs[stale]
    results.pop("summary", None)                                # recomputed by render
    for name in [a for a in args.arms if a in ARMS]:
        if name in runs and not args.rerun:
            continue
        print(f"[bench] main job, calibration {name} ...", flush=True)
        runs[name] = run_arm(name, args, args.work)
        print(f"[bench] {name}: {runs[name]['scores']} ({runs[name]['wall_seconds']} s, load "
              f"{runs[name]['load_before']})", flush=True)
        save_results(args.results, results)
    render(results, ROOT / "docs")
    save_results(args.results, results)       # with the summary render computed
    return 0


if __name__ == "__main__":
    sys.exit(main())
