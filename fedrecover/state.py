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

from .config import RecoverConfig, key_flags

STATE_FILE = "state.json"
POLICY_KEY = "llmprune.policy"


@dataclass
class RoundState:
    round: int
    arrays: dict[str, np.ndarray]
    rounds: list[dict]
    initial_eval_perplexity: float | None = None
    policy: dict | None = None          # the assignment policy's state after `round` (resume continues it)
    rows: dict[str, np.ndarray] | None = None   # --train-rows: the embedding rows changed so far (rows.py)


def _identity(cfg: RecoverConfig, model: str) -> dict:
    """The settings a resumed run must share with the run it continues: every field declared
    `resume="match"` (config.py), the rounds when the policy spreads its steps over them, and the
    checkpoint."""
    out = {**cfg.resume_identity(), "model": str(model)}
    if cfg.fleet.file:   # the path as typed is not enough: an edited fleet file plans other devices
        out[FLEET_CONTENT] = _file_digest(cfg.fleet.file)
    return out


def _file_digest(path: str) -> str | None:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


FLEET_CONTENT = "content of --fleet"


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
    # the policy's state after this round rides with the round's adapter, so each round file is a
    # complete resume point (state.json keeps the latest too)
    policy = json.dumps(state.policy or {}, default=str)
    tensors = {**state.arrays, **(state.rows or {})}
    _write_atomic(folder / f"round-{state.round:03d}.safetensors", save(tensors, metadata={POLICY_KEY: policy}))
    meta = {"round": state.round, "rounds": state.rounds, "initial_eval_perplexity": state.initial_eval_perplexity,
            "policy": state.policy or {}, "settings": _identity(cfg, model)}
    _write_atomic(folder / STATE_FILE, json.dumps(meta, indent=2, default=str).encode())


def load_state(folder: Path, cfg: RecoverConfig, *, model: str = "", expected: dict[str, np.ndarray] | None = None) -> RoundState:
    """The saved state to resume from. Anything malformed (state.json not an object of the
    expected fields, a truncated round file, tensors that are not this run's adapter: `expected`,
    the initial adapter, gives the names and the non-rank dimensions) is a one-line error, never an unexpected exception."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise LLMPruneError(f"nothing to resume: no {STATE_FILE} in '{folder}'", "run without --resume to start")
    fix = "start over with --overwrite (the saved rounds are replaced), or pass another --out"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LLMPruneError(f"round checkpoint in '{folder}' is unreadable ({STATE_FILE}: {exc})", fix) from None
    problem = _bad_meta(meta)
    if problem:
        raise LLMPruneError(f"round checkpoint in '{folder}' is unreadable ({STATE_FILE} {problem})", fix)
    mine = _identity(cfg, model)
    saved = meta.get("settings", {})
    defaults = _identity(RecoverConfig(), model)   # a key saved by an older version had its default then
    changed = [k for k in {**saved, **mine} if json.dumps(saved.get(k, defaults.get(k))) != json.dumps(mine.get(k))]
    if changed:
        flags = key_flags(cfg)
        raise LLMPruneError(f"cannot resume: settings differ from the saved run "
                            f"({', '.join(flags.get(k, k) for k in changed)})",
                            "resume with the same settings (only --rounds may grow), or start a new --out")
    if meta["round"] > cfg.training.rounds:
        raise LLMPruneError(f"the saved run already did {meta['round']} rounds, more than --rounds "
                            f"{cfg.training.rounds}",
                            "pass a larger --rounds")
    arrays, round_policy, rows = _load_round(folder, meta["round"], expected, fix)
    policy = round_policy if round_policy is not None else (meta.get("policy") or {})
    if not isinstance(policy, dict):
        raise LLMPruneError(f"round checkpoint in '{folder}' is unreadable ({STATE_FILE} has a bad 'policy')", fix)
    return RoundState(int(meta["round"]), arrays, list(meta["rounds"]), meta.get("initial_eval_perplexity"), policy,
                      rows or None)


def check_policy_state(policy, state: RoundState, model, folder: Path) -> None:
    """A saved policy state the policy cannot continue on `model` is a one-line error (the round
    files were edited or damaged: the settings that shaped it already matched)."""
    problem = policy.state_problem(state.policy or {}, model)
    if problem:
        raise LLMPruneError(f"round checkpoint in '{folder}' is unreadable (the saved {policy.name} state: {problem})",
                            "start over with --overwrite (the saved rounds are replaced), or pass another --out")


def saved_round(folder: Path) -> int:
    """The last round saved in `folder` (0 when there is none; load_state refuses a bad file later)."""
    try:
        return int(json.loads((Path(folder) / STATE_FILE).read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _bad_meta(meta) -> str | None:
    """What is wrong with a parsed state.json, or None."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    for key, kind in (("round", int), ("rounds", list), ("settings", dict)):
        if key not in meta:
            return f"has no '{key}'"
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            return f"has a bad '{key}' ({type(meta[key]).__name__}, expected {kind.__name__})"
    if meta["round"] < 1 or len(meta["rounds"]) != meta["round"] or not all(isinstance(r, dict) for r in meta["rounds"]):
        return f"does not hold {meta['round']} round rows"
    ppl = meta.get("initial_eval_perplexity")
    if ppl is not None and (isinstance(ppl, bool) or not isinstance(ppl, (int, float))):
        return "has a bad 'initial_eval_perplexity'"
    return None


def _load_round(folder: Path, round_: int, expected: dict[str, np.ndarray] | None,
                fix: str) -> tuple[dict[str, np.ndarray], dict | None, dict[str, np.ndarray]]:
    """The round's adapter, the policy state saved with it (None in a file of an older version) and
    the embedding rows changed so far (--train-rows; empty without)."""
    from safetensors import safe_open

    from .rows import GLOBAL_KEYS, split_rows

    name = f"round-{round_:03d}.safetensors"
    try:
        with safe_open(str(folder / name), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            saved = (f.metadata() or {}).get(POLICY_KEY)
        policy = json.loads(saved) if saved is not None else None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for truncated files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LLMPruneError(f"round checkpoint '{folder / name}' is unreadable ({reason})", fix) from None
    arrays, rows = split_rows(arrays)
    if rows and (set(rows) != set(GLOBAL_KEYS) or rows["rows.ids"].ndim != 1 or rows["rows.values"].ndim != 2
                 or len(rows["rows.ids"]) != len(rows["rows.values"])):
        raise LLMPruneError(f"round checkpoint '{folder / name}' holds damaged embedding rows", fix)
    bad = [k for k, v in arrays.items() if v.ndim != 2 or v.dtype != np.float32 or not k.endswith((".A", ".B"))]
    if expected is not None:
        bad += sorted(set(arrays) ^ set(expected))
        bad += [k for k in set(arrays) & set(expected) if arrays[k].ndim == 2 and
                (arrays[k].shape[1] != expected[k].shape[1] if k.endswith(".A") else arrays[k].shape[0] != expected[k].shape[0])]
    if bad:
        raise LLMPruneError(f"round checkpoint '{folder / name}' does not hold this run's LoRA adapter "
                            f"({len(bad)} unexpected or missing tensors, e.g. '{bad[0]}')", fix)
    return arrays, policy, rows
