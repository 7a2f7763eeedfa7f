"""Turn benchmark results into docs/benchmarks.md sections and plots (measured numbers only)."""

from __future__ import annotations

import re
from pathlib import Path


def _replace_section(doc: Path, name: str, body: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\nMeasured on this project's 2-core CPU machine; every number below was written by a script in `bench/`.\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
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
             "| run | ratio achieved | total reduction | layers dropped | ppl WikiText-2 | ppl Python docs | calib loss | compress s | peak RSS MiB |",
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


def _plot_compress(runs: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
             "| layers | checkpoint GiB | peak RSS MiB | peak RSS / checkpoint | peak RSS / full 32-layer 7B | s per layer | ratio achieved |",
             "|---|---|---|---|---|---|---|",
             f"| {result['layers']} | {result['checkpoint_bytes'] / gib:.2f} | {result['peak_rss_mb']:.0f} | "
             f"{result['peak_rss_share_of_checkpoint']:.1%} | {result['peak_rss_share_of_full_7b']:.1%} | "
             f"{result['seconds_per_layer']:.1f} | {result['ratio_achieved']:.3f} |"]
    _replace_section(docs / "benchmarks.md", "scale", "\n".join(lines))
