"""Checks before Flower starts: everything that can be refused in one line from the config, the
checkpoint's shapes (a meta-device model: no weights read) and the saved rounds, so that a bad run
never starts Ray, loads a model or writes a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmprune.errors import LLMPruneError

from .config import RecoverConfig
from .fleet import check_ranks
from .planning import meta_model
from .policies import get_policy


def check_checkpoint(model_dir: str) -> None:
    """A checkpoint folder whose config and weights agree, checked without reading the weights:
    the clients load it in other processes, where a broken checkpoint would surface only as a
    failed round."""
    from llmprune.models import check_checkpoint as check_config_and_weights
    from llmprune.models import resolve_model_spec

    def not_a_checkpoint() -> LLMPruneError:
        return LLMPruneError(f"'{model_dir}' is not a checkpoint folder (no config.json)",
                             "pass a folder written by `llmprune compress` (or any HF model folder)")

    path = Path(model_dir)
    if path.is_dir() and not (path / "config.json").is_file():
        raise not_a_checkpoint()
    source = resolve_model_spec(model_dir)  # a device, a FIFO, a name that is not UTF-8: one line each
    if source.kind != "folder" or not path.is_dir():
        raise not_a_checkpoint()
    check_config_and_weights(source)


def check_plan(model_dir: str, cfg: RecoverConfig) -> list[dict]:
    """What the policy needs from the checkpoint, and every device of the fleet file getting a
    plan that fits (or the error says which device and what budget it needs)."""
    policy = get_policy(cfg.policy.name)(cfg)
    model = meta_model(model_dir)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.data.seq_len > positions:
        raise LLMPruneError(f"--seq-len {cfg.data.seq_len} is beyond the model's {positions} positions",
                            f"pass --seq-len {positions} or less")
    policy.check_model(model, model_dir)
    if cfg.vocab.size is not None:
        from .fleet_vocab import check_vocabulary_request, rows_of

        check_vocabulary_request(model_dir, cfg.vocab.size, rows_of(model))
    plans = policy.plan_devices(model, cfg.fleet.clients)   # the ServerApp's planner, on the meta model
    check_ranks(cfg.training.aggregation, policy.adapter_ranks([p for p in plans if not p.refused]))
    return [p.to_dict() for p in plans]


def check_teacher(model_dir: str, cfg: RecoverConfig) -> None:
    """--teacher: a model whose vocabulary lines up with the student's, that fits the server when
    the server distils, and the server's text when it distils; all from configs, no weights read."""
    from .distill import check_fits_server, resolve_teacher, vocabulary_link

    d = cfg.distill
    if d.teacher is None:
        return
    spec = resolve_teacher(d.teacher, model_dir)
    vocabulary_link(spec, model_dir)
    if d.on_server:
        check_fits_server(spec, model_dir)
    if d.data:
        import llmprune

        llmprune.load_texts(d.data)


def check_resumable(state: Path, cfg: RecoverConfig, model_dir: str) -> None:
    """--resume: the saved state must be readable and match, before any data or Flower work."""
    from .lora import module_shapes
    from .state import check_policy_state, load_state

    policy = get_policy(cfg.policy.name)(cfg)
    model = meta_model(policy.resume_model_dir(model_dir, state))   # prune-tune: the latest re-pruned checkpoint
    plans = policy.plan_devices(model, cfg.fleet.clients)[:cfg.fleet.clients]   # client i gets device i
    shapes = module_shapes(model, cfg.training.target_modules)
    trained = {m for p in plans if not p.refused for m in policy.adapter_modules(shapes, p)}
    expected = {f"{m}.{part}": np.empty((shapes[m][0], 1) if part == "B" else (1, shapes[m][1]), np.float32)
                for m in trained for part in ("A", "B")}
    saved = load_state(state, cfg, model=str(Path(model_dir).resolve()), expected=expected)
    check_policy_state(policy, saved, model, state)


def preflight(model_dir: str, data: list[str], cfg: RecoverConfig, out: Path, state: Path, *,
              resume: bool, overwrite: bool) -> None:
    """Every check of `llmprune recover` before anything runs or is written."""
    from llmprune.checkpoint import check_output_dir

    check_checkpoint(model_dir)
    if not data:
        raise LLMPruneError("no --data given", "pass one or more text files, folders or HF dataset names")
    if resume and not overwrite and out.is_dir() and any(out.iterdir()):
        raise LLMPruneError(f"--out '{out}' holds the model of the run being resumed, which had finished",
                            "pass --resume --overwrite (and more --rounds) to continue it: the model is replaced at the end")
    check_output_dir(out, overwrite, marker="pruning_report.json")
    check_plan(model_dir, cfg)
    check_teacher(model_dir, cfg)
    if not resume and (state / "state.json").exists() and not overwrite:
        raise LLMPruneError(f"'{state}' holds rounds of an earlier run",
                            "pass --resume to continue it, or --overwrite to start over")
    if resume:
        check_resumable(state, cfg, model_dir)
