"""Helpers shared by the benchmarks: run the real CLI in a subprocess, parse its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LLMPRUNE = [sys.executable, "-m", "llmprune.cli"]


def run_json(args: list[str], log_path: Path | None = None) -> tuple[dict, float]:
    """Run `llmprune ARGS --json` in a fresh process; (parsed stdout, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(LLMPRUNE + ["-q", *args, "--json"], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - start
    if log_path is not None:
        log_path.write_text(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"llmprune {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout), seconds


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def run_measured(args: list[str], log_path: Path | None = None) -> tuple[str, float, float]:
    """Run a command in a fresh process; (stdout, wall seconds, that process's peak RSS in MiB).
    Output goes through files (no pipe to fill), and os.wait4 gives the child's own rusage."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if log_path is not None:
        log_path.write_text(stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:6]))} ... failed ({proc.returncode}): {stderr.strip().splitlines()[-1:]}")
    return stdout, seconds, usage.ru_maxrss / 1024


def run_cli_measured(args: list[str], log_path: Path | None = None) -> tuple[dict, float, float]:
    """`llmprune ARGS --json` in a fresh process; (parsed stdout, wall seconds, peak RSS MiB)."""
    stdout, seconds, rss = run_measured(LLMPRUNE + ["-q", *args, "--json"], log_path)
    return json.loads(stdout), seconds, rss


def recovery_parser(doc: str, name: str, *, rounds: int, local_steps: int, batch_size: int, max_windows: int,
                    eval_windows: int):
    """The arguments every federated-recovery benchmark shares (model, rounds, LoRA, batch, data
    sizes, --resume, results and work paths), with that benchmark's defaults; add its own after."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--local-steps", type=int, default=local_steps)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--max-windows", type=int, default=max_windows, help=f"windows per data source ({max_windows})")
    p.add_argument("--eval-windows", type=int, default=eval_windows,
                   help=f"512-token windows per test corpus ({eval_windows})")
    p.add_argument("--resume", action="store_true", help="skip what the results file already holds")
    p.add_argument("--results", type=Path, default=ROOT / f"bench/results/{name}.json")
    p.add_argument("--work", type=Path, default=ROOT / f"bench/work/{name}")
    return p


def evaluate_texts(model: str, corpora: dict[str, str], windows: int, work: Path) -> dict:
    """`llmprune eval` of a model on each corpus (path under ../shared/data), 512-token windows:
    perplexity and bits per byte by corpus name."""
    scores = {}
    for name, rel in corpora.items():
        out, _ = run_json(["eval", "--model", model, "--data", str(SHARED / rel), "--seq-len", "512",
                           "--max-windows", str(windows)], work / f"eval-{name}.log")
        scores[name] = {"perplexity": out["perplexity"], "bits_per_byte": out["bits_per_byte"]}
    return scores
