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


def pareto_front(points, minimise_x: bool) -> list:
    """The keys of the points no other point beats, sorted by x (ties keep the input order).
    `points` are (x, y, key); y is always minimised, x is minimised or (minimise_x=False) maximised.
    A point is beaten when another is at least as good on both axes and better on one, so two
    points at the same (x, y) both stay on the frontier."""
    sign = 1 if minimise_x else -1

    def beats(a, b) -> bool:
        return sign * a[0] <= sign * b[0] and a[1] <= b[1] and (sign * a[0] < sign * b[0] or a[1] < b[1])

    front = [p for p in points if not any(beats(q, p) for q in points)]
    return [key for _, _, key in sorted(front, key=lambda p: p[0])]


def _overlap(a, b) -> float:
    """Area shared by two (x0, y0, x1, y1) boxes."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place_labels(anchors, sizes, obstacles, bounds, gap: float = 4.0) -> list[tuple[float, float]]:
    """Greedy, deterministic label placement in display units: for each label in turn, the first
    candidate box around its anchor (right/left/above/below, nearest first) that stays inside
    `bounds` and overlaps neither the obstacles nor the labels placed before it; when none is free,
    the candidate with the least overlap. Returns each label's lower-left corner."""
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for (ax_, ay), (w, h) in zip(anchors, sizes):
        best, best_cost = None, None
        for d in (gap, 3 * gap, 6 * gap, 10 * gap):
            for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)):
                x0 = ax_ + (d if dx > 0 else -w - d if dx < 0 else -w / 2)
                y0 = ay + (d if dy > 0 else -h - d if dy < 0 else -h / 2)
                box = (x0, y0, x0 + w, y0 + h)
                outside = w * h - _overlap(box, bounds)
                cost = outside * 10 + sum(_overlap(box, o) for o in [*obstacles, *placed])
                if best_cost is None or cost < best_cost:
                    best, best_cost = box, cost
                if cost == 0:
                    break
            if best_cost == 0:
                break
        placed.append(best)
        corners.append((best[0], best[1]))
    return corners


def _label_points(ax, items, obstacles, fontsize: float = 7) -> None:
    """Write `items` (x, y, text, bold) next to their data points without overlapping each other,
    the `obstacles` (display boxes) or the axes' edge. Call after the figure's layout is final."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    texts = [ax.text(0, 0, t, fontsize=fontsize, fontweight="bold" if bold else "normal") for _, _, t, bold in items]
    sizes = [(b.width, b.height) for b in (t.get_window_extent(renderer) for t in texts)]
    for t in texts:
        t.remove()
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _, _ in items]
    bounds = tuple(ax.get_window_extent(renderer).extents)
    for (x, y, text, bold), (ax_, ay), (x0, y0) in zip(items, anchors, place_labels(anchors, sizes, obstacles, bounds)):
        ax.annotate(text, (x, y), xytext=((x0 - ax_) * 72 / fig.dpi, (y0 - ay) * 72 / fig.dpi), textcoords="offset points",
                    ha="left", va="bottom", fontsize=fontsize, fontweight="bold" if bold else "normal", zorder=5)


def _point_boxes(ax, xy, half: float = 6.0) -> list[tuple[float, float, float, float]]:
    """Display boxes around data points (markers) for label placement to avoid."""
    out = []
    for x, y in xy:
        px, py = ax.transData.transform((x, y))
        out.append((px - half, py - half, px + half, py + half))
    return out


def _segment_boxes(ax, xs, ys, minimise_x: bool, half: float = 1.5) -> list[tuple[float, float, float, float]]:
    """Display boxes around the axis-aligned segments of the frontier's step line."""
    corners = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        corners.append((x, y))
        if i + 1 < len(xs):
            corners.append((xs[i + 1], y) if minimise_x else (x, ys[i + 1]))
    pts = [ax.transData.transform(c) for c in corners]
    return [(min(a[0], b[0]) - half, min(a[1], b[1]) - half, max(a[0], b[0]) + half, max(a[1], b[1]) + half)
            for a, b in zip(pts, pts[1:])]


def _draw_front(ax, front_xy, minimise_x: bool, label: str | None = "Pareto frontier") -> None:
    """The frontier as a step line (the edge of the region its points beat) with its points ringed."""
    if not front_xy:
        return
    xs, ys = [p[0] for p in front_xy], [p[1] for p in front_xy]
    ax.step(xs, ys, where="post" if minimise_x else "pre", color="black", linewidth=1.1, alpha=0.7, zorder=1,
            label=label)
    ax.scatter(xs, ys, s=190, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4,
               label=None if label is None else "on the frontier")


_METHOD_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h")


def _compress_series(runs: dict) -> dict[str, list[tuple[float, dict]]]:
    """Method -> [(ratio, perplexity by corpus)] sorted by ratio, for the plain `method@ratio` runs
    (variants in brackets and failed runs are in the table only)."""
    series: dict[str, list[tuple[float, dict]]] = {}
    for key, r in runs.items():
        if "@" in key and "[" not in key and "error" not in r and r.get("method") and r.get("perplexity"):
            series.setdefault(r["method"], []).append((r["ratio"], r["perplexity"]))
    return {m: sorted(series[m], key=lambda p: p[0]) for m in sorted(series)}


def dodge(single: list, taken: set, front: set, step: float = 8.0) -> dict:
    """Sideways offsets (points) for markers that share a ratio, so none hides another: `single`
    are the (ratio, key) of the marker-only methods, `taken` the ratios a line already has a point
    at, `front` the keys on the Pareto frontier. A frontier marker stays on its true x (offset 0),
    and so does a marker alone at its ratio; the rest take -step, +step, -2*step, ... in order."""
    out: dict = {}
    for ratio in sorted({r for r, _ in single}):
        keys = sorted((k for r, k in single if r == ratio), key=lambda k: (k not in front, str(k)))
        slots = [0.0] if ratio not in taken and keys[0] not in front else []
        if keys[0] in front:
            out[keys.pop(0)] = 0.0
        i = 1
        while len(slots) < len(keys):
            slots += [-i * step, i * step]
            i += 1
        out.update(zip(keys, slots))
    return out


def _compress_points(series: dict, corpus: str) -> dict[str, list[tuple[float, float]]]:
    return {m: [(ratio, ppl[corpus]) for ratio, ppl in runs if ppl.get(corpus) is not None] for m, runs in series.items()}


def _compress_panel(ax, series: dict, corpus: str, dense: float | None, styles: dict, first: bool) -> None:
    """One corpus: a line per method measured at several ratios, markers only for a method measured
    at one (spread sideways where they share a ratio), the dense model as a labelled reference line,
    and the Pareto frontier of all of them."""
    from matplotlib.transforms import ScaledTranslation

    by_method = _compress_points(series, corpus)
    pts = [(x, y, (m, x)) for m, xy in by_method.items() for x, y in xy]
    front = pareto_front(pts, minimise_x=False)
    lines = {x for xy in by_method.values() if len(xy) > 1 for x, _ in xy}
    shift = dodge([(xy[0][0], (m, xy[0][0])) for m, xy in by_method.items() if len(xy) == 1], lines, set(front))
    for m, xy in by_method.items():
        color, marker = styles[m]
        many = len(xy) > 1
        dx = 0.0 if many or not xy else shift.get((m, xy[0][0]), 0.0)
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker=marker, color=color, markersize=7,
                linestyle="-" if many else "none", linewidth=2.5 if m == "comp" else 1.3,
                markerfacecolor=color if many else "none", markeredgewidth=1.6, label=m, zorder=3,
                transform=ax.transData + ScaledTranslation(dx / 72, 0, ax.figure.dpi_scale_trans))
    where = {k: (x, y) for x, y, k in pts}
    _draw_front(ax, [where[k] for k in front], minimise_x=False, label="Pareto frontier" if first else None)
    if dense is not None:
        ax.axhline(dense, color="grey", linestyle="--", linewidth=1.2, label="dense (nothing removed)" if first else None)
        ax.annotate(f"dense: {dense:.1f}", (1, dense), xycoords=("axes fraction", "data"), xytext=(-4, -3),
                    textcoords="offset points", ha="right", va="top", fontsize=8, color="dimgrey")
    _compress_axes(ax, [x for x, _, _ in pts], [y for _, y, _ in pts] + ([dense] if dense is not None else []))


def _compress_axes(ax, xs: list, ys: list) -> None:
    ax.set_yscale("log")
    if ys:  # explicit: the sideways-shifted markers do not count in matplotlib's autoscaling
        ax.set_ylim(min(ys) / 1.7, max(ys) * 1.7)
    ratios = sorted(set(xs))
    if ratios:
        ax.set_xticks(ratios)
        span = (ratios[-1] - ratios[0]) or 0.1
        ax.set_xlim(ratios[0] - 0.15 * span, ratios[-1] + 0.15 * span)
    ax.set_xlabel("fraction of decoder parameters removed (higher = smaller)")
    ax.set_ylabel("perplexity (log, lower is better)")
    ax.grid(alpha=0.3)


def _plot_compress(runs: dict, path: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    series = _compress_series(runs)
    if not series:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    styles = {m: (plt.get_cmap("tab10")(i % 10), _METHOD_MARKERS[i % len(_METHOD_MARKERS)]) for i, m in enumerate(series)}
    dense = runs.get("dense", {}).get("perplexity", {})
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.4))
    for i, (ax, corpus, title) in enumerate(zip(axes, ("wikitext2", "pydocs"),
                                                ("WikiText-2 test", "Python docs (out of domain)"))):
        _compress_panel(ax, series, corpus, dense.get(corpus), styles, first=i == 0)
        ax.set_title(title)
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    handles, labels = axes[0].get_legend_handles_labels()
    title = "method (line: several ratios;\nmarker only: one ratio, spread\nsideways where ratios coincide)"
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.835, 0.93), fontsize=8, frameon=False,
               title=title, title_fontsize=8, alignment="left")
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
             f"Dense and pruned-{setup.get('ratio')} (`llmprune compress --ratio {setup.get('ratio')} --of decoder`, calibration "
             f"{setup.get('calib')}) exported with `llmprune export --quantize int8 int4`. Perplexity: "
             f"{setup.get('eval')}, the same token windows for every engine. Prefill: one "
             f"{setup.get('prefill_tokens')}-token prompt (median of 3). Decode: {setup.get('decode')} (median of 2). "
             f"{setup.get('threads')} threads for every engine (ONNX Runtime intra-op, torch, llama.cpp), on a "
             f"{setup.get('cpu_count')}-core machine. The ONNX Runtime and llama.cpp rows were measured on the idle "
             "machine; the exports, the PyTorch rows and the 1-thread table ran while other jobs shared the cores "
             "(1-minute load averages per step below; those timings are inflated). Peak RSS is of the measuring process "
             "(model load, the tokenized evaluation text and a 512-token prefill included). The ONNX graph "
             "(the text-generation-with-past layout) and PyTorch compute the logits of every prompt position in the prefill — "
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
             f"The artifacts — dense, decoder-0.2 (`--ratio 0.2 --of decoder`), vocab-16k/32k/64k (`--ratio 0 --vocab "
             f"{'/'.join(str(sizes.get(k, k)) for k in ('16k', '32k', '64k'))}`), vocab-32k+decoder-0.2 and "
             "target-150/100 (`--target-mb 150` / `100`: the plan chooses, measured on the calibration text's held-out "
             "tail) — compressed "
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
        if r.get("decode_tokens_per_s") is None and None in r["bits_per_byte"].values():
            continue                                   # exported, not measured at this precision
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
        lines += ["", "Targets of the issues, vocabulary-only and --target-mb int4 against dense int4 (computed, not "
                  "asserted):", "",
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
    ok = [r for r in rows.values() if not r.get("error") and r.get("file_bytes") and r.get("bits_per_byte")
          and None not in r["bits_per_byte"].values()]          # exported but not measured: not a candidate
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
        extra = "".join(f" {a}" for a in best.get("export_args") or [])
        lines.append(f"| {goal} | {compress} | `llmprune export --quantize {best['precision']}{extra}` "
                     f"({best['precision']}) | {best['file_bytes'] / 1e6:.1f} | {' | '.join(cells)} | "
                     f"{best['decode_bytes_per_s']:.0f} |")
    lines += ["", "The same table, any budget: the deploy section below lists every measured artifact."]
    _replace_section(docs / "benchmarks.md", "recipes", "\n".join(lines), first=True)


_PRECISION_MARKERS = {"fp32": "o", "int8": "s", "int4": "^"}


def _deploy_panel(ax, points: list, field: str, colors: dict) -> list:
    """One panel of deploy.png: every artifact, the Pareto frontier (lower bits per byte and a
    smaller file, or a faster decode). Returns the frontier's points to label as (x, y, text, bold),
    every point's (x, y) and whether x is minimised."""
    xy = [(r[field] / 2**20 if field == "file_bytes" else r[field], r["bits_per_byte"]["wikitext2"], r)
          for r in points if r.get(field) is not None]
    for x, y, r in xy:
        star = r["artifact"] == "dense" and r["precision"] == "int4"
        ax.scatter([x], [y], color=colors[r["artifact"]], marker="*" if star else _PRECISION_MARKERS.get(r["precision"], "o"),
                   s=230 if star else 45, edgecolors="black" if star else "none", zorder=3)
    minimise_x = field == "file_bytes"
    front = [xy[i] for i in pareto_front([(x, y, i) for i, (x, y, _) in enumerate(xy)], minimise_x)]
    _draw_front(ax, [(x, y) for x, y, _ in front], minimise_x)
    if minimise_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("bits per byte, WikiText-2 test (lower is better)")
    ax.grid(alpha=0.3)
    items = [(x, y, f"{r['artifact']} {r['precision']}", r["artifact"] == "dense" and r["precision"] == "int4")
             for x, y, r in front]
    return items, [(x, y) for x, y, _ in xy], minimise_x


def _deploy_legends(fig, colors: dict) -> None:
    """Three legends right of the panels, one under the other: colour = artifact, marker =
    precision, and the marks (dense int4, the frontier)."""
    from matplotlib.lines import Line2D

    def dot(**kw):
        return Line2D([], [], linestyle="none", **{"markersize": 8, **kw})

    groups = [("artifact (colour)", [dot(marker="o", color=c) for c in colors.values()], list(colors)),
              ("precision (marker)", [dot(marker=m, color="dimgrey") for m in _PRECISION_MARKERS.values()],
               list(_PRECISION_MARKERS)),
              ("marks", [dot(marker="*", color=colors.get("dense", "grey"), markeredgecolor="black", markersize=13),
                         Line2D([], [], color="black", alpha=0.7),
                         dot(marker="o", markerfacecolor="none", markeredgecolor="black", markersize=12)],
               ["dense int4 (baseline of the targets)", "Pareto frontier", "on the frontier (labelled)"])]
    renderer, top = fig.canvas.get_renderer(), 0.95
    for title, handles, labels in groups:
        leg = fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.805, top), fontsize=8, title=title,
                         title_fontsize=8, alignment="left", frameon=False)
        box = leg.get_window_extent(renderer).transformed(fig.transFigure.inverted())
        top = box.y0 - 0.01


def _plot_deploy(rows: dict, path: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    points = [r for r in rows.values() if not r.get("error") and (r.get("bits_per_byte") or {}).get("wikitext2") is not None]
    if not points:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts = list(dict.fromkeys(r["artifact"] for r in points))
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(artifacts)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    panels = (("file_bytes", "file MiB (log; smaller is better)", "quality vs size"),
              ("decode_bytes_per_s", "decode bytes of text / s (higher is better)", "quality vs decode speed"))
    drawn = []
    for ax, (field, xlabel, title) in zip(axes, panels):
        drawn.append(_deploy_panel(ax, points, field, colors))
        ax.set_xlabel(xlabel)
        ax.set_title(title)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    _deploy_legends(fig, colors)
    for ax, (items, every, minimise_x) in zip(axes, drawn):
        xs, ys = [x for x, _, _, _ in items], [y for _, y, _, _ in items]
        obstacles = (_point_boxes(ax, every, half=8) + _point_boxes(ax, zip(xs, ys), half=11)
                     + _segment_boxes(ax, xs, ys, minimise_x))
        _label_points(ax, items, obstacles)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _agreement(equal, engine: str) -> str:
    if engine != "llama.cpp" or equal is None:
        return "—"
    return "yes (20,000 chars of Python docs)" if equal else "no"


def _gguf_artifacts(setup: dict, steps: dict) -> str:
    """Each compressed artifact: its flags and what came out (widths, token ids, padded in the GGUF)."""
    parts = []
    for name, flags in (setup.get("artifacts") or {}).items():
        if flags is None:
            continue
        widths = (steps.get(f"compress:{name}") or {}).get("widths") or []
        vocab = (steps.get(f"measure:{name}:llama.cpp") or {}).get("vocab_size")
        padded = (steps.get(f"export:{name}:llama.cpp") or {}).get("padded")
        shape = (f"{len(widths)} layers of MLP width {widths[0]}" if len(set(widths)) == 1 else
                 f"{len(widths)} layers, MLP widths {min(widths)}–{max(widths)}") if widths else "not run"
        parts.append(f"{name} (`{' '.join(flags)}`: {shape}, {vocab} token ids"
                     f"{'; zero-padded to its widest layer in the GGUF' if padded else ''})")
    return "; ".join(parts)


def render_gguf(results: dict, docs: Path) -> None:
    """The gguf section of docs/benchmarks.md (bench/side_by_side.py): llama.cpp Q4_K_M against ONNX int4."""
    setup, steps, summary = results.get("setup", {}), results.get("steps", {}), results.get("summary", {})
    rows, targets, m, mib = summary.get("rows", {}), summary.get("targets", {}), setup.get("measure", {}), 2**20
    loads = [s["load_avg_before"][0] for k, s in steps.items() if k.startswith("measure:") and s.get("load_avg_before")]
    version = next((s.get("llama_cpp") for k, s in steps.items() if k.endswith(":llama.cpp") and s.get("llama_cpp")), None)
    lines = ["## gguf: our artifacts in llama.cpp (Q4_K_M) and ONNX Runtime (int4) against the dense Q4_K_M", "",
             "The packaged Gemma-3-270M Q4_K_M GGUF against our artifacts exported with `llmprune export --format gguf "
             "--quantize q4_k_m` (llama.cpp's quantizer, llama-cpp-python " f"{version}) and `--quantize int4` (ONNX), "
             f"compressed with calibration {setup.get('calib')} and the vocabulary ranked as in the deploy section: "
             f"{_gguf_artifacts(setup, steps)}. Each measured in a fresh process with {m.get('threads')} threads "
             f"({setup.get('cpu_count')}-core machine; 1-minute load average "
             f"{_fmt(min(loads) if loads else None, '.1f')}–{_fmt(max(loads) if loads else None, '.1f')} before the "
             f"measurements): greedy decode of {m.get('decode_tokens')} new tokens after a {m.get('decode_prompt')}-token "
             f"prompt (median of {m.get('decode_runs')}), bytes/s = tokens/s × the artifact's bytes per token on Python "
             f"docs; bits per byte on {m.get('windows')}×{m.get('seq_len')} windows (+BOS) of each text, tokenized by the "
             "artifact's own tokenizer (its ids are given to llama.cpp as they are; the last column says whether "
             "llama.cpp's own tokenizer, from the file's fields, splits text the same way). Change columns are against "
             "the dense Q4_K_M file in llama.cpp.", "",
             "| artifact | engine | file MiB | size vs dense Q4_K_M | decode tok/s | decode bytes/s (vs dense) | "
             "bpb WikiText-2 | bpb Python docs (vs dense) | bpb Python source | peak RSS MiB | llama.cpp splits text as ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        bpb, change = r["bits_per_byte"], r["bpb_change_vs_dense_q4_k_m"].get("pydocs")
        speed = r.get("decode_bytes_per_s_vs_dense_q4_k_m")
        dense = r["artifact"] == "dense"
        size = "—" if dense else _fmt(r.get("size_vs_dense_q4_k_m"), ".0%")
        speed_vs = "" if dense or speed is None else f" ({speed:.2f}×)"
        bpb_vs = "" if dense or change is None else f" ({change:+.1%})"
        file_mib = r["file_bytes"] / mib if r.get("file_bytes") else None
        lines.append(
            f"| {r['artifact']} | {r['engine']} | {_fmt(file_mib, '.1f')} | {size} | "
            f"{_fmt(r.get('decode_tokens_per_s'), '.1f')} | "
            f"{_fmt(r.get('decode_bytes_per_s'), '.0f')}{speed_vs} | {_fmt(bpb.get('wikitext2'), '.3f')} | "
            f"{_fmt(bpb.get('pydocs'), '.3f')}{bpb_vs} | {_fmt(bpb.get('python_source'), '.3f')} | "
            f"{_fmt(r.get('peak_rss_mb'), '.0f')} | {_agreement(r.get('tokenizer_equal'), r['engine'])} |")
    if targets:
        lines += ["", "Targets of issue 22 for vocab-64k as Q4_K_M in llama.cpp (computed, not asserted):", "",
                  "| target | goal | vocab-64k |", "|---|---|---|"]
        for k, t in targets.items():
            x = t.get("value")
            shown = "—" if x is None else (f"{x:+.1%}" if k.startswith("bpb") else f"{x:.2f}×" if "bytes" in k else f"{x:.2f}")
            verdict = "" if t.get("met") is None else (" ✅ met" if t["met"] else " ❌ not met")
            lines.append(f"| {t['what']} | {t['target']} | {shown}{verdict} |")
    _replace_section(docs / "benchmarks.md", "gguf", "\n".join(lines))
