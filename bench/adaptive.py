"""Adaptive fleets on the real Gemma-3-270M: the bandit (FedSpine), staged growth (DevFT) and
prune-tune, against the fixed plans they replace.

The six devices of bench/submodels.py, non-IID by domain, with --emulate-speed: two run at half
speed (each step is followed by a sleep as long as the step) and two do not declare their memory
(each has a true limit, oom_mb, past which its client fails as the OS would kill it). Arms, the
same rounds, local steps, batch, rank and learning rate:
  plan      --submodels: the fixed fleet plan (an undeclared device is planned as if all fits)
  bandit    --submodels --policy bandit: a discounted-UCB arm (submodel size, rank) per device,
            the default grid (0.25/0.5/0.75/1 x rank 2/4/8; undeclared devices start on the
            largest, as the plan assumes), rewarded by its part of the global model's loss change
            on the server's text, measured by leaving its update out (bandit-holdings: its
            holdings share; bandit-time: holdings, --straggler-weight 2); compared with the plan
            at equal rounds and by the fleet clock at which it reaches the plan's final perplexity
  full      lean clients on the whole pruned model (--skip-unfit): DevFT's reference
  devft     --policy devft --devft-stages 4,8,all (--skip-unfit)
  once      the dense model pruned to 0.2 before round 1, then tuned (--target-ratio 0.2)
  tune      prune-tune: dense -> 0.2 in steps every --prune-every rounds (--target-ratio 0.2)
Every arm calibrates on the same text: the checkpoint was pruned on WikiText-2 validation
(32 x 512), and once/tune prune on it too (--prune-data); the server's own text (grouping, the
bandit's reward, the rounds' evaluation) is a folder with a file per domain the fleet trains,
read in turn (8 windows of 128: the Python library reference, and the last 200 KB of WikiText-2
test, far past the windows the curves read), the same for every arm; the perplexities below are
on WikiText-2 test (its first windows), the Python tutorial and Python source, which no arm
trains, calibrates or groups on.
Each arm is `llmprune recover --json` in its own process. Perplexity after every round on
WikiText-2 test and the Python tutorial (from the saved round adapters, on the model each round
trained), wall time, the fleet clock (per round the slowest returning device, as devices run in
parallel on a real fleet, plus the server's own time), bytes and failures. Results:
bench/results/adaptive.json and a section of docs/benchmarks.md. Nothing here asserts a timing.

    python bench/adaptive.py             # about 3 hours on 2 cores (8 rounds; two pruning steps of ~250 s each)
    python bench/adaptive.py --arms plan bandit    # some arms (the others' results are kept)
    python bench/adaptive.py --resume    # skip arms already in the results file (--reuse: finished runs, curves only)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, load_results, recovery_parser, run_json, save_results  # noqa: E402
from recover import EVAL, pruned_checkpoint, pydocs_train  # noqa: E402
from submodels import recover_args  # noqa: E402  (the same six-device run)

# the server's own text (grouping, the bandit's reward, its evaluation): one file per domain the fleet
# trains, so that neither domain's devices are judged on the other's text alone
SERVER_SOURCES = {"python.txt": ("pydocs/library.txt", "head"), "wikitext.txt": ("wikitext2/wiki.test.raw", "tail")}
SERVER_BYTES = 200_000
SERVER_WINDOWS = 8
CALIBRATION = str(SHARED / "wikitext2/wiki.valid.tokens")   # every arm's pruning calibration (the checkpoint's too)
# name, declared memory_mb (None: undeclared), true limit oom_mb, speed
FLEET = [("laptop-3g", 3072, None, 1.0), ("watch-1g", None, 1024, 1.0), ("tablet-2.6g", 2600, None, 0.5),
         ("phone-1.4g", 1400, None, 0.5), ("phone-2.2g", 2200, None, 1.0), ("phone-1.8g", None, 1800, 1.0)]
LEAN = ["--client-dtype", "bfloat16", "--client-embedding", "int8", "--emulate-speed"]
BANDIT = ["--policy", "bandit", *LEAN]     # the default arm grid and start
ARMS = {
    "plan": {"label": "fixed plan (--policy submodels)", "flags": ["--policy", "submodels", *LEAN]},
    "bandit": {"label": "bandit, credit by leave-one-out", "flags": [*BANDIT, "--bandit-credit", "leave-one-out"]},
    "bandit-holdings": {"label": "bandit, credit by holdings share", "flags": [*BANDIT, "--bandit-credit", "holdings"]},
    "bandit-time": {"label": "bandit, holdings, straggler weight 2", "flags": [*BANDIT, "--bandit-credit", "holdings",
                                                                         "--straggler-weight", "2"]},
    "full": {"label": "whole pruned model", "flags": ["--skip-unfit", *LEAN]},
    "devft": {"label": "DevFT devft:4,8,all", "flags": ["--policy", "devft", "--devft-stages", "4,8,all", "--skip-unfit",
                                                        *LEAN]},
    "once": {"label": "prune once to 0.2, then tune", "dense": True,
             "flags": ["--policy", "prune-tune", "--target-ratio", "0.2", "--prune-data", CALIBRATION, "--skip-unfit",
                       *LEAN]},
    "tune": {"label": "prune-tune to 0.2", "dense": True,
             "flags": ["--policy", "prune-tune", "--target-ratio", "0.2", "--prune-data", CALIBRATION, "--skip-unfit",
                       *LEAN]},
}


def write_server_text(folder: Path) -> Path:
    """The server's text: SERVER_BYTES from the head or tail of each source (the tail of WikiText-2
    test is far from the first windows, which the curves evaluate)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (rel, end) in SERVER_SOURCES.items():
        text = (SHARED / rel).read_text(encoding="utf-8")
        part = text[:SERVER_BYTES] if end == "head" else text[-SERVER_BYTES:]
        (folder / name).write_text(part[part.index("\n") + 1:] if end == "tail" else part, encoding="utf-8")
    return folder


def write_fleet(path: Path) -> Path:
    rows = []
    for name, memory, oom, speed in FLEET:
        row = {"name": name, "speed": speed}
        row.update({"memory_mb": memory} if memory is not None else {"oom_mb": oom})
        rows.append(row)
    path.write_text(json.dumps({"devices": rows}, indent=1))
    return path


def round_curve(model: Path, out: Path, metrics: dict, scale: float, args, rounds: int) -> list[dict]:
    """Perplexity on both test sets before round 1 and after each round: each round's adapter on
    the model that round trained (prune-tune: the re-pruned checkpoint), a DevFT stage's adapter
    spread over its groups as the server evaluates it."""
    from safetensors.numpy import load_file

    import llmprune
    from llmprune.fedrecover.lora import lora_applied

    rounds_dir = Path(f"{out}.rounds")
    stages, per_round = [], []
    if (metrics.get("submodels") or {}).get("stages"):
        from llmprune.fedrecover.devft import Stage, expand_lora, stage_of_rounds

        stages = [Stage.from_json(json.dumps(s)) for s in metrics["submodels"]["stages"]]
        per_round = stage_of_rounds([len(s.anchors) for s in stages], rounds)
    loaded: dict[str, tuple] = {}
    curve = []
    for r in range(0, rounds + 1):
        folder = str(model)
        for row in metrics["rounds"][:max(r, 1)]:
            if row.get("prune"):
                folder = str(rounds_dir / f"pruned-r{row['round']:03d}")
        if folder not in loaded:
            loaded.clear()
            m, tok = llmprune.load(folder)
            loaded[folder] = (m, {n: llmprune.token_windows(tok, llmprune.load_texts(str(SHARED / rel)), 512,
                                                            args.eval_windows) for n, rel in EVAL.items()})
        m, windows = loaded[folder]
        arrays = load_file(str(rounds_dir / f"round-{r:03d}.safetensors")) if r else {}
        if r and stages:     # as the server evaluated it: the share of B it chose for that round
            share = float((metrics["submodels"].get("handover_scales") or {}).get(str(r), 1.0))
            arrays = expand_lora(arrays, stages[per_round[r - 1]], share)
        with lora_applied(m, arrays, scale):
            curve.append({"round": r, **{n: round(llmprune.perplexity(m, w, progress=False).perplexity, 3)
                                         for n, w in windows.items()}})
    return curve


def fleet_clock(metrics: dict) -> list[float]:
    """Cumulative seconds after each round on a real fleet, where devices train in parallel: the
    slowest returning device of the round, the server's evaluation, and the server's time in the
    policy (a pruning step, the bandit's leave-one-out evaluations, DevFT's hand-over tries)."""
    total, out = 0.0, []
    for row in metrics["rounds"]:
        total += max(row["client_seconds"], default=0.0) + row.get("eval_seconds", 0.0)
        total += row["policy_seconds"] if "policy_seconds" in row else (row.get("prune") or {}).get("seconds", 0.0)
        out.append(round(total, 1))
    return out


def run_arm(key: str, args, pruned: Path | None, dense: Path, data: list[str], scale: float) -> dict:
    arm = ARMS[key]
    model = dense if arm.get("dense") else pruned
    flags = list(arm["flags"])
    if key == "tune":
        flags += ["--prune-every", str(args.prune_every)]
    fleet = write_fleet(args.work / "fleet.json")
    out = args.work / key
    rounds = args.rounds
    if args.reuse and (out / "metrics.json").is_file():   # the run is done: only its curve is (re)computed
        metrics = json.loads((out / "metrics.json").read_text())
        seconds = metrics["server_seconds"]                  # the ServerApp's whole run (wall less start-up)
    else:
        server_text = write_server_text(args.work / "server-text")
        command = recover_args(args, model, data, out, fleet, eval_windows=SERVER_WINDOWS, eval_data=server_text) \
            + flags + ["--rounds", str(rounds)]
        metrics, seconds = run_json(command, args.work / f"{key}.log")
    curve = round_curve(model, out, metrics, scale, args, rounds)
    return {"label": arm["label"], "rounds": rounds, "wall_seconds": round(seconds, 1), "curve": curve,
            "fleet_clock": fleet_clock(metrics), "round_seconds": [r["seconds"] for r in metrics["rounds"]],
            "bytes_up": [r["bytes_up"] for r in metrics["rounds"]],
            "bytes_down": [r["bytes_down"] for r in metrics["rounds"]],
            "failures": [[f"{f['device']}:{f['failed']}" for f in r.get("failures", [])] for r in metrics["rounds"]],
            "arms": [{c["device"]: c.get("arm") for c in r["clients"]} for r in metrics["rounds"]],
            "clients": [[{k: c.get(k) for k in ("device", "units", "rank", "seconds", "peak_rss_mb", "model_rss_mb",
                                                "loss_first", "loss_last", "arm", "explored", "reward")} for c in r["clients"]]
                        for r in metrics["rounds"]],
            "refused": metrics.get("refused", []), "prune_tune": metrics.get("prune_tune"),
            "server_eval": [r["eval_perplexity"] for r in metrics["rounds"]]}


def main() -> int:
    p = recovery_parser(__doc__, "adaptive", rounds=8, local_steps=3, batch_size=2, max_windows=200, eval_windows=4)
    p.add_argument("--prune-every", type=int, default=2)
    p.add_argument("--arms", nargs="*", default=list(ARMS))
    p.add_argument("--reuse", action="store_true", help="an arm whose run finished (OUT/metrics.json) only gets its "
                                                          "curve computed; its wall time is the server's")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # arms not named keep their saved results; named arms run again unless --resume
    results = load_results(args.results)
    saved_rounds = (results.get("setup") or {}).get("rounds")
    for key, run in list((results.get("runs") or {}).items()):
        run.setdefault("rounds", saved_rounds)
        if key in args.arms and not args.resume:
            del results["runs"][key]
    results["setup"] = {
        "model": args.model, "pruning": "comp 0.2 (wiki.valid 32x512 calibration)",
        "fleet": [{"device": n, "memory_mb": m, "oom_mb": o, "speed": s} for n, m, o, s in FLEET],
        "rounds": args.rounds, "local_steps": args.local_steps, "prune_every": args.prune_every,
        "lora_rank": args.lora_rank, "lr": args.lr, "batch": f"{args.batch_size}x{args.seq_len}",
        "aggregation": "hetlora", "max_windows_per_source": args.max_windows,
        "server_text": "a file per domain, read in turn: " + ", ".join(
            f"{rel} ({'first' if end == 'head' else 'last'} {SERVER_BYTES} characters)"
            for rel, end in SERVER_SOURCES.values()) + f"; {SERVER_WINDOWS}x{args.seq_len} windows",
        "eval": f"{args.eval_windows}x512 windows (+BOS)"}
    runs = results.setdefault("runs", {})
    work_pruned = ROOT / "bench/work/submodels"   # the submodel benchmark's checkpoint, when it exists
    # pruned once, only when an arm starts from it (once and tune start from the dense model)
    pruned = None
    if any(not ARMS[key].get("dense") for key in args.arms if key not in runs):
        pruned = pruned_checkpoint(args, work_pruned if (work_pruned / "pruned-0.2").is_dir() else args.work)
    from llmprune.models import resolve_model_spec

    dense = Path(resolve_model_spec(args.model).path)
    data = [str(SHARED / "wikitext2/wiki.valid.tokens"), str(pydocs_train(args.work))]
    from llmprune.fedrecover import RecoverConfig

    scale = RecoverConfig.of(lora_rank=args.lora_rank).scale
    for key in args.arms:
        if key in runs:
            continue
        start = time.perf_counter()
        runs[key] = {**run_arm(key, args, pruned, dense, data, scale), "bench_seconds": 0.0}
        runs[key]["bench_seconds"] = round(time.perf_counter() - start, 1)
        save_results(args.results, results)
        print(f"{key}: {runs[key]['wall_seconds']:.0f} s, final {runs[key]['curve'][-1]}", flush=True)
    results["summary"] = summarize(runs)
    save_results(args.results, results)
    render(results, ROOT / "docs/benchmarks.md")
    print(json.dumps(results["summary"], indent=1))
    return 0


def time_to_reach(curve: list[dict], clock: list[float], target: float, name: str) -> float | None:
    """Fleet-clock seconds at the first round whose perplexity is at or below `target`."""
    for row in curve[1:]:
        if row[name] <= target:
            return clock[row["round"] - 1]
    return None


# the test sets every arm's curve has (runs before python-source joined EVAL lack it)
COMPARED = ("wikitext2", "pydocs-tutorial")


def summarize(runs: dict) -> dict:
    out = {}
    for key, run in runs.items():
        out[key] = {"final": {n: run["curve"][-1][n] for n in COMPARED}, "wall_seconds": run["wall_seconds"],
                    "fleet_seconds": run["fleet_clock"][-1], "bytes_up": sum(run["bytes_up"]),
                    "failures": sum(len(f) for f in run["failures"])}
    for base, other, what in (("plan", "bandit", "time"), ("plan", "bandit-holdings", "time"), ("plan", "bandit-time", "time"),
                              ("full", "devft", "bytes")):
        if base in runs and other in runs:
            b, o = runs[base], runs[other]
            row = {}
            for n in COMPARED:
                target = b["curve"][-1][n]
                same = min(len(b["curve"]), len(o["curve"])) - 1
                row[f"{n}_at_round_{same}"] = {base: b["curve"][same][n], other: o["curve"][same][n]}
                reach = time_to_reach(o["curve"], o["fleet_clock"], target, n)
                rounds = next((r["round"] for r in o["curve"][1:] if r[n] <= target), None)
                row[n] = {"target": target, "reached_at_round": rounds}
                if what == "time":
                    row[n]["fleet_seconds"] = reach
                    row[n]["ratio_to_base"] = None if reach is None else round(reach / b["fleet_clock"][-1], 3)
                else:
                    up = None if rounds is None else sum(o["bytes_up"][:rounds])
                    row[n]["bytes_up"] = up
                    row[n]["ratio_to_base"] = None if up is None else round(up / sum(b["bytes_up"]), 3)
            out[f"{other}_vs_{base}"] = row
    if "once" in runs and "tune" in runs:
        out["tune_vs_once"] = {n: round(runs["tune"]["curve"][-1][n] / runs["once"]["curve"][-1][n] - 1, 4)
                               for n in COMPARED}
    return out


def render(results: dict, doc: Path) -> None:
    from report import _replace_section

    setup, runs, s = results["setup"], results["runs"], results["summary"]
    fleet = ", ".join(f"{d['device']} ("
                      + ("declares " + str(d["memory_mb"]) + " MB" if d["memory_mb"]
                         else "undeclared, fails past " + str(d["oom_mb"]) + " MB")
                      + f"{', half speed' if d['speed'] < 1 else ''})" for d in setup["fleet"])
    rows = ["| arm | rounds | WikiText-2 test | Python tutorial | fleet clock s | wall s | uploaded MB | failed device rounds |",
            "|---|---|---|---|---|---|---|---|"]
    for key, run in runs.items():
        r = s[key]
        rows.append(f"| {run['label']} | {run['rounds']} | {r['final']['wikitext2']:.2f} | {r['final']['pydocs-tutorial']:.2f} | "
                    f"{r['fleet_seconds']:.0f} | {r['wall_seconds']:.0f} | {r['bytes_up'] / 1e6:.1f} | {r['failures']} |")
    most = max(len(run["curve"]) for run in runs.values())
    curve_rows = ["| arm | " + " | ".join(f"round {i}" for i in range(most)) + " |", "|---" * (most + 1) + "|"]
    for key, run in runs.items():
        cells = [f"{r['wikitext2']:.2f} / {r['pydocs-tutorial']:.2f} ({c:.0f} s)" if r["round"] else
                 f"{r['wikitext2']:.2f} / {r['pydocs-tutorial']:.2f}" for r, c in zip(run["curve"], [0.0, *run["fleet_clock"]])]
        curve_rows.append(f"| {key} | " + " | ".join(cells + [""] * (most - len(cells))) + " |")
    body = ["## Adaptive fleets: bandit, DevFT, prune-tune (`bench/adaptive.py`)", "",
            f"Gemma-3-270M (pruned at 0.2 by comp; `once`/`tune` start from the dense model). Fleet: {fleet}; "
            f"--emulate-speed. rounds as listed x {setup['local_steps']} local steps, batch {setup['batch']}, "
            f"LoRA rank {setup['lora_rank']} (hetlora), lr {setup['lr']}, at most {setup['max_windows_per_source']} windows "
            f"per source, server text {setup['server_text']}; perplexity on {setup['eval']} of WikiText-2 test and "
            "pydocs/tutorial.txt. *Fleet clock*: per round the slowest returning device plus the server's part, as on a "
            "fleet where devices train in parallel; *wall*: this simulation, where two workers serve six clients in turn.",
            "", *rows, "",
            "Perplexity before round 1 and after each round (WikiText-2 / Python tutorial; fleet clock so far):", "",
            *curve_rows, "", "Comparisons (targets: bandit at most 0.7x the plan's time to its final perplexity; "
            "DevFT at most half the whole model's uploaded bytes; prune-tune below prune-once):", "",
            "```json", json.dumps({k: v for k, v in s.items() if "_vs_" in k}, indent=1), "```", "",
            *results.get("notes", [])]
    _replace_section(doc, "adaptive", "\n".join(body))


if __name__ == "__main__":
    sys.exit(main())
