"""The server side of prune-tune across rounds: when the global model is pruned further, on which
text, and where each re-pruned checkpoint goes for the clients (and for --resume).

The maths of one step (fold the LoRA in, calibrate, cut, re-map the LoRA of the survivors) is in
prune_tune.py; this is the bookkeeping around it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from llmprune.errors import LLMPruneError

log = logging.getLogger(__name__)
FOLDER_PREFIX = "pruned-r"


def checkpoint_report(folder: str | Path) -> dict | None:
    """The pruning report of a checkpoint folder (None for a model compress did not write)."""
    from llmprune.checkpoint import REPORT_FILE

    path = Path(folder) / REPORT_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def plan_pruning(model, cfg, model_dir: str | Path) -> tuple[int, float, dict[int, float]]:
    """The dense decoder size, the checkpoint's ratio of it, and the steps {round: ratio}; a target
    below the checkpoint's ratio is a one-line error (from prune_schedule)."""
    from .prune_tune import current_ratio, dense_decoder_params, prune_schedule

    dense = dense_decoder_params(model, checkpoint_report(model_dir))
    start = current_ratio(model, dense)
    events = prune_schedule(start, cfg.target_ratio, cfg.rounds, cfg.prune_every or cfg.rounds)
    return dense, start, events


def calibration_text(cfg) -> str:
    """The server's own text for the pruning steps: --prune-data, else --eval-data."""
    source = cfg.prune_data or cfg.eval_data
    if not source:
        raise LLMPruneError("--target-ratio needs the server's own calibration text",
                            "pass --prune-data FILE (or --eval-data FILE)")
    return source


def calibration_length(model, report: dict | None) -> int:
    """Tokens per calibration window of the steps: the checkpoint's own compress setting (else
    compress's 512 for data), within the model's positions (one goes to the BOS token)."""
    saved = ((report or {}).get("config") or {}).get("calib_seq_len") or 512
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(int(saved), int(limit) - 1) if isinstance(limit, int) and limit > 1 else int(saved)


class PruneRounds:
    """Prune-tune during a run: before each scheduled round the server folds the global LoRA into
    its model, prunes it further toward --target-ratio on its own text, keeps the LoRA of the
    surviving modules, and writes the new checkpoint under the state folder (pruned-rNNN), which
    the clients load from that round on."""

    def __init__(self, cfg, state_dir: Path, model, model_dir: str) -> None:
        import llmprune

        from .prune_tune import compress_config_for

        self.cfg, self.state_dir = cfg, Path(state_dir)
        self.dense, self.start, self.events = plan_pruning(model, cfg, model_dir)
        self.texts = llmprune.load_texts(calibration_text(cfg))
        report = checkpoint_report(model_dir)
        self.compress_config = compress_config_for(report, cfg.seed, calib_seq_len=calibration_length(model, report))
        self.steps: list[dict] = []
        log.info("prune-tune: decoder ratio %.4f -> %.4f in %d step(s) before rounds %s", self.start, cfg.target_ratio,
                 len(self.events), sorted(self.events))

    def folder(self, server_round: int) -> Path:
        return self.state_dir / f"{FOLDER_PREFIX}{server_round:03d}"

    def latest_before(self, done_round: int) -> Path | None:
        """The checkpoint the run trained on after `done_round` rounds (a resume continues on it)."""
        done = [r for r in self.events if r <= done_round]
        return self.folder(max(done)) if done else None

    def step(self, server_round: int, model, tokenizer, arrays: dict[str, np.ndarray], scale: float):
        """The pruning step before `server_round`: returns the pruned model and the re-mapped LoRA."""
        from llmprune.checkpoint import save_pruned

        from .prune_tune import prune_step

        model, arrays, step = prune_step(model, tokenizer, arrays, scale, self.texts, self.events[server_round],
                                         self.dense, self.compress_config, server_round)
        report = {**(getattr(step, "report", None) or {}), "prune_tune": step.to_dict()}
        save_pruned(model, tokenizer, self.folder(server_round), report=report, overwrite=True)
        self.steps.append(step.to_dict())
        log.info("round %d: pruned to decoder ratio %.4f (target %.4f), %d layers, %.0f s", server_round,
                 step.ratio_achieved, step.ratio_target, step.layers_after, step.seconds)
        return model, arrays
