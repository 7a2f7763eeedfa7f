"""`--policy prune-tune --target-ratio R [--prune-every K]` (FedSpine's prune⇄tune): the fixed
plan, with the global model pruned further between rounds. Before each scheduled round the server
folds the global LoRA into its model, prunes it toward R (cumulative, of the dense decoder) on its
own text with compress's public API, keeps the LoRA of the surviving modules, and writes the new
checkpoint under the state folder (pruned-rNNN), which the devices load from that round on; the
fleet is planned again on it. fedrecover/prune_tune.py holds the maths of one step; this is the
bookkeeping around it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmprune.errors import LLMPruneError
from llmprune.options import option, positive_float, positive_int

from .base import Policy, PolicyConfig

log = logging.getLogger(__name__)
FOLDER_PREFIX = "pruned-r"


@dataclass
class PruneTuneConfig(PolicyConfig):
    target_ratio: float | None = option(None, flag="--target-ratio", parse=positive_float,
                                        default_text="none: required with --policy prune-tune",
                                        help="prune-tune: the decoder ratio (of the dense model) the run ends at")
    every: int | None = option(None, flag="--prune-every", parse=positive_int,
                               default_text="once, before the first round",
                               help="prune-tune: rounds between pruning steps toward --target-ratio")
    data: str | None = option(None, flag="--prune-data", default_text="--eval-data",
                              help="prune-tune: the server's calibration text for each pruning step")


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


def plan_pruning(model, cfg: Any, model_dir: str | Path) -> tuple[int, float, dict[int, float]]:
    """The dense decoder size, the checkpoint's ratio of it, and the steps {round: ratio}; a target
    below the checkpoint's ratio is a one-line error (from prune_schedule)."""
    from ..prune_tune import current_ratio, dense_decoder_params, prune_schedule

    dense = dense_decoder_params(model, checkpoint_report(model_dir))
    start = current_ratio(model, dense)
    rounds = cfg.training.rounds
    events = prune_schedule(start, cfg.policy.target_ratio, rounds, cfg.policy.every or rounds)
    return dense, start, events


def calibration_text(cfg: Any) -> str:
    """The server's own text for the pruning steps: --prune-data, else --eval-data."""
    source = cfg.policy.data or cfg.data.eval_data
    if not source:
        raise LLMPruneError("--policy prune-tune needs the server's own calibration text",
                            "pass --prune-data FILE (or --eval-data FILE)")
    return source


def calibration_length(model, report: dict | None) -> int:
    """Tokens per calibration window of the steps: the checkpoint's own compress setting (else
    compress's 512 for data), within the model's positions (one goes to the BOS token)."""
    saved = ((report or {}).get("config") or {}).get("calib_seq_len") or 512
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(int(saved), int(limit) - 1) if isinstance(limit, int) and limit > 1 else int(saved)


class PruneTunePolicy(Policy):
    name = "prune-tune"
    config_class = PruneTuneConfig
    summary = "FedSpine's prune-tune: the server prunes the global model further between rounds toward --target-ratio"
    secagg = False
    fleet_deployable = False   # devices must load each re-pruned checkpoint, which only a simulation hands them
    fixed_rounds = True
    fleet_vocabulary = False   # its re-pruned checkpoints keep the vocabulary they were pruned from

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        target = cfg.policy.target_ratio
        if target is None:
            raise LLMPruneError("--policy prune-tune needs --target-ratio", "pass e.g. --target-ratio 0.2")
        if not 0.0 < target < 1.0:
            raise LLMPruneError(f"--target-ratio must be in (0, 1) (got {target})", "pass e.g. --target-ratio 0.2")

    def check_model(self, model, model_dir: str) -> None:
        plan_pruning(model, self.cfg, model_dir)
        source = calibration_text(self.cfg)
        if not Path(source).exists():
            raise LLMPruneError(f"--prune-data '{source}' does not exist", "pass a text file the server holds")

    def folder(self, state_dir: Path, server_round: int) -> Path:
        return Path(state_dir) / f"{FOLDER_PREFIX}{server_round:03d}"

    def latest_before(self, state_dir: Path, events: dict[int, float], done_round: int) -> Path | None:
        """The checkpoint the run trained on after `done_round` rounds (a resume continues on it)."""
        done = [r for r in events if r <= done_round]
        return self.folder(state_dir, max(done)) if done else None

    def resume_model_dir(self, model_dir: str, state_dir: Any) -> str:
        from ..planning import meta_model
        from ..state import saved_round

        _, _, events = plan_pruning(meta_model(model_dir), self.cfg, model_dir)
        latest = self.latest_before(state_dir, events, saved_round(state_dir))
        return str(latest) if latest is not None else model_dir

    def open(self, run) -> None:
        """The schedule of steps, and on --resume the re-pruned checkpoint the saved rounds trained
        on (the server's model and the path devices load)."""
        import llmprune

        from ..prune_tune import compress_config_for
        from ..state import saved_round

        super().open(run)
        if not run.simulation:
            raise LLMPruneError("prune-tune needs the devices to load each re-pruned checkpoint, which only a "
                                "simulation can hand them", "run it with llmprune recover")
        self.dense, self.start_ratio, self.events = plan_pruning(run.model, self.cfg, run.settings.model)
        self.texts = llmprune.load_texts(calibration_text(self.cfg))
        report = checkpoint_report(run.settings.model)
        self.compress_config = compress_config_for(report, self.cfg.seed,
                                                   calib_seq_len=calibration_length(run.model, report))
        self.steps: list[dict] = []
        log.info("prune-tune: decoder ratio %.4f -> %.4f in %d step(s) before rounds %s", self.start_ratio,
                 self.config.target_ratio, len(self.events), sorted(self.events))
        latest = self.latest_before(run.settings.state_path, self.events,
                                    saved_round(run.settings.state_path)) if run.settings.resume else None
        if latest is not None:
            run.model = llmprune.load(str(latest))[0].eval()
            run.model_path = str(latest)

    def begin_round(self, run, server_round: int) -> dict:
        """The pruning step before this round, if one is scheduled: the model shrinks, the LoRA
        follows, the fleet is planned again, and the devices load the new checkpoint."""
        if server_round not in self.events:
            return {}
        import llmprune
        from llmprune.checkpoint import save_pruned

        from ..prune_tune import prune_step

        run.model, run.state.arrays, step = prune_step(
            run.model, run.tokenizer, run.state.arrays, self.cfg.scale, self.texts, self.events[server_round],
            self.dense, self.compress_config, server_round)
        folder = self.folder(run.settings.state_path, server_round)
        save_pruned(run.model, run.tokenizer, folder, report={**(step.report or {}), "prune_tune": step.to_dict()},
                    overwrite=True)
        # the rounds train on the checkpoint as saved, not on the model in memory: a resumed run
        # reads that same file, so both paths give the same bits (docs/recover.md promises it)
        run.model = llmprune.load(str(folder))[0].eval()
        self.steps.append(step.to_dict())
        log.info("round %d: pruned to decoder ratio %.4f (target %.4f), %d layers, %.0f s", server_round,
                 step.ratio_achieved, step.ratio_target, step.layers_after, step.seconds)
        run.model_path = str(folder)
        run.replan(self)
        return {"prune": self.steps[-1]}

    def report(self) -> dict:
        return {"prune_tune": {"dense_decoder_params": self.dense, "start_ratio": self.start_ratio,
                               "steps": self.steps}}


POLICY = PruneTunePolicy
