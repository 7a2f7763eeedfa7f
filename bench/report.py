"""Turn benchmark results into docs/benchmarks.md sections and plots (measured numbers only)."""

from __future__ import annotations

import re
from pathlib import Path


def _replace_section(doc: Path, name: str, body: str, first: bool = False) -> None:
    """Write a generated section between its markers; a new one goes at the end, or with `first`
    before the first section (after the page's introduction)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.is_file() else ("# Benchmarks\n\nMeasured on this project's 2-core CPU machine; "
                                                  "every number below was written by a script in `bench/`.\n")
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    elif first and "\n## " in text:
        at = text.index("\n## ") + 1
        text = text[:at] + block + "\n\n" + text[at:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def render_compress(results: dict, docs: Path) -> None:
    runs = results.get("runs", {})
    setup = results.get("setup", {})
    lines = ["## compress: Gemma-3-270M", "",
             f"Calibration: {setup.get('calib')}; evaluation: {setup.get('eval')}. `ratio` is the fraction of "
             "decoder-layer parameters removed (embeddings are 63% of this model and are not pruned); "
             "peak RSS and time are of the whole `llmprune compress` process (model load included).", "",
             "| run | ratio achieved | total reduction | layers dropped | ppl WikiText-2 | ppl Python docs | calib loss | "
             "compress s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    dense = runs.get("dense", {}).get("perplexity", {})
    lines.append(f"| dense | 0 | 0 | — | {_fmt(dense.get('wikitext2'))} | {_fmt(dense.get('pydocs'))} | — | — | — |")
    for key, row in sorted(runs.items(), key=lambda kv: (kv[1].get("ratio", 0), kv[0])):
        if key == "dense":
            continue
        if "error" in row:
            lines.append(f"| {key} | failed: {row['error'][:80]} | | | | | | | |")
            continue
        ppl = row["perplexity"]
        lines.append(
            f"| {key} | {row['ratio_achieved']:.3f} | {row['total_reduction']:.3f} | {row['layers_dropped'] or '—'} | "
            f"{ppl['wikitext2']:.2f} | {ppl['pydocs']:.2f} | {row['calibration_loss']['pruned']:.4f} | "
            f"{row['compress_seconds']:.0f} | {row['peak_rss_mb']:.0f} |")
    comp = runs.get("comp@0.2", {})
    if comp.get("split_candidates"):
        lines += ["", "Split sweep inside `comp@0.2` (`--layer-share auto` tries each whole-layer count that fits; "
                  "held-out calibration loss, lower is better):", "", "| layers dropped | calibration loss |", "|---|---|"]
        lines += [f"| {c['layers_dropped'] or 'none'} | {c['calibration_loss']:.4f} |" for c in comp["split_candidates"]]
    img = _plot_compress(runs, docs / "img" / "compress_ppl.png")
    if img:
        lines += ["", f"![perplexity vs ratio per method](img/{img.name})"]
    _replace_section(docs / "benchmarks.md", "compress", "\n".join(lines))


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot_compress(runs: dict, path: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dense = runs.get("dense", {}).get("perplexity", {})
    for ax, corpus, title in zip(axes, ("wikitext2", "pydocs"), ("WikiText-2 test", "Python docs (out of domain)")):
        methods = sorted({r["method"] for k, r in runs.items() if "@" in k and "[" not in k and "error" not in r})
        for m in methods:
            pts = sorted((r["ratio"], r["perplexity"][corpus]) for k, r in runs.items()
                         if r.get("method") == m and "[" not in k and "error" not in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, linewidth=2.5 if m == "comp" else 1.2)
        if corpus in dense:
            ax.axhline(dense[corpus], color="grey", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of decoder parameters removed")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_scale(result: dict, docs: Path) -> None:
    gib = 2**30
    lines = ["## compress --low-memory at 7B shape", "",
             f"A Llama-2-7B-shaped checkpoint (hidden 4096, MLP 11008, 32 heads, vocab 32000) with random fp16 weights and "
             f"{result['layers']} layers ({result['checkpoint_bytes'] / gib:.2f} GiB, one shard per layer), compressed with "
             f"`llmprune compress --low-memory --ratio 0.2 --layer-share 0`, calibration {result['calibration']}.", "",
             "| layers | checkpoint GiB | peak RSS MiB | peak RSS / checkpoint | peak RSS / full 32-layer 7B | s per layer | "
             "ratio achieved |",
             "|---|---|---|---|---|---|---|",
             f"| {result['layers']} | {result['checkpoint_bytes'] / gib:.2f} | {result['peak_rss_mb']:.0f} | "
             f"{result['peak_rss_share_of_checkpoint']:.1%} | {result['peak_rss_share_of_full_7b']:.1%} | "
             f"{result['seconds_per_layer']:.1f} | {result['ratio_achieved']:.3f} |"]
    _replace_section(docs / "benchmarks.md", "scale", "\n".join(lines))


def render_export(results: dict, docs: Path) -> None:
    setup, steps, summary = results.get("setup", {}), results.get("steps", {}), results.get("summary", {})
    mib = 2**20
    lines = ["## export: Gemma-3-270M on ONNX Runtime (CPU), PyTorch and llama.cpp", "",
             f"Dense and pruned-{setup.get('ratio')} (`llmprune compress --ratio {setup.get('ratio')}`, calibration "
             f"{setup.get('calib')}) exported with `llmprune export --quantize int8 int4`. Perplexity: "
             f"{setup.get('eval')}, the same token windows for every engine. Prefill: one "
             f"{setup.get('prefill_tokens')}-token prompt (median of 3). Decode: {setup.get('decode')} (median of 2). "
             f"{setup.get('threads')} threads for every engine (ONNX Runtime intra-op, torch, llama.cpp), on a "
             f"{setup.get('cpu_count')}-core machine. The ONNX Runtime and llama.cpp rows were measured on the idle "
             "machine; the exports, the PyTorch rows and the 1-thread table ran while other jobs shared the cores "
             "(1-minute load averages per step below; those timings are inflated). Peak RSS is of the measuring process "
             "(model load, the tokenized evaluation text and a 512-token prefill included). The ONNX graph "
             "(optimum's layout) and PyTorch compute the logits of every prompt position in the prefill — "
             "512 × 262k LM-head products, more work than the decoder layers — while llama.cpp computes the "
             "last position's only. llama.cpp (llama-cpp-python, built here from source) runs without its extra CPU "
             "buffer types (AMX and weight repacking), whose AMX kernel segfaults on this VM; its peak RSS includes "
             "its perplexity run (logits of every position). PyTorch eager decode varied between 0.25 and 1.2 s a "
             "token in a re-check on the busy machine: treat its decode column as a rough lower bound.", "",
             "| model | engine | precision | file MiB | size vs fp32 | perplexity | change vs fp32 | prefill 512 s | "
             "prefill tok/s | decode tok/s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("dense", "pruned"):
        exp = steps.get(f"export:{name}", {})
        variants = exp.get("variants", {})
        for prec in ("fp32", "int8", "int4"):
            v, m = variants.get(prec, {}), steps.get(f"onnx:{name}:{prec}", {})
            ppl = v.get("perplexity") or {}
            change = ppl.get("change")
            lines.append(
                f"| {name} | ONNX Runtime | {prec} | {_fmt(v['onnx_bytes'] / mib if v.get('onnx_bytes') else None, '.0f')} | "
                f"{_fmt(v.get('size_vs_fp32'), '.1%')} | {_fmt(ppl.get('onnx'))} | "
                f"{'—' if change is None else format(change, '+.1%')} | "
                f"{_fmt(m.get('prefill_seconds'))} | {_fmt(m.get('prefill_tokens_per_s'), '.0f')} | "
                f"{_fmt(m.get('decode_tokens_per_s'), '.1f')} | {_fmt(m.get('peak_rss_mb'), '.0f')} |")
        t = steps.get(f"torch:{name}:fp32", {})
        tppl = (variants.get("fp32", {}).get("perplexity") or {}).get("torch")
        lines.append(f"| {name} | PyTorch eager | fp32 | — | — | {_fmt(tppl)} | — | {_fmt(t.get('prefill_seconds'))} | "
                     f"{_fmt(t.get('prefill_tokens_per_s'), '.0f')} | {_fmt(t.get('decode_tokens_per_s'), '.1f')} | "
                     f"{_fmt(t.get('peak_rss_mb'), '.0f')} |")
    ll = steps.get("llama.cpp:dense:Q4_K_M", {})
    if "skipped" in ll or "error" in ll:
        lines.append("| dense | llama.cpp | Q4_K_M | — | — | — | — | — | — | — | — |\n\n"
                     f"llama.cpp row: {ll.get('skipped') or ll.get('error')}")
    elif ll:
        lines.append(f"| dense (original GGUF) | llama.cpp {ll.get('version', '')} | Q4_K_M | {ll['file_bytes'] / mib:.0f} | — | "
                     f"{_fmt(ll.get('perplexity'))} | — | {_fmt(ll.get('prefill_seconds'))} | "
                     f"{_fmt(ll.get('prefill_tokens_per_s'), '.0f')} | "
                     f"{_fmt(ll.get('decode_tokens_per_s'), '.1f')} | {_fmt(ll.get('peak_rss_mb'), '.0f')} |")
    one = [(k, steps[k]) for k in ("onnx:dense:int4@1thread", "onnx:pruned:int4@1thread", "llama.cpp:dense:Q4_K_M@1thread")
           if isinstance(steps.get(k), dict) and "decode_tokens_per_s" in steps[k]]
    if one:
        lines += ["", "The same on **1 thread**, measured while other jobs ran (with the cores shared, llama.cpp's 2 "
                  "OpenMP threads spin-wait on each other and its 2-thread decode collapsed to 1.5 tokens/s; on 1 "
                  "thread both engines degrade gracefully):", "",
                  "| run | prefill 512 s | prefill tok/s | decode tok/s | peak RSS MiB |", "|---|---|---|---|---|"]
        for key, m in one:
            lines.append(f"| {key.replace('@1thread', '')} | {_fmt(m.get('prefill_seconds'))} | "
                         f"{_fmt(m.get('prefill_tokens_per_s'), '.0f')} | {_fmt(m.get('decode_tokens_per_s'), '.1f')} | "
                         f"{_fmt(m.get('peak_rss_mb'), '.0f')} |")
    tg = summary.get("targets", {})
    if tg:
        lines += ["", "Targets of the export issue:", ""]
        r = tg.get("pruned_int4_decode_vs_llama_cpp")
        lines.append(f"- pruned int4 decode vs llama.cpp Q4_K_M (target ≥ 1.0×): {_fmt(r, '.2f')}× on 2 threads, "
                     f"{_fmt(tg.get('pruned_int4_decode_vs_llama_cpp_1thread'), '.2f')}× on 1 thread")
        for prec in ("fp32", "int8", "int4"):
            s = tg.get(f"decode_speedup_{prec}")
            if s:
                lines.append(f"- pruned/dense decode speed-up, {prec}: {s['speedup']:.3f}× vs ideal {s['ideal']:.3f}× "
                             f"(weight bytes dense/pruned) = {s['of_ideal']:.2f} of ideal (target ≥ 0.9)")
        for name in ("dense", "pruned"):
            lines.append(f"- {name}: int4 size {_fmt(tg.get(f'{name}_int4_size_vs_fp32'), '.1%')} of fp32 (target ≤ 30%); "
                         f"int8 perplexity change {_fmt(tg.get(f'{name}_int8_ppl_change'), '+.2%')} (target within 3%); "
                         f"int4 perplexity change {_fmt(tg.get(f'{name}_int4_ppl_change'), '+.1%')}")
    lines += ["", "Wall time and peak RSS per step (each step its own process):", "",
              "| step | wall s | peak RSS MiB | load average before → after (1 min) |", "|---|---|---|---|"]
    for key, row in steps.items():
        if isinstance(row, dict) and "wall_seconds" in row:
            rss = row.get("process_peak_rss_mb", row.get("peak_rss_mb"))
            load = (f"{row['load_avg_before'][0]:.1f} → {row['load_avg_after'][0]:.1f}"
                    if row.get("load_avg_before") and row.get("load_avg_after") else "—")
            lines.append(f"| {key} | {row['wall_seconds']:.0f} | {_fmt(rss, '.0f')} | {load} |")
    _replace_section(docs / "benchmarks.md", "export", "\n".join(lines))


_DEPLOY_TEXTS = (("wikitext2", "WikiText-2"), ("pydocs", "Python docs"), ("python_source", "Python source"))


def render_deploy(results: dict, docs: Path) -> None:
    """The deploy section of docs/benchmarks.md (bench/deploy.py) and docs/img/deploy.png."""
    import statistics

    setup, steps, summary = results.get("setup", {}), results.get("steps", {}), results.get("summary", {})
    rows, targets = summary.get("rows", {}), summary.get("targets", {})
    m, mib = setup.get("measure", {}), 2**20
    sizes = setup.get("vocab_sizes", {})
    loads = [s["load_avg_before"][0] for k, s in steps.items() if k.startswith("measure:") and s.get("load_avg_before")]
    src = setup.get("python_source", {})
    base = [r["rss_after_imports_mb"] for r in rows.values() if r.get("rss_after_imports_mb")]
    lines = [f"## deploy: vocabulary pruning vs quantizing the dense model ({setup.get('model')}, ONNX Runtime CPU)", "",
             f"Six artifacts — dense, decoder-0.2 (`--ratio 0.2`), vocab-16k/32k/64k (`--ratio 0 --vocab "
             f"{'/'.join(str(sizes.get(k, k)) for k in ('16k', '32k', '64k'))}`) and vocab-32k+decoder-0.2 — compressed "
             f"with calibration {setup.get('calib')} and the vocabulary ranked on WikiText-2 valid + Python docs "
             f"(howto, faq, library, reference; not tutorial), each exported with `llmprune export {setup.get('export')}` "
             f"and measured in a fresh process on ONNX Runtime with {m.get('threads')} intra-op threads "
             f"({setup.get('cpu_count')}-core machine; 1-minute load average "
             f"{_fmt(min(loads) if loads else None, '.1f')}–{_fmt(max(loads) if loads else None, '.1f')} "
             "before the measurements). "
             f"Prefill: one {m.get('prefill_tokens')}-token prompt (median of {m.get('prefill_runs')}); decode: greedy "
             f"{m.get('decode_tokens')} new tokens after a {m.get('decode_prompt')}-token prompt with the KV cache (median of "
             f"{m.get('decode_runs')}), in tokens/s and in bytes of text/s — "
             "tokens/s × the artifact's own UTF-8 bytes per token on "
             f"WikiText-2 test, the fair speed across tokenizers (the greedy sample's own bytes/s, which depends on what "
             f"it happens to say, is in the JSON). "
             f"Bits per byte: {setup.get('eval')}, of WikiText-2 test, Python docs (tutorial.txt) and Python source "
             f"(the stdlib argparse.py of Python {src.get('python')}, sha256 {str(src.get('sha256'))[:12]}…, out of domain); "
             "file MiB counts every file the runtime needs (ONNX graph and weights, tokenizer, config); peak RSS is the "
             "measuring process's after tokenizer and model load, prefill and decode "
             "(before the evaluation texts are tokenized and scored), in brackets "
             f"above the {_fmt(statistics.median(base) if base else None, '.0f')} MiB its imports (Python, numpy, torch, "
             "transformers, onnxruntime) take in every row.", "",
             "| artifact | precision | file MiB | size vs dense | bpb WikiText-2 | bpb Python docs | bpb Python source | "
             "decode tok/s | decode bytes/s | prefill tok/s | peak RSS MiB (above imports) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _key, r in rows.items():
        if r.get("error"):
            lines.append(f"| {r['artifact']} | {r['precision']} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        cells = []
        for text, _ in _DEPLOY_TEXTS:
            bpb, change = r["bits_per_byte"].get(text), r["bpb_change_vs_dense"].get(text)
            cells.append(_fmt(bpb, ".3f") + ("" if r["artifact"] == "dense" or change is None else f" ({change:+.1%})"))
        size = "—" if r["artifact"] == "dense" else _fmt(r.get("size_vs_dense"), ".0%")
        lines.append(f"| {r['artifact']} | {r['precision']} | "
                     f"{_fmt(r['file_bytes'] / mib if r.get('file_bytes') else None, '.1f')} | "
                     f"{size} | {' | '.join(cells)} | {_fmt(r.get('decode_tokens_per_s'), '.1f')} | "
                     f"{_fmt(r.get('decode_bytes_per_s'), '.0f')} | {_fmt(r.get('prefill_tokens_per_s'), '.0f')} | "
                     f"{_fmt(r.get('peak_rss_mb'), '.0f')} ({_fmt(r.get('peak_rss_over_imports_mb'), '.0f')}) |")
    if targets:
        names = list(targets)
        what = {"file_ratio": "int4 files vs dense int4", "decode_bytes_per_s_ratio": "decode bytes/s vs dense int4",
                "bpb_change_wikitext2": "bits/byte change vs dense int4, WikiText-2",
                "bpb_change_pydocs": "bits/byte change vs dense int4, Python docs",
                "bpb_change_python_source": "bits/byte change vs dense int4, Python source (out of domain)"}
        lines += ["", "Targets of the issue, vocabulary-only int4 against dense int4 (computed, not asserted):", "",
                  f"| target | goal | {' | '.join(names)} |", "|---|---|" + "---|" * len(names)]
        for k, label in what.items():
            goal = targets[names[0]].get(k, {}).get("target") or "shown"
            cells = []
            for name in names:
                t = targets[name].get(k, {})
                x = t.get("value")
                shown = "—" if x is None else (f"{x:+.1%}" if k.startswith("bpb")
                                               else f"{x:.2f}×" if "bytes_per_s" in k else f"{x:.2f}")
                verdict = "" if t.get("met") is None else (" ✅ met" if t["met"] else " ❌ not met")
                cells.append(shown + verdict)
            lines.append(f"| {label} | {goal} | {' | '.join(cells)} |")
    lines += _across_runs(rows, Path(__file__).resolve().parent / "results" / "export.json")
    render_recipes(results, docs)
    img = _plot_deploy(rows, docs / "img" / "deploy.png")
    if img:
        lines += ["", f"![bits per byte on WikiText-2 against file size and decode bytes/s](img/{img.name})"]
    else:
        lines += ["", "(No plot: matplotlib is not installed.)"]
    _replace_section(docs / "benchmarks.md", "deploy", "\n".join(lines))


def _across_runs(rows: dict, export_results: Path) -> list[str]:
    """A sentence on the same kind of artifact decoding at another speed in the export section's run:
    speeds compare within one table (one run, one load), not across tables."""
    import json

    here = next((r.get("decode_tokens_per_s") for r in rows.values()
                 if r.get("artifact") == "decoder-0.2" and r.get("precision") == "int4"), None)
    try:
        there = json.loads(export_results.read_text())["summary"]["pruned:int4"]["decode_tokens_per_s"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not here or not there:
        return []
    return ["", f"Decode speeds compare within one table. The export section measured a pruned-0.2 int4 artifact of "
                f"the same recipe at {there:.1f} tokens/s in its own run; this run measured {here:.1f} "
                f"({here / there - 1:+.0%}): runs on this shared 2-core machine, at other loads and on other days, differ "
                "by that much."]


# Goals of the recipes table: (goal, the most MiB every file the runtime needs may take).
RECIPE_GOALS = (("phone, at most 100 MB", 100), ("phone, at most 150 MB", 150), ("desktop CPU, at most 350 MB", 350))


def render_recipes(results: dict, docs: Path) -> None:
    """The table docs/benchmarks.md opens with: for each size goal, the measured artifact of
    bench/deploy.py with the lowest mean bits per byte over its three texts that fits, with the
    commands that make it. Nothing is estimated: an artifact not measured is not a candidate."""
    setup, rows = results.get("setup", {}), results.get("summary", {}).get("rows", {})
    dense = rows.get("dense:fp32")
    ok = [r for r in rows.values() if not r.get("error") and r.get("file_bytes") and r.get("bits_per_byte")]
    if not ok or not dense:
        return

    def mean_bpb(r: dict) -> float:
        return sum(r["bits_per_byte"][k] for k, _ in _DEPLOY_TEXTS) / len(_DEPLOY_TEXTS)

    lines = ["## Recipes: for this goal, these settings", "",
             f"Each row is an artifact `bench/deploy.py` made and measured ({setup.get('model')}, ONNX Runtime on "
             f"{setup.get('measure', {}).get('threads')} CPU threads; files = every file the runtime needs): among the "
             "measured artifacts that fit the goal, the one with the lowest mean bits per byte over WikiText-2 test, "
             "the Python docs and Python source (change against the dense fp32 model in brackets). The vocabulary "
             "was ranked on WikiText-2 valid and the Python docs (`--vocab-data`): rank on text like yours.", "",
             "| goal | compress | export | files MB | bits/byte WikiText-2 | Python docs | Python source | "
             "decode bytes/s |", "|---|---|---|---|---|---|---|---|"]
    for goal, limit in RECIPE_GOALS:
        fits = [r for r in ok if r["file_bytes"] <= limit * 1e6]
        if not fits:
            lines.append(f"| {goal} | no measured artifact fits | | | | | | |")
            continue
        best = min(fits, key=mean_bpb)
        flags = (setup.get("artifacts") or {}).get(best["artifact"])
        compress = "— (the dense model)" if not flags else f"`llmprune compress {' '.join(flags)} --vocab-data ...`"
        cells = [f"{best['bits_per_byte'][k]:.3f} ({best['bits_per_byte'][k] / dense['bits_per_byte'][k] - 1:+.1%})"
                 for k, _ in _DEPLOY_TEXTS]
        lines.append(f"| {goal} | {compress} | `llmprune export --quantize {best['precision']}` "
                     f"({best['precision']}) | {best['file_bytes'] / 1e6:.1f} | {' | '.join(cells)} | "
                     f"{best['decode_bytes_per_s']:.0f} |")
    lines += ["", "The same table, any budget: the deploy section below lists every measured artifact."]
    _replace_section(docs / "benchmarks.md", "recipes", "\n".join(lines), first=True)


def _plot_deploy(rows: dict, path: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    points = [r for r in rows.values() if not r.get("error") and r["bits_per_byte"].get("wikitext2") is not None]
    if not points:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts = list(dict.fromkeys(r["artifact"] for r in points))
    colors = {a: plt.get_cmap("tab10")(i) for i, a in enumerate(artifacts)}
    markers = {"fp32": "o", "int8": "s", "int4": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (field, xlabel) in zip(axes, (("file_bytes", "file MiB (log)"), ("decode_bytes_per_s", "decode bytes of text / s"))):
        for r in points:
            x = r.get(field)
            if x is None:
                continue
            x = x / 2**20 if field == "file_bytes" else x
            y = r["bits_per_byte"]["wikitext2"]
            star = r["artifact"] == "dense" and r["precision"] == "int4"
            ax.scatter([x], [y], color=colors[r["artifact"]], marker="*" if star else markers.get(r["precision"], "o"),
                       s=260 if star else 40, edgecolors="black" if star else "none", zorder=3 if star else 2,
                       label=f"{r['artifact']} {r['precision']}")
            ax.annotate(f"{r['artifact']} {r['precision']}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6.5,
                        fontweight="bold" if star else "normal")
        if field == "file_bytes":
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("bits per byte, WikiText-2 test (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].set_title("quality vs size (★ = dense int4)")
    axes[1].set_title("quality vs decode speed (★ = dense int4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
