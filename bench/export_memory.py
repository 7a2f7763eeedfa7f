"""What `llmprune export --quantize int8 int4` of the dense Gemma-3-270M costs, as a user runs it,
and the same with `--ort --genai` (the phone path): wall time, the process's peak RSS against the
fp32 model's size, and each step's time and memory high-water mark (the export's own step log).
One fresh process a run; the machine's load is noted before each. Results go to
bench/results/export_memory.json and a section of docs/benchmarks.md. Nothing here asserts a
timing or a size.

    python bench/export_memory.py             # about 2.5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_cli_measured, save_results  # noqa: E402
from report import _replace_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "export_memory.json"
RUNS = {"default": [], "ort_genai": ["--ort", "--genai"]}


def measure(model: str, work: Path, extra: list[str]) -> dict:
    load = os.getloadavg()[0]
    out = work / "onnx"
    report, wall, rss = run_cli_measured(["export", "--model", model, "--out", str(out), "--overwrite",
                                          "--quantize", "int8", "int4", *extra], work / "export.log")
    fp32_bytes = report["variants"]["fp32"]["sizes"]["onnx_bytes"]
    peak_mb = max(rss, report["peak_rss_mb"])
    return {"model": model, "args": ["--quantize", "int8", "int4", *extra], "load_before": round(load, 2),
            "wall_seconds": round(wall, 1), "peak_rss_mb": round(peak_mb, 1), "fp32_model_bytes": fp32_bytes,
            "peak_vs_fp32_model": round(peak_mb * 2**20 / fp32_bytes, 2), "steps": report["steps"],
            "sizes": {k: v["sizes"]["onnx_bytes"] for k, v in report["variants"].items()}}


def write_docs(runs: dict) -> None:
    lines = ["## Export: time and memory", ""]
    for run in runs.values():
        lines += [f"`llmprune export --model {run['model']} {' '.join(run['args'])}` in one fresh process (`python "
                  f"bench/export_memory.py`, load {run['load_before']} before the run): {run['wall_seconds']} s wall, "
                  f"peak RSS {run['peak_rss_mb']:.0f} MiB = {run['peak_vs_fp32_model']}× the fp32 model "
                  f"({run['fp32_model_bytes'] / 1e9:.2f} GB).", "",
                  "| step | seconds | peak RSS MiB |", "|---|---|---|"]
        lines += [f"| {s['step']} | {s['seconds']} | {s['peak_rss_mb']:.0f} |" for s in run["steps"]]
        lines.append("")
    _replace_section(ROOT / "docs" / "benchmarks.md", "export-memory", "\n".join(lines).rstrip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    args = p.parse_args()
    runs = {}
    for name, extra in RUNS.items():
        with tempfile.TemporaryDirectory(prefix="llmprune-bench-export-memory-") as tmp:
            runs[name] = measure(args.model, Path(tmp), extra)
        print(f"[export-memory] {' '.join(runs[name]['args'])}: {runs[name]['wall_seconds']} s, peak RSS "
              f"{runs[name]['peak_rss_mb']:.0f} MiB ({runs[name]['peak_vs_fp32_model']}x the fp32 model)")
    save_results(RESULTS, runs)
    write_docs(runs)
    print(f"[export-memory] -> {RESULTS}")


if __name__ == "__main__":
    main()
