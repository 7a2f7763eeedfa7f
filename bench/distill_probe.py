"""The distillation loss's weight and temperature, measured: LoRA on the 0.2-pruned Gemma-3-270M
(the checkpoint bench/recover.py makes), the same steps on WikiText-2 valid windows for every
(alpha, T), the dense model as teacher; perplexity on WikiText-2 test (in domain), the Python docs
tutorial and argparse.py (out of the training text). alpha = 0 is plain next-token LoRA.
Results go to bench/results/distill_probe.json and a section of docs/benchmarks.md. Nothing here
asserts a timing.

    python bench/distill_probe.py             # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, save_results  # noqa: E402
from recover import EVAL, pruned_checkpoint  # noqa: E402

# (alpha, T, lr multiplier): the KL's gradient (p_s - p_t) is much smaller than the CE's (p_s - onehot),
# so a loss mostly made of KL also moves the adapter less at one lr: measured at 3x the lr too.
SETTINGS = [(0.0, 1.0, 1.0), (0.5, 1.0, 1.0), (0.9, 1.0, 1.0), (1.0, 1.0, 1.0), (0.9, 2.0, 1.0), (0.0, 1.0, 3.0),
            (0.5, 1.0, 3.0), (0.9, 1.0, 3.0)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/distill_probe.json")
    p.add_argument("--work", type=Path, default=ROOT / "bench/work/recover")
    args = p.parse_args()
    import torch

    import llmprune
    from llmprune.fedrecover.config import TARGET_MODULES
    from llmprune.fedrecover.distill import Teacher, distillation_loss
    from llmprune.fedrecover.fleet import vocab_chunk
    from llmprune.fedrecover.lora import init_arrays, lora_applied, module_shapes
    from llmprune.fedrecover.task import train_lora
    from llmprune.memory import peak_rss_mb

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    pruned = pruned_checkpoint(argparse.Namespace(model=args.model), args.work)
    model, tok = llmprune.load(str(pruned))
    teacher = Teacher.load(args.model, str(pruned))
    train = llmprune.token_windows(tok, llmprune.load_texts(str(SHARED / "wikitext2/wiki.valid.tokens")), 128, 64)
    tests = {name: llmprune.token_windows(tok, llmprune.load_texts(str(SHARED / rel)), 512, args.eval_windows)
             for name, rel in EVAL.items()}
    shapes = module_shapes(model, TARGET_MODULES)
    init = init_arrays(shapes, list(shapes), 8, 0)
    chunk = vocab_chunk(2 * 127, model.config.hidden_size)

    def scores(arrays) -> dict:
        with lora_applied(model, arrays, 2.0):
            return {name: round(llmprune.perplexity(model, w, progress=False).perplexity, 3) for name, w in tests.items()}

    results = {"setup": {"model": args.model, "student": "comp 0.2 (bench/recover.py's)", "lora_rank": 8,
                         "steps": args.steps, "batch": "2x128", "lr": args.lr, "train": "wikitext2/wiki.valid.tokens",
                         "eval": f"{args.eval_windows}x512"},
               "pruned": scores(init), "runs": []}
    for alpha, temperature, lr_times in SETTINGS:
        loss_fn = None if alpha == 0 else distillation_loss(teacher, alpha, temperature, chunk)
        start = time.perf_counter()
        trained, loss = train_lora(model, init, train, scale=2.0, steps=args.steps, batch_size=2, lr=args.lr * lr_times,
                                   seed=0, **({"loss_fn": loss_fn} if loss_fn else {}))
        seconds = time.perf_counter() - start
        row = {"alpha": alpha, "temperature": temperature, "lr": args.lr * lr_times, "train_loss": round(loss, 4),
               "seconds_per_step": round(seconds / args.steps, 2), "perplexity": scores(trained)}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        save_results(args.results, results)
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    save_results(args.results, results)
    render(results, ROOT / "docs/benchmarks.md")
    return 0


def render(results: dict, doc: Path) -> None:
    from report import _replace_section

    s, pruned = results["setup"], results["pruned"]
    rows = ["| alpha | T | lr | WikiText-2 test | Python docs tutorial | argparse.py | s/step |",
            "|---|---|---|---|---|---|---|",
            f"| (pruned, no training) | | | {pruned['wikitext2']:.2f} | {pruned['pydocs-tutorial']:.2f} | "
            f"{pruned['python-source']:.2f} | |"]
    for r in results["runs"]:
        ppl = r["perplexity"]
        label = "0 (plain LoRA)" if r["alpha"] == 0 else f"{r['alpha']:g}"
        rows.append(f"| {label} | {r['temperature']:g} | {r['lr']:g} | {ppl['wikitext2']:.2f} | {ppl['pydocs-tutorial']:.2f} | "
                    f"{ppl['python-source']:.2f} | {r['seconds_per_step']:.2f} |")
    body = ["## Distillation weight and temperature (`bench/distill_probe.py`)", "",
            f"LoRA rank {s['lora_rank']} on {s['student']}, {s['steps']} steps of {s['batch']} windows of "
            f"{s['train']}, the dense model as teacher; loss (1 − alpha) CE + alpha T² KL. "
            f"Perplexity on {s['eval']} windows; only WikiText is in the training domain.", "", *rows, "",
            f"Peak RSS {results['peak_rss_mb']:.0f} MB (student, teacher and training in one process)."]
    _replace_section(doc, "distill-probe", "\n".join(body))


if __name__ == "__main__":
    sys.exit(main())
