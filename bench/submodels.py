"""Memory-sized submodels (FedPruner) on a fleet of weak devices, on the real Gemma-3-270M pruned
at 0.2 by comp.

Six devices with budgets from 1 GB to 3 GB, non-IID by domain: the three strong ones hold
WikiText-2 valid, the three weak ones the Python docs (howto, faq, reference). Four arms, the same
rounds, local steps, batch, rank and learning rate:
  (a) today: full fp32 model on every client; devices no setting fits are left out (--skip-unfit);
  (b) every device at the smallest full-model setting the weakest can run (lean clients: bf16
      layers, int8 vocabulary table; the same rank and depth for all);
  (c) --policy submodels (layers), lean clients;
  (d) --policy submodels --submodel-granularity sublayer, lean clients.
Each arm is `llmprune recover --json` in its own process (Flower simulation, one core per client).
Perplexity after every round on WikiText-2 test and the Python tutorial (from the saved round
adapters), peak RSS and its model-dependent part per device, estimate vs measured, wall time and
bytes. Results: bench/results/submodels.json, a section of docs/benchmarks.md,
docs/img/submodels.png. Nothing here asserts a timing.

    python bench/submodels.py            # about 25 minutes on 2 cores (3 arms run, one skipped)
    python bench/submodels.py --resume   # skip arms already in the results file
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, load_results, recovery_parser, run_json, save_results  # noqa: E402
from recover import EVAL, pruned_checkpoint, pydocs_train, round_curve  # noqa: E402

SERVER_TEXT = "pydocs/library.txt"     # the server's own text: grouping and per-round evaluation
# Client i holds domain i mod 2 (wiki, pydocs): strong devices on WikiText-2, weak ones on the docs.
FLEET = [("laptop-3g", 3072), ("watch-1g", 1024), ("tablet-2.6g", 2600), ("phone-1.4g", 1400),
         ("phone-2.2g", 2200), ("phone-1.8g", 1800)]
LEAN = ["--client-dtype", "bfloat16", "--client-embedding", "int8"]
ARMS = {
    "a_today": {"label": "(a) today: unfit devices refused", "flags": ["--skip-unfit"]},
    "b_full_smallest": {"label": "(b) full model, smallest common setting", "flags": LEAN},
    "c_submodels": {"label": "(c) --submodels (layers)", "flags": ["--policy", "submodels", *LEAN]},
    "d_sublayer": {"label": "(d) --submodels sublayer", "flags": ["--policy", "submodels", "--submodel-granularity",
                                                                  "sublayer", *LEAN]},
}


def write_fleet(path: Path, fixed: dict | None = None) -> Path:
    rows = [{"name": name, "memory_mb": mb, **(fixed or {})} for name, mb in FLEET]
    path.write_text(json.dumps({"devices": rows}, indent=1))
    return path


def smallest_common_setting(pruned: Path, args) -> dict:
    """(rank, depth) the weakest device can run with lean full-model clients: arm (b) gives it to all."""
    from llmprune.fedrecover import RecoverConfig
    from llmprune.fedrecover.fleet import Device, assign_lean_devices, unit_costs
    from llmprune.fedrecover.planning import meta_model

    cfg = RecoverConfig.of(lora_rank=args.lora_rank, batch_size=args.batch_size, seq_len=args.seq_len,
                           client_dtype="bfloat16", client_embedding="int8")
    weakest = min(FLEET, key=lambda d: d[1])
    plan = assign_lean_devices(unit_costs(meta_model(str(pruned)), cfg), [Device(*weakest)], args.lora_rank, True)[0]
    if plan.refused:
        return {"refused": plan.refused}
    # the smallest setting: rank 1 at the depth the weakest reaches with it would be another choice;
    # we keep what the planner gives the weakest device (most LoRA parameters that fit)
    return {"rank": plan.rank, "depth": plan.depth, "estimate_mb": plan.estimate_mb}


def recover_args(args, pruned: Path, data: list[str], out: Path, fleet: Path, eval_windows: int = 8,
                 eval_data: Path | None = None) -> list[str]:
    """The fleet's `llmprune recover` (bench/adaptive.py and bench/split.py run the same); the
    server's text is SERVER_TEXT unless `eval_data` is given."""
    return ["recover", "--model", str(pruned), "--data", *data, "--out", str(out), "--clients", str(len(FLEET)),
            "--fleet", str(fleet), "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
            "--partition", "domain", "--lora-rank", str(args.lora_rank), "--lr", str(args.lr),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--max-windows", str(args.max_windows), "--aggregation", "hetlora",
            "--eval-data", str(eval_data or SHARED / SERVER_TEXT), "--eval-windows", str(eval_windows),
            "--seed", "0", "--overwrite"]


def device_table(metrics: dict) -> list[dict]:
    """Per device over the rounds: budget, units held, rank, estimate, measured peak and its
    model-dependent part (max over rounds), seconds, bytes.

    In the simulation two ray workers serve all six clients in turn, so a worker's RSS before a
    round (peak - model part) includes what earlier clients' rounds left in that process; a device
    runs only its own client. `dedicated_peak_mb` = the smallest before-round RSS of the run (a
    fresh worker: Python, torch, transformers, peft, flwr, ray) + the device's model part: what the
    same round peaks at in a process of its own. Both are reported."""
    rows: dict[str, dict] = {}
    before = [c["peak_rss_mb"] - c["model_rss_mb"] for r in metrics["rounds"] for c in r.get("clients", [])
              if c.get("model_rss_mb") is not None]
    floor = min(before) if before else 0.0
    for r in metrics["rounds"]:
        for c in r.get("clients", []):
            row = rows.setdefault(c["device"], {"device": c["device"], "memory_mb": c["memory_mb"], "rank": c["rank"],
                                                "units": [], "estimate_mb": 0.0, "peak_rss_mb": 0.0,
                                                "model_rss_mb": 0.0, "seconds": [], "bytes_up": 0, "bytes_down": 0,
                                                "fresh_floor_mb": round(floor, 1)})
            row["units"].append(c["units"] if c["units"] is not None else c["depth"])
            row["estimate_mb"] = max(row["estimate_mb"], c["estimate_mb"])
            row["peak_rss_mb"] = max(row["peak_rss_mb"], c["peak_rss_mb"])
            row["model_rss_mb"] = max(row["model_rss_mb"], c["model_rss_mb"] or 0.0)
            row["seconds"].append(c["seconds"])
            row["bytes_up"] = max(row["bytes_up"], c["bytes_up"] or 0)
            row["bytes_down"] = max(row["bytes_down"], c["bytes_down"] or 0)
    for row in rows.values():
        row["dedicated_peak_mb"] = round(floor + row["model_rss_mb"], 1)
    return sorted(rows.values(), key=lambda r: r["memory_mb"])


def main() -> int:
    p = recovery_parser(__doc__, "submodels", rounds=3, local_steps=5, batch_size=2, max_windows=300, eval_windows=8)
    p.add_argument("--arms", nargs="*", default=list(ARMS))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results) if args.resume else {}
    results.setdefault("setup", {}).update(
        model=args.model, pruning="comp 0.2 (wiki.valid 32x512 calibration)",
        fleet=[{"device": n, "memory_mb": mb, "data": "wikitext2 valid" if i % 2 == 0 else "pydocs howto/faq/reference"}
               for i, (n, mb) in enumerate(FLEET)],
        rounds=args.rounds, local_steps=args.local_steps, lora_rank=args.lora_rank, lr=args.lr,
        batch=f"{args.batch_size}x{args.seq_len}", aggregation="hetlora", max_windows_per_source=args.max_windows,
        server_text=SERVER_TEXT, eval=f"{args.eval_windows}x512 windows (+BOS)")
    runs = results.setdefault("runs", {})
    pruned = pruned_checkpoint(args, args.work)
    data = [str(SHARED / "wikitext2/wiki.valid.tokens"), str(pydocs_train(args.work))]
    from llmprune.fedrecover import RecoverConfig

    scale = RecoverConfig.of(lora_rank=args.lora_rank).scale
    for key in args.arms:
        if key in runs:
            continue
        arm = ARMS[key]
        fixed = None
        if key == "b_full_smallest":
            setting = smallest_common_setting(pruned, args)
            results["setup"]["b_setting"] = setting
            if "refused" in setting:
                runs[key] = {"label": arm["label"], "skipped": setting["refused"]}
                save_results(args.results, results)
                continue
            fixed = {"rank": setting["rank"], "depth": setting["depth"]}
        fleet = write_fleet(args.work / f"fleet-{key}.json", fixed)
        out = args.work / key
        start = time.perf_counter()
        metrics, seconds = run_json(recover_args(args, pruned, data, out, fleet) + arm["flags"], args.work / f"{key}.log")
        curve = round_curve(pruned, Path(f"{out}.rounds"), scale, args, with_initial=True)
        runs[key] = {"label": arm["label"], "wall_seconds": round(seconds, 1), "curve": curve,
                     "devices": device_table(metrics), "refused": metrics.get("refused", []),
                     "submodels": metrics.get("submodels"), "model_bytes": metrics["model_bytes"],
                     "round_seconds": [r["seconds"] for r in metrics["rounds"]],
                     "bytes_up": [r["bytes_up"] for r in metrics["rounds"]],
                     "bytes_down": [r["bytes_down"] for r in metrics["rounds"]],
                     "bench_seconds": round(time.perf_counter() - start, 1)}
        save_results(args.results, results)
        print(f"{key}: {seconds:.0f} s, final {curve[-1]}", flush=True)
    refresh_devices(results, args.work)
    summarize(results)
    save_results(args.results, results)
    render(results, ROOT / "docs/benchmarks.md", ROOT / "docs/img/submodels.png")
    print(json.dumps(results["summary"], indent=1))
    return 0


def refresh_devices(results: dict, work: Path) -> None:
    """Device tables from each arm's metrics.json, so a change to `device_table` applies on --resume."""
    for key, run in results["runs"].items():
        path = work / key / "metrics.json"
        if "curve" in run and path.is_file():
            run["devices"] = device_table(json.loads(path.read_text()))


def summarize(results: dict) -> None:
    runs = {k: v for k, v in results["runs"].items() if "curve" in v}
    summary = {}
    today = runs.get("a_today")
    full_model_part = max(d["model_rss_mb"] for d in today["devices"]) if today else None
    for key, run in runs.items():
        weakest = run["devices"][0]
        final = run["curve"][-1]
        row = {"participants": len(run["devices"]), "refused": len(run["refused"]),
               "weakest_device": weakest["device"], "weakest_budget_mb": weakest["memory_mb"],
               "weakest_model_rss_mb": weakest["model_rss_mb"],
               "weakest_peak_mb": weakest["peak_rss_mb"], "weakest_dedicated_peak_mb": weakest["dedicated_peak_mb"],
               "over_budget_raw": [d["device"] for d in run["devices"] if d["peak_rss_mb"] > d["memory_mb"]],
               "over_budget_dedicated": [d["device"] for d in run["devices"] if d["dedicated_peak_mb"] > d["memory_mb"]],
               "final": {n: final[n] for n in EVAL},
               "upload_share_max": round(max(d["bytes_up"] for d in run["devices"]) / run["model_bytes"], 5),
               "wall_seconds": run["wall_seconds"]}
        if full_model_part:
            row["weakest_model_rss_share_of_today"] = round(weakest["model_rss_mb"] / full_model_part, 3)
        if today:
            for n in EVAL:
                row[f"vs_today_{n}"] = round(final[n] / today["curve"][-1][n] - 1, 4)
        summary[key] = row
    summary["today_full_model_client_model_rss_mb"] = full_model_part
    results["summary"] = summary


def render(results: dict, doc: Path, plot: Path) -> None:
    from report import _pyplot, _replace_section

    setup, runs, s = results["setup"], results["runs"], results["summary"]
    fleet = ", ".join(f"{d['device']} {d['memory_mb']} MB ({'wiki' if 'wiki' in d['data'] else 'pydocs'})"
                      for d in setup["fleet"])
    rows = ["| arm | devices taking part | WikiText-2 test | Python tutorial | vs (a) wiki | vs (a) pydocs | "
            "weakest device: budget / peak in its worker / dedicated peak MB | its model part MB (share of today's) | "
            "over budget (worker; dedicated) | upload / model | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, run in runs.items():
        if key not in s:
            rows.append(f"| {run['label']} | — skipped: {run.get('skipped', '')} | | | | | | | | |")
            continue
        r = s[key]
        w = run["devices"][0]
        share = f" ({100 * r['weakest_model_rss_share_of_today']:.0f}%)" if "weakest_model_rss_share_of_today" in r else ""
        rows.append(f"| {run['label']} | {r['participants']} of {len(setup['fleet'])} | {r['final']['wikitext2']:.2f} | "
                    f"{r['final']['pydocs-tutorial']:.2f} | {100 * r.get('vs_today_wikitext2', 0):+.1f}% | "
                    f"{100 * r.get('vs_today_pydocs-tutorial', 0):+.1f}% | {w['memory_mb']:.0f} / {w['peak_rss_mb']:.0f} / "
                    f"{w['dedicated_peak_mb']:.0f} ({w['device']}) | {w['model_rss_mb']:.0f}{share} | "
                    f"{', '.join(r['over_budget_raw']) or 'none'}; {', '.join(r['over_budget_dedicated']) or 'none'} | "
                    f"{100 * r['upload_share_max']:.2f}% | {r['wall_seconds']:.0f} |")
    dev_rows = ["| arm | device | budget MB | units or depth per round | rank | estimate MB | peak in worker MB | "
                "dedicated peak MB | model part MB | s per round |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, run in runs.items():
        for d in run.get("devices", []):
            dev_rows.append(f"| {key[0]} | {d['device']} | {d['memory_mb']:.0f} | {d['units']} | {d['rank']} | "
                            f"{d['estimate_mb']:.0f} | {d['peak_rss_mb']:.0f} | {d['dedicated_peak_mb']:.0f} | "
                            f"{d['model_rss_mb']:.0f} | {', '.join(f'{x:.0f}' for x in d['seconds'])} |")
        for ref in run.get("refused", []):
            dev_rows.append(f"| {key[0]} | {ref['device']} | {ref['memory_mb']:.0f} | refused: {ref['reason']} | | | | | | |")
    curve_rows = ["| arm | " + " | ".join(f"round {r['round']}" for r in next(iter(
        v for v in runs.values() if "curve" in v))["curve"]) + " |"]
    curve_rows.append("|---" * (len(curve_rows[0].split("|")) - 2) + "|")
    for key, run in runs.items():
        if "curve" in run:
            curve_rows.append(f"| {key[0]} | " + " | ".join(f"{r['wikitext2']:.2f} / {r['pydocs-tutorial']:.2f}"
                                                           for r in run["curve"]) + " |")
    body = [
        "## Memory-sized submodels (`bench/submodels.py`)", "",
        f"Gemma-3-270M pruned at 0.2 by comp. Fleet of six: {fleet}. {setup['rounds']} rounds x {setup['local_steps']} "
        f"local steps, batch {setup['batch']}, LoRA rank {setup['lora_rank']} (hetlora), lr {setup['lr']}, at most "
        f"{setup['max_windows_per_source']} windows per source; server text {setup['server_text']} (grouping and the "
        f"run's own evaluation); perplexity on {setup['eval']} of WikiText-2 test and pydocs/tutorial.txt. Lean clients: "
        "bf16 layers, int8 vocabulary table, vocabulary-sliced loss. *Peak in worker*: the high-water mark of the ray "
        "worker during the client's round; two workers serve the six clients in turn, so it includes what earlier "
        "clients left in that process. *Model part*: that peak minus the same process's RSS just before the model was "
        "loaded. *Dedicated peak*: the run's smallest before-round RSS (a fresh worker) + the model part, i.e. the "
        "round in a process of its own, as on a device.",
        "Arm (b): " + (f"skipped — {runs['b_full_smallest']['skipped']}; no full-model setting, even with lean "
                       "clients, fits the weakest device." if "skipped" in runs.get("b_full_smallest", {})
                       else f"every device at {setup.get('b_setting')}."), "",
        *rows, "", "Per device (max over rounds):", "", *dev_rows, "",
        "Perplexity after each round (WikiText-2 / Python tutorial):", "", *curve_rows, "",
        *results.get("notes", []), "", "![submodels](img/submodels.png)",
    ]
    _replace_section(doc, "submodels", "\n".join(body))
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, name, title in zip(axes, EVAL, ("WikiText-2 test", "Python docs tutorial")):
        for _key, run in runs.items():
            if "curve" in run:
                ax.plot([r["round"] for r in run["curve"]], [r[name] for r in run["curve"]], "o-", label=run["label"])
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("perplexity")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
