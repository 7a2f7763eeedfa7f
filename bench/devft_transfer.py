"""What makes a DevFT stage's training carry over to the whole model, measured on the real
Gemma-3-270M pruned at 0.2 (the checkpoint bench/recover.py and bench/adaptive.py start from).

DevFT trains LoRA on a stage model of S fused layers (each group of similar adjacent layers fused
into its anchor: anchor + beta * sum of the members' differences), then hands each group's LoRA to
the next stage. Whether that pays is one number: how much of what the stage's training bought
survives on the whole model. For each stage size S (4, 8), fusion damping beta (0 = the stage
keeps its anchors and drops the other layers, 0.2 = our old default, 0.5, 1 = the plain sum) and
hand-over (`copy`: every member gets the anchor's LoRA, as DevFT does; `split`: every member gets
it with B divided by the group's size, so the group adds the delta the stage learnt once;
`anchor`: only the anchor gets it), it trains the stage for --steps AdamW steps (one device, the
bench's batch, rank and learning rate), hands the LoRA over and measures the whole model's loss on
held-out text (WikiText-2 test and the Python tutorial; no stage trains or groups on them).

transfer = (loss before - loss after the hand-over) / (loss before - loss after the same steps on
the whole model): 1 = the stage was as good as training the whole model, 0 = it bought nothing,
< 0 = it made the whole model worse.

    python bench/devft_transfer.py            # about 20 minutes on 2 cores (peak RSS 2.8 GB)
    python bench/devft_transfer.py --betas 1 --handovers split --scales 0.25,0.5   # more rows, the others kept
Results: bench/results/devft_transfer.json and a section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, load_results, save_results  # noqa: E402
from recover import EVAL, PYDOCS_TRAIN  # noqa: E402

BETAS = "0,0.2,0.5,1"
HANDOVERS = "copy,split,anchor"


def held_out_loss(model, windows: dict) -> dict[str, float]:
    import llmprune

    return {name: round(math.log(llmprune.perplexity(model, w, progress=False).perplexity), 5)
            for name, w in windows.items()}


def handed_over(start: dict, arrays: dict, stage, how: str, scale: float) -> dict:
    """The whole model's adapter (`start`: its untrained global adapter, B = 0) after a stage
    trained `arrays` (the anchors' entries, global names), by hand-over `how`, its B times `scale`
    (`anchor`: only the anchors keep their LoRA; `split` / `copy`: the policy's hand-overs)."""
    from dataclasses import replace

    from llmprune.fedrecover.devft import expand_lora

    out = {**start, **arrays}
    if how == "anchor":
        return {k: v * scale if k.endswith(".B") else v for k, v in out.items()}
    return expand_lora(out, replace(stage, handover=how), scale)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "bench/work/recover/pruned-0.2")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--stages", default="4,8")
    p.add_argument("--betas", default=BETAS)
    p.add_argument("--handovers", default=HANDOVERS)
    p.add_argument("--scales", default="1", help="B of the handed-over LoRA times each of these")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/devft_transfer.json")
    args = p.parse_args()
    import torch

    import llmprune
    from llmprune.arch import adapter_for
    from llmprune.fedrecover import RecoverConfig
    from llmprune.fedrecover.devft import build_stages, fuse_model, stage_modules
    from llmprune.fedrecover.grouping import cka_matrix, unit_profiles
    from llmprune.fedrecover.lora import init_arrays, lora_applied, module_shapes
    from llmprune.fedrecover.task import train_lora

    torch.manual_seed(0)
    started = time.perf_counter()
    cfg = RecoverConfig.of(lora_rank=8)
    model, tok = llmprune.load(str(args.checkpoint))
    model.eval()
    # the clients' two domains, half each (the fleet trains on both)
    train = torch.cat([llmprune.token_windows(tok, llmprune.load_texts(str(SHARED / "wikitext2/wiki.valid.tokens")),
                                              128, 100),
                       llmprune.token_windows(tok, [t for n in PYDOCS_TRAIN
                                                    for t in llmprune.load_texts(str(SHARED / "pydocs" / n))], 128, 100)])
    server = llmprune.token_windows(tok, llmprune.load_texts(str(SHARED / "pydocs/library.txt")), 512, 4)
    held = {n: llmprune.token_windows(tok, llmprune.load_texts(str(SHARED / rel) if not rel.startswith("/") else rel),
                                      512, 4) for n, rel in EVAL.items() if n != "python-source"}
    shapes = module_shapes(model, cfg.training.target_modules)
    num_layers = len(adapter_for(model).decoder_layers(model))
    _, features = unit_profiles(model, server, "layer")
    similarity = cka_matrix(features)
    before = held_out_loss(model, held)
    train_kw = dict(scale=cfg.scale, steps=args.steps, batch_size=2, lr=1e-3, seed=0)

    t0 = time.perf_counter()
    start = init_arrays(shapes, list(shapes), 8, 0)
    whole, _ = train_lora(model, start, train, **train_kw)
    with lora_applied(model, whole, cfg.scale):
        whole_loss = held_out_loss(model, held)
    whole_seconds = time.perf_counter() - t0
    print(f"whole model: {before} -> {whole_loss} ({whole_seconds:.0f} s)", flush=True)
    rows = []
    for size in [int(s) for s in args.stages.split(",")]:
        for beta in [float(b) for b in args.betas.split(",")]:
            stage = build_stages(similarity, [size, num_layers], beta)[0]
            t0 = time.perf_counter()
            stage_model = fuse_model(copy.deepcopy(model), stage)
            local = stage.submodel().to_local({k: v for k, v in start.items()
                                               if k.rsplit(".", 1)[0] in set(stage_modules(shapes, stage))})
            trained, _ = train_lora(stage_model, local, train, **train_kw)
            trained = stage.submodel().to_global(trained)
            del stage_model
            train_seconds = time.perf_counter() - t0
            for how in args.handovers.split(","):
                for times in [float(x) for x in args.scales.split(",")]:
                    with lora_applied(model, handed_over(start, trained, stage, how, times), cfg.scale):
                        after = held_out_loss(model, held)
                    transfer = {n: round((before[n] - after[n]) / (before[n] - whole_loss[n]), 4) for n in held}
                    rows.append({"stage_layers": size, "beta": beta, "handover": how, "scale": times,
                                 "groups": [list(g) for g in stage.groups], "loss": after, "transfer": transfer,
                                 "stage_train_seconds": round(train_seconds, 1)})
                    print(f"S={size} beta={beta} {how} x{times:g}: {after} transfer {transfer}", flush=True)
    # a rerun of some settings keeps the other settings' rows (same checkpoint, steps and seed)
    key = lambda r: (r["stage_layers"], r["beta"], r["handover"], r.get("scale", 1.0))  # noqa: E731
    ran = {key(r) for r in rows}
    saved = [r for r in (load_results(args.results).get("rows") or []) if key(r) not in ran]
    rows = sorted(saved + rows, key=key)
    best = max(rows, key=lambda r: sum(r["transfer"].values()))
    results = {"setup": {"checkpoint": str(args.checkpoint.relative_to(ROOT)) if args.checkpoint.is_relative_to(ROOT)
                         else str(args.checkpoint), "steps": args.steps, "batch": "2x128", "lr": 1e-3, "rank": 8,
                         "held_out": {n: f"{EVAL[n]} 4x512" for n in held}, "grouping_text": "pydocs/library.txt 4x512",
                         "layers": num_layers},
               "before": before, "whole": {"loss": whole_loss, "train_seconds": round(whole_seconds, 1)},
               "rows": rows, "best": {k: best.get(k, 1.0) for k in ("stage_layers", "beta", "handover", "scale", "transfer")},
               "wall_seconds": round(time.perf_counter() - started, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    save_results(args.results, results)
    render(results, ROOT / "docs/benchmarks.md")
    print(json.dumps(results["best"]), flush=True)
    return 0


def render(results: dict, doc: Path) -> None:
    from report import _replace_section

    s = results["setup"]
    names = list(results["before"])
    drops = ", ".join(f"{n} {results['before'][n]:.4f} -> {results['whole']['loss'][n]:.4f}" for n in names)
    lines = ["## DevFT: what carries a stage over to the whole model (`bench/devft_transfer.py`)", "",
             f"{s['checkpoint']} ({s['layers']} layers); each stage trained {s['steps']} AdamW steps, batch {s['batch']}, "
             f"LoRA rank {s['rank']}, lr {s['lr']}; layers grouped on {s['grouping_text']}; loss (nats) on held-out "
             + ", ".join(f"{n}: {v}" for n, v in s["held_out"].items()) + ". *transfer*: the whole model's loss drop "
             "after the hand-over over its drop after the same steps on the whole model "
             f"({drops}).",
             "", "| stage layers | beta | hand-over | B x | " + " | ".join(f"{n} loss | {n} transfer" for n in names)
             + " | stage train s |", "|---|---|---|---|" + "---|---|" * len(names) + "---|"]
    for r in results["rows"]:
        cells = " | ".join(f"{r['loss'][n]:.4f} | {r['transfer'][n]:.3f}" for n in names)
        setting = f"{r['stage_layers']} | {r['beta']:g} | {r['handover']} | {r.get('scale', 1.0):g}"
        lines.append(f"| {setting} | {cells} | {r['stage_train_seconds']:.0f} |")
    b = results["best"]
    lines += ["", f"Best: {b['stage_layers']} layers, beta {b['beta']:g}, hand-over `{b['handover']}` x {b['scale']:g} "
              f"(transfer {', '.join(f'{n} {v:.3f}' for n, v in b['transfer'].items())}). "
              f"Run: {results['wall_seconds']:.0f} s, peak RSS {results['peak_rss_mb']:.0f} MB."]
    _replace_section(doc, "devft_transfer", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
