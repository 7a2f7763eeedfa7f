"""`recover()`: federated LoRA recovery of a checkpoint in Flower's simulation on this machine
(one CPU per client), with the same ServerApp/ClientApp a real fleet runs: preflight checks, the
client data tokenized and partitioned once, the simulation, and what is left after Ctrl-C."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from llmprune.errors import LLMPruneError

from .config import RecoverConfig, RunSettings
from .preflight import preflight

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
PARTITIONS_FILE = "partitions.npz"


@dataclass
class RecoverResult:
    out: Path
    metrics: dict


class RecoverInterrupted(KeyboardInterrupt):
    """Ctrl-C during recover(): Ray is shut down, and the message says what was kept."""


def state_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.rounds"


def prepare_data(model_dir: str, data: list[str], cfg: RecoverConfig, path: Path, resume: bool = False) -> dict:
    """Tokenize and partition once, before Flower starts, so bad data fails early and every
    simulated client reads its share from one file."""
    import llmprune

    from .partition import ClientData, build_client_data

    tokenizer = llmprune.load_tokenizer(model_dir)
    d = cfg.data
    client_data = build_client_data(tokenizer, list(data), cfg.fleet.clients, d.partition, d.seq_len, cfg.seed,
                                    d.max_windows, d.eval_data, d.eval_windows)
    if resume and path.is_file():
        check_same_data(ClientData.load(path), client_data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    client_data.save(tmp)
    os.replace(tmp, path)
    return {"clients": client_data.stats,
            "eval_windows": 0 if client_data.eval_windows is None else int(client_data.eval_windows.shape[0])}


def check_same_data(saved, now) -> None:
    """--resume: the clients' windows (and the evaluation's) must be the saved run's, or the
    resumed rounds would train on other data than the rounds before them."""
    import numpy as np

    def same(a, b) -> bool:
        return (a is None) == (b is None) and (a is None or np.array_equal(np.asarray(a), np.asarray(b)))

    parts_same = len(saved.partitions) == len(now.partitions) and all(
        np.array_equal(a, b) for a, b in zip(saved.partitions, now.partitions))
    if not (same(saved.windows, now.windows) and parts_same and same(saved.eval_windows, now.eval_windows)):
        raise LLMPruneError("cannot resume: the client data differs from the saved run's (--data, or a file in it, "
                            "changed)", "resume with the same --data, unchanged, or start a new --out")


def run_config(model_dir: str, cfg: RecoverConfig, out: Path, state: Path, *, resume: bool, overwrite: bool) -> dict:
    settings = RunSettings(model=str(Path(model_dir).resolve()), out=str(out.resolve()), state_dir=str(state.resolve()),
                           resume=resume, overwrite=overwrite, data_cache=str((state / PARTITIONS_FILE).resolve()))
    return {**cfg.to_run_config(), **settings.to_run_config()}


def recover(model_dir: str | os.PathLike, data: list[str], config: RecoverConfig, out: str | os.PathLike, *,
            resume: bool = False, overwrite: bool = False, verbose: bool = False) -> RecoverResult:
    """Run the federated recovery in simulation; writes the merged checkpoint and metrics.json
    to `out` (atomically, at the end) and per-round checkpoints to `out`.rounds/."""
    from .simulation import run_simulation

    model_dir, out = str(model_dir), Path(out)
    state = state_dir_for(out)
    preflight(model_dir, list(data), config, out, state, resume=resume, overwrite=overwrite)
    before = _snapshot(out, state)
    try:
        data_stats = prepare_data(model_dir, data, config, state / PARTITIONS_FILE, resume)
        overrides = run_config(model_dir, config, out, state, resume=resume, overwrite=overwrite)
        run_simulation(config.fleet.clients, overrides, verbose, threading.Event())
    except KeyboardInterrupt:
        raise RecoverInterrupted(interrupted(out, state, before, resume)) from None
    except BaseException:
        _remove_new(out, state, before, keep_rounds=True)
        raise
    metrics_path = out / METRICS_FILE
    if not metrics_path.is_file():
        raise LLMPruneError("the federated run ended without writing a model", "run again with --debug to see Flower's log")
    metrics = json.loads(metrics_path.read_text())
    metrics["data"] = data_stats
    return RecoverResult(out, metrics)


def _snapshot(out: Path, state: Path) -> dict:
    return {"state_existed": state.exists(),
            "state_mtime": (state / "state.json").stat().st_mtime if (state / "state.json").exists() else None,
            "temps": {p.name for p in out.parent.glob(f".{out.name}.*")} if out.parent.is_dir() else set()}


def _remove_new(out: Path, state: Path, before: dict, *, keep_rounds: bool) -> None:
    """Remove what this run created and must not leave: half-written output folders, and the
    rounds folder unless it holds a finished round (`keep_rounds`) or existed before."""
    import shutil

    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.*"):
            if p.name not in before["temps"]:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if not before["state_existed"] and state.exists() and not (keep_rounds and (state / "state.json").exists()):
        shutil.rmtree(state, ignore_errors=True)


def interrupted(out: Path, state: Path, before: dict, resume: bool) -> str:
    """Clean up after Ctrl-C and say, truthfully, what is left."""
    _remove_new(out, state, before, keep_rounds=True)
    path = state / "state.json"
    mine = path.exists() and (resume or before["state_mtime"] is None or path.stat().st_mtime != before["state_mtime"])
    if mine:
        try:
            done = int(json.loads(path.read_text())["round"])
        except (OSError, ValueError, KeyError, TypeError):
            done = None
        if done:
            return (f"interrupted after round {done} — {state}/ keeps the finished rounds; "
                    "rerun the same command with --resume to continue")
    if before["state_existed"]:
        return f"interrupted before a round finished — {state}/ is kept as it was; no model was written"
    return "interrupted before a round finished — nothing was written"
