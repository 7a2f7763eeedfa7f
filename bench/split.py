"""Split training (MergeSFL, `--policy split`) against memory-sized submodels, on the six-device
fleet of bench/submodels.py with emulated speeds (tablet-2.6g and phone-1.4g at half speed), non-IID
by domain, the real Gemma-3-270M pruned at 0.2 by comp, lean clients (bf16 layers, int8 vocabulary).

Arms, the same rounds, device steps, batch, rank and learning rate:
  submodels         --policy submodels (each device the layers its memory fits)
  split             --policy split --no-split-merge --no-split-regulate (one server pass per device)
  split_merge       --policy split --no-split-regulate (the devices' features merged)
  split_regulate    --policy split (merged, batches regulated by measured speed)
Each arm is `llmprune recover --json` in its own process (Flower simulation, two Ray workers).
Reported: perplexity after every round on WikiText-2 test and the Python tutorial (from the saved
round adapters), fleet time per round (the round's wall time, the server's evaluation excluded),
bytes each way per device, each device's measured peak RSS and idle time — and, since two Ray workers
serve six devices here in turn, the fleet time and idle time where the devices run side by side,
composed from the jobs' measured times (split: per exchange the slowest device's job, plus the
server's compute; submodels: per round the slowest device's round). Results:
bench/results/split.json and a section of docs/benchmarks.md. Nothing here asserts a timing.

    python bench/split.py                  # about an hour on 2 cores (16 minutes an arm)
    python bench/split.py --resume         # skip arms already in the results file
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, load_results, recovery_parser, run_json, save_results  # noqa: E402
from recover import EVAL, pruned_checkpoint, pydocs_train, round_curve  # noqa: E402
from submodels import FLEET, SERVER_TEXT, recover_args  # noqa: E402

HALF_SPEED = {"tablet-2.6g", "phone-1.4g"}
LEAN = ["--client-dtype", "bfloat16", "--client-embedding", "int8", "--emulate-speed"]
ARMS = {
    "submodels": {"label": "submodels", "flags": ["--policy", "submodels", *LEAN]},
    "split": {"label": "split, no merging or regulation",
              "flags": ["--policy", "split", "--no-split-merge", "--no-split-regulate", *LEAN]},
    "split_merge": {"label": "split + merging", "flags": ["--policy", "split", "--no-split-regulate", *LEAN]},
    "split_regulate": {"label": "split + merging + regulation", "flags": ["--policy", "split", *LEAN]},
}


def write_fleet(path: Path) -> Path:
    rows = [{"name": name, "memory_mb": mb, "speed": 0.5 if name in HALF_SPEED else 1.0} for name, mb in FLEET]
    path.write_text(json.dumps({"devices": rows}, indent=1))
    return path


def devices_of(metrics: dict) -> list[dict]:
    """Per device over the rounds: cut or units, batches, measured peak (max), seconds, idle seconds,
    bytes up and down (the adapter plus, in split rounds, every step's features and gradients)."""
    rows: dict[str, dict] = {}
    for r in metrics["rounds"]:
        fleet_seconds = r["seconds"] - r["eval_seconds"]
        for c in r.get("clients", []):
            row = rows.setdefault(c["device"], _device_row(c))
            split = "cut" in c
            row["held"].append(c["cut"]["front"] if split else c["units"])
            row["batch"].append(c["batch_size"] if split else metrics["config"]["training.batch-size"])
            row["peak_rss_mb"] = max(row["peak_rss_mb"], c["peak_rss_mb"])
            row["seconds"].append(c["compute_seconds"] if split else c["seconds"])
            row["idle_seconds"].append(c["idle_seconds"] if split else round(max(0.0, fleet_seconds - c["seconds"]), 2))
            if split:
                row["idle_if_parallel"].append(c["idle_if_parallel_seconds"])
                row["first_job_seconds"].append(c["first_job_seconds"])
            steps = c.get("split_steps", 0)
            row["bytes_up"] += (c["bytes_up"] or 0) + steps * c.get("bytes_up_per_step", 0)
            row["bytes_down"] += (c["bytes_down"] or 0) + steps * c.get("bytes_down_per_step", 0)
        for f in r.get("failures", []):
            rows.setdefault(f["device"], _device_row(f))["held"].append(f"failed: {f['failed']}")
    return sorted(rows.values(), key=lambda d: d["memory_mb"] or 0)


def _device_row(entry: dict) -> dict:
    return {"device": entry["device"], "memory_mb": entry["memory_mb"], "held": [], "batch": [], "peak_rss_mb": 0.0,
            "seconds": [], "idle_seconds": [], "idle_if_parallel": [], "first_job_seconds": [], "bytes_up": 0,
            "bytes_down": 0}


def main() -> int:
    p = recovery_parser(__doc__, "split", rounds=3, local_steps=5, batch_size=2, max_windows=300, eval_windows=8)
    p.add_argument("--arms", nargs="*", default=list(ARMS))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results(args.results) if args.resume else {}
    results.setdefault("setup", {}).update(
        model=args.model, pruning="comp 0.2 (wiki.valid 32x512 calibration)",
        fleet=[{"device": n, "memory_mb": mb, "speed": 0.5 if n in HALF_SPEED else 1.0,
                "data": "wikitext2 valid" if i % 2 == 0 else "pydocs howto/faq/reference"}
               for i, (n, mb) in enumerate(FLEET)],
        rounds=args.rounds, local_steps=args.local_steps, lora_rank=args.lora_rank, lr=args.lr,
        batch=f"{args.batch_size}x{args.seq_len}", aggregation="hetlora", max_windows_per_source=args.max_windows,
        server_text=SERVER_TEXT, eval=f"{args.eval_windows}x512 windows (+BOS)", machine=machine())
    runs = results.setdefault("runs", {})
    pruned = pruned_checkpoint(args, args.work)
    data = [str(SHARED / "wikitext2/wiki.valid.tokens"), str(pydocs_train(args.work))]
    fleet = write_fleet(args.work / "fleet.json")
    from llmprune.fedrecover import RecoverConfig

    scale = RecoverConfig.of(lora_rank=args.lora_rank).scale
    for key in args.arms:
        if key in runs:
            continue
        out = args.work / key
        started = time.perf_counter()
        metrics, seconds = run_json(recover_args(args, pruned, data, out, fleet, eval_windows=4) + ARMS[key]["flags"],
                                    args.work / f"{key}.log")
        runs[key] = {"label": ARMS[key]["label"], "wall_seconds": round(seconds, 1),
                     "curve": round_curve(pruned, Path(f"{out}.rounds"), scale, args, with_initial=True),
                     "fleet_seconds": [round(r["seconds"] - r["eval_seconds"], 1) for r in metrics["rounds"]],
                     "devices": devices_of(metrics), "split": metrics.get("split"),
                     "bench_seconds": round(time.perf_counter() - started, 1), "load": _load()}
        save_results(args.results, results)
        print(f"{key}: {seconds:.0f} s, final {runs[key]['curve'][-1]}", flush=True)
    results["summary"] = summarize(runs)
    save_results(args.results, results)
    render(results, ROOT / "docs/benchmarks.md")
    print(json.dumps(results["summary"], indent=1))
    return 0


def machine() -> str:
    import os

    return f"{os.cpu_count()} cores"


def _load() -> float:
    import os

    return round(os.getloadavg()[0], 2)


def parallel_fleet_seconds(run: dict) -> list[float]:
    """Per round, the fleet time where devices run side by side (see the module's docstring)."""
    if run.get("split"):
        return run["split"]["parallel_seconds_per_round"]
    rounds = len(run["fleet_seconds"])
    return [round(max((d["seconds"][r] for d in run["devices"] if len(d["seconds"]) > r), default=0.0), 1)
            for r in range(rounds)]


def parallel_idle_seconds(run: dict) -> float:
    """All devices' idle time where they run side by side: split, each exchange's slowest job minus
    the device's own (metrics.json); submodels, the round's slowest device's round minus its own."""
    if run.get("split"):
        return round(sum(sum(d["idle_if_parallel"]) for d in run["devices"]), 1)
    slowest = parallel_fleet_seconds(run)
    return round(sum(slowest[r] - x for d in run["devices"] for r, x in enumerate(d["seconds"])), 1)


def time_to_reach(run: dict, target: dict, fleet_seconds: list[float] | None = None) -> float | None:
    """Fleet seconds until the curve is at or below `target` on both texts (None: never)."""
    spent = 0.0
    for point, seconds in zip(run["curve"][1:], fleet_seconds or run["fleet_seconds"]):
        spent += seconds
        if all(point[n] <= target[n] for n in EVAL):
            return round(spent, 1)
    return None


def summarize(runs: dict) -> dict:
    out: dict = {}
    sub = runs.get("submodels")
    for key, run in runs.items():
        weakest = run["devices"][0]
        out[key] = {"final": {n: run["curve"][-1][n] for n in EVAL}, "fleet_seconds": round(sum(run["fleet_seconds"]), 1),
                    "weakest": weakest["device"], "weakest_peak_mb": weakest["peak_rss_mb"],
                    "idle_seconds": round(sum(sum(d["idle_seconds"]) for d in run["devices"]), 1),
                    "parallel_fleet_seconds": round(sum(parallel_fleet_seconds(run)), 1),
                    "parallel_idle_seconds": parallel_idle_seconds(run),
                    "bytes_up": sum(d["bytes_up"] for d in run["devices"]),
                    "bytes_down": sum(d["bytes_down"] for d in run["devices"])}
        if sub is not None and key != "submodels":
            target = sub["curve"][-1]
            reach = time_to_reach(run, target)
            out[key]["reaches_submodels_final_after_s"] = reach
            out[key]["time_share_of_submodels"] = None if reach is None else round(reach / sum(sub["fleet_seconds"]), 3)
            reach = time_to_reach(run, target, parallel_fleet_seconds(run))
            out[key]["parallel_reaches_submodels_final_after_s"] = reach
            out[key]["parallel_time_share_of_submodels"] = (
                None if reach is None else round(reach / sum(parallel_fleet_seconds(sub)), 3))
            out[key]["weakest_peak_vs_submodels"] = round(weakest["peak_rss_mb"] / sub["devices"][0]["peak_rss_mb"], 3)
    if "split" in out and "split_merge" in out:
        out["merge_beats_no_merge"] = all(out["split_merge"]["final"][n] < out["split"]["final"][n] for n in EVAL)
    if "split_merge" in out and "split_regulate" in out:
        out["idle_cut_by_regulation"] = round(out["split_merge"]["idle_seconds"]
                                              / max(out["split_regulate"]["idle_seconds"], 1e-9), 2)
        out["parallel_idle_cut_by_regulation"] = round(out["split_merge"]["parallel_idle_seconds"]
                                                       / max(out["split_regulate"]["parallel_idle_seconds"], 1e-9), 2)
        # regulation needs a measured round: rounds 2.. are the ones it sets the batches of
        later = {k: sum(sum(d["idle_if_parallel"][1:]) for d in runs[k]["devices"]) for k in ("split_merge", "split_regulate")}
        out["parallel_idle_cut_by_regulation_from_round_2"] = round(later["split_merge"] / max(later["split_regulate"], 1e-9), 2)
    return out


def _reach(seconds: float | None, share: float | None) -> str:
    return "not reached" if seconds is None else f"{seconds:.0f} s ({share:.2f}x)"


def render(results: dict, doc: Path) -> None:
    from report import _replace_section

    setup, runs, s = results["setup"], results["runs"], results["summary"]
    fleet = ", ".join(f"{d['device']} {d['memory_mb']} MB{' half speed' if d['speed'] < 1 else ''}" for d in setup["fleet"])
    rows = ["| arm | WikiText-2 test | Python tutorial | fleet s, all rounds (here / side by side) | "
            "reaches the submodels' final after (here / side by side) | weakest device's peak MB | "
            "device idle s, sum (here / side by side) | bytes up / down (all devices) |",
            "|---|---|---|---|---|---|---|---|"]
    for key, run in runs.items():
        r = s[key]
        reach_text = "—" if key == "submodels" else " / ".join(
            _reach(r.get(f"{prefix}reaches_submodels_final_after_s"), r.get(f"{prefix}time_share_of_submodels"))
            for prefix in ("", "parallel_"))
        rows.append(f"| {run['label']} | {r['final']['wikitext2']:.2f} | {r['final']['pydocs-tutorial']:.2f} | "
                    f"{r['fleet_seconds']:.0f} / {r['parallel_fleet_seconds']:.0f} | {reach_text} | "
                    f"{r['weakest_peak_mb']:.0f} ({r['weakest']}) | {r['idle_seconds']:.0f} / "
                    f"{r['parallel_idle_seconds']:.0f} | {r['bytes_up'] / 2**20:.1f} / {r['bytes_down'] / 2**20:.1f} MiB |")
    dev_rows = ["| arm | device | budget MB | layers held per round | batch per round | peak MB | "
                "compute s per round (first job) | idle s per round (side by side) |", "|---|---|---|---|---|---|---|---|"]
    for key, run in runs.items():
        for d in run["devices"]:
            compute = ", ".join(f"{x:.0f}" for x in d["seconds"])
            idle = ", ".join(f"{x:.0f}" for x in d["idle_seconds"])
            if d.get("first_job_seconds"):
                compute += " (" + ", ".join(f"{x:.1f}" for x in d["first_job_seconds"]) + ")"
                idle += " (" + ", ".join(f"{x:.0f}" for x in d["idle_if_parallel"]) + ")"
            dev_rows.append(f"| {key} | {d['device']} | {d['memory_mb']} | {d['held']} | {d['batch']} | "
                            f"{d['peak_rss_mb']:.0f} | {compute} | {idle} |")
    first = next(iter(runs.values()))
    curve_rows = ["| arm | " + " | ".join(f"round {p['round']}" for p in first["curve"]) + " |",
                  "|---" * (len(first["curve"]) + 1) + "|"]
    for key, run in runs.items():
        curve_rows.append(f"| {key} | " + " | ".join(f"{p['wikitext2']:.2f} / {p['pydocs-tutorial']:.2f}"
                                                      for p in run["curve"]) + " |")
    body = ["## Split training (`bench/split.py`)", "",
            f"Gemma-3-270M pruned at 0.2 by comp. Fleet of six, non-IID by domain, speeds emulated: {fleet}. "
            f"{setup['rounds']} rounds x {setup['local_steps']} device steps, batch {setup['batch']} per device (the "
            f"merged server batch is the sum), LoRA rank {setup['lora_rank']} (hetlora), lr {setup['lr']}; lean clients "
            f"(bf16 layers, int8 vocabulary table). Perplexity on {setup['eval']} of WikiText-2 test and "
            f"pydocs/tutorial.txt. *Fleet s*: here, each round's wall time without the server's evaluation (two Ray "
            f"workers serve the six devices in turn); side by side, composed from measured job times as if every "
            f"device ran at once (split: each exchange's slowest job plus the server's compute; submodels: each "
            f"round's slowest device). *Peak*: the device's measured peak RSS (split: its jobs of a round in one "
            f"process of its own that reads its part of the model at the first job). *Idle*: split: here, the time a "
            f"device's exchanges took beyond its own compute; side by side, each exchange's slowest job minus its own; "
            f"submodels: the round's fleet time (here / the slowest device's round) minus the device's round. "
            f"Machine: {setup['machine']}, nothing else running.", "", *rows, "",
            "Perplexity after each round (WikiText-2 / Python tutorial):", "", *curve_rows, "",
            "Per device:", "", *dev_rows, "", *results.get("notes", [])]
    _replace_section(doc, "split", "\n".join(body))


if __name__ == "__main__":
    sys.exit(main())
