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
