"""`compress --target-mb M` on the real Gemma-3-270M, measured as a user runs it: the plan it
chooses (and every candidate it measured), its predicted size against the exported files
(`llmprune export --quantize int4`: every file the runtime needs), and its held-out quality against
the vocabulary-only plan of about the same size (the candidate with the decoder untouched). Each
command runs in its own process (wall time, peak RSS, load noted); quality is bits per byte of the
fp32 checkpoint on WikiText-2 test and the Python docs' library text (8x512 windows, as
bench/main_job.py). Results go to bench/results/target.json and a section of docs/benchmarks.md.
Nothing here asserts a timing or a size.

    python bench/target.py                    # --target-mb 100 (int4), both calibrations: about 25 minutes
    python bench/target.py --targets 100 150 --rerun
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

from llmprune import artifact  # noqa: E402

CORPORA = {"wikitext2": "wikitext2/wiki.test.raw", "pydocs": "pydocs/library.txt"}
CALIBS = {"python-docs": [], "wikitext": ["--calib", str(SHARED / "wikitext2/wiki.valid.tokens")]}


def evaluate(model: str, windows: int, work: Path) -> dict:
    return evaluate_texts(model, CORPORA, windows, work)


def artifact_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir())
            if p.is_file() and (p.suffix in (".onnx", ".onnx_data") or p.name in artifact.RUNTIME_FILES)}


def compress(flags: list[str], out: Path, work: Path, name: str) -> dict:
    load = os.getloadavg()[0]
    printed, wall, rss = run_measured(LLMPRUNE + ["compress", "--out", str(out), "--overwrite", *flags],
                                      work / f"{name}.log")
    report = json.loads((out / "pruning_report.json").read_text())
    command = ("llmprune compress " + " ".join(flags) + " --out DIR").replace(str(SHARED), "../shared/data")
    return {"command": command, "printed": printed.strip().splitlines(),
            "wall_seconds": round(wall, 1), "peak_rss_mb": round(rss, 1), "load_before": round(load, 2),
            "total_reduction": report["total_reduction"], "target": report.get("target"),
            "vocabulary": {k: (report.get("vocabulary") or {}).get(k) for k in ("kept", "before", "coverage")},
            "ratio_achieved": report.get("ratio_achieved"), "layers_dropped": report.get("layers_dropped")}


def export(model: Path, out: Path, work: Path, name: str, precision: str, keep_8bit: list[str] | None) -> dict:
    load = os.getloadavg()[0]
    report, wall = run_json(["export", "--model", str(model), "--out", str(out), "--overwrite", "--quantize", precision,
                             *artifact.keep_8bit_flags(keep_8bit)], work / f"export-{name}.log")
    files = artifact_bytes(out / precision if precision != "fp32" else out)
    return {"files": files, "bytes": sum(files.values()), "wall_seconds": round(wall, 1), "load_before": round(load, 2),
            "peak_rss_mb": report.get("peak_rss_mb")}


def run_target(mb: float, calib: str, args, work: Path) -> dict:
    name = f"target-{mb:g}-{calib}"
    out = work / name
    row = compress(["--target-mb", f"{mb:g}", "--precision", args.precision, *CALIBS[calib]], out, work, name)
    row["export"] = export(out, work / f"{name}-onnx", work, name, args.precision, row["target"]["chosen"].get("keep_8bit"))
    predicted = row["target"]["predicted"]["total"]
    row["export"]["vs_predicted"] = row["export"]["bytes"] / predicted - 1
    row["scores"] = evaluate(str(out), args.eval_windows, work)
    # the same budget without the trade: the candidate that leaves the decoder untouched
    plain = next((c for c in row["target"]["candidates"] if c["decoder_ratio"] == 0 and c["vocab"]), None)
    if plain and row["target"]["chosen"]["decoder_ratio"] != 0:
        alt = work / f"{name}-vocab-only"
        row["vocab_only"] = compress(["--ratio", "0", "--vocab", str(plain["vocab"]), *CALIBS[calib]], alt, work,
                                     f"{name}-vocab-only")
        row["vocab_only"]["scores"] = evaluate(str(alt), args.eval_windows, work)
        shutil.rmtree(alt, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / f"{name}-onnx", ignore_errors=True)
    return row


def render(results: dict, docs: Path) -> None:
    from report import _replace_section

    dense = results.get("dense", {})
    lines = ["## target: `llmprune compress --target-mb M` (Gemma-3-270M, int4)", "",
             "The plan `--target-mb` chose with each calibration text (python-docs, the default, or WikiText-2 "
             "valid), the candidates it measured (bits per byte of the held-out tail of that text), the size it "
             "predicted against the exported int4 files (every file the "
             "runtime needs), and the fp32 checkpoint's bits per byte on WikiText-2 test and the Python docs' library "
             f"text ({results.get('eval')}); `vocabulary only` is the plan of the same budget with the decoder untouched. "
             "Wall time and peak RSS are of the whole compress process; load is the 1-minute load average before it.", "",
             "| run | chosen | predicted MB | exported MB | export vs predicted | bits/byte WikiText-2 | "
             "bits/byte Python docs | held-out bits/byte | wall s | peak RSS MiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    if dense:
        lines.append(f"| dense (fp32 checkpoint) | — | — | — | — | {dense['wikitext2']['bits_per_byte']:.4f} | "
                     f"{dense['pydocs']['bits_per_byte']:.4f} | — | — | — | — |")
    for name, row in results.get("runs", {}).items():
        t, s = row["target"], row["scores"]
        chosen = f"decoder -{t['chosen']['decoder_ratio']:.0%}, {t['chosen']['vocab']:,} ids"
        lines.append(f"| {name} | {chosen} | {t['predicted']['total'] / 1e6:.1f} | {row['export']['bytes'] / 1e6:.1f} | "
                     f"{row['export']['vs_predicted']:+.2%} | {s['wikitext2']['bits_per_byte']:.4f} | "
                     f"{s['pydocs']['bits_per_byte']:.4f} | {t['chosen']['heldout_bpb']:.4f} | {row['wall_seconds']:.0f} | "
                     f"{row['peak_rss_mb']:.0f} | {row['load_before']:.2f} |")
        alt = row.get("vocab_only")
        if alt:
            plain = next(c for c in t["candidates"] if c["decoder_ratio"] == 0)
            lines.append(f"| {name}, vocabulary only | decoder -0%, {plain['vocab']:,} ids | "
                         f"{plain['predicted_bytes'] / 1e6:.1f} | — | — | {alt['scores']['wikitext2']['bits_per_byte']:.4f} | "
                         f"{alt['scores']['pydocs']['bits_per_byte']:.4f} | {plain['heldout_bpb']:.4f} | "
                         f"{alt['wall_seconds']:.0f} | {alt['peak_rss_mb']:.0f} | {alt['load_before']:.2f} |")
    for row in results.get("runs", {}).values():
        lines += ["", f"What `{row['command']}` printed:", "", "```", *row["printed"], "```"]
    _replace_section(docs / "benchmarks.md", "target", "\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", type=float, default=[100.0])
    p.add_argument("--precision", default="int4", choices=("fp32", "int8", "int4"))
    p.add_argument("--calibs", nargs="+", default=list(CALIBS), choices=list(CALIBS),
                   help="calibration (and ranking) text of each run")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and exports")
    p.add_argument("--rerun", action="store_true", help="measure again what the results file already holds")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/target.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench/work/target")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results)
    results["eval"] = f"{args.eval_windows}x512 windows (+BOS) of " + ", ".join(CORPORA.values())
    if "dense" not in results:
        results["dense"] = evaluate("gemma-3-270m", args.eval_windows, args.work)
        save_results(args.results, results)
    runs = results.setdefault("runs", {})
    for mb, calib in [(mb, calib) for mb in args.targets for calib in args.calibs]:
        name = f"target-{mb:g}-{calib}"
        if name in runs and not args.rerun:
            continue
        print(f"[bench] {name} ...", flush=True)
        runs[name] = run_target(mb, calib, args, args.work)
        print(f"[bench] {name}: predicted {runs[name]['target']['predicted']['total']:,} exported "
              f"{runs[name]['export']['bytes']:,}; {runs[name]['scores']}", flush=True)
        save_results(args.results, results)
    render(results, ROOT / "docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
