"""Per-round checkpoints: the global adapter after every round and the metrics so far, so
`--resume` continues where a run stopped and ends with what an uninterrupted run gives.

    OUT.rounds/
      round-001.safetensors ...   the global adapter after each round (canonical names)
      state.json                  last round, metrics rows, the settings that must match"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmprune.errors import LLMPruneError

from .config import RecoverConfig

STATE_FILE = "state.json"
# Settings a resumed run must share with the run it continues (rounds may grow).
MUST_MATCH = ("clients", "partition", "aggregation", "fraction", "local_steps", "lora_rank", "lora_alpha", "lr",
              "batch_size", "seq_len", "seed", "fleet", "target_modules", "dp_clip", "dp_noise", "max_windows")


@dataclass
class RoundState:
    round: int
    arrays: dict[str, np.ndarray]
    rounds: list[dict]
    initial_eval_perplexity: float | None = None


def _identity(cfg: RecoverConfig, model: str) -> dict:
    d = cfg.to_dict()
    out = {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in MUST_MATCH}
    out["model"] = str(model)
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def save_state(folder: Path, state: RoundState, cfg: RecoverConfig, *, model: str = "") -> None:
    """Write the round's adapter and state.json; `model` (the checkpoint folder) is part of the
    settings a resume must share."""
    from safetensors.numpy import save

    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / f"round-{state.round:03d}.safetensors", save(state.arrays))
    meta = {"round": state.round, "rounds": state.rounds, "initial_eval_perplexity": state.initial_eval_perplexity,
            "settings": _identity(cfg, model)}
    _write_atomic(folder / STATE_FILE, json.dumps(meta, indent=2, default=str).encode())


def load_state(folder: Path, cfg: RecoverConfig, *, model: str = "") -> RoundState:
    from safetensors.numpy import load_file

    path = folder / STATE_FILE
    if not path.is_file():
        raise LLMPruneError(f"nothing to resume: no {STATE_FILE} in '{folder}'", "run without --resume to start")
    try:
        meta = json.loads(path.read_text())
        arrays = load_file(str(folder / f"round-{int(meta['round']):03d}.safetensors"))
    except (OSError, ValueError, KeyError) as exc:
        raise LLMPruneError(f"round checkpoint in '{folder}' is unreadable ({exc})", "delete the folder and start again") from None
    mine = _identity(cfg, model)
    changed = [k for k, v in meta.get("settings", {}).items() if json.dumps(v) != json.dumps(mine.get(k))]
    if changed:
        raise LLMPruneError(f"cannot resume: settings differ from the saved run ({', '.join(changed)})",
                            "resume with the same settings (only --rounds may grow), or start a new --out")
    if meta["round"] > cfg.rounds:
        raise LLMPruneError(f"the saved run already did {meta['round']} rounds, more than --rounds {cfg.rounds}",
                            "pass a larger --rounds")
    return RoundState(int(meta["round"]), dict(arrays), list(meta["rounds"]), meta.get("initial_eval_perplexity"))
