"""`recover()`: federated LoRA recovery of a checkpoint in Flower's simulation on this machine
(one CPU per client), with the same ServerApp/ClientApp a real fleet runs."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from llmprune.errors import LLMPruneError

from .config import RecoverConfig, RunSettings

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
PARTITIONS_FILE = "partitions.npz"


@dataclass
class RecoverResult:
    out: Path
    metrics: dict


def state_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.rounds"


def _check_checkpoint(model_dir: str) -> None:
    import llmprune

    path = Path(model_dir)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LLMPruneError(f"'{model_dir}' is not a checkpoint folder (no config.json)",
                            "pass a folder written by `llmprune compress` (or any HF model folder)")
    llmprune.adapter_for(llmprune.load_config(model_dir))


def meta_model(model_dir: str):
    """The checkpoint's module tree on the meta device (shapes, no weights): enough to plan
    the fleet before anything is loaded."""
    import torch

    import llmprune
    from llmprune.checkpoint import model_class

    config = llmprune.load_config(model_dir)
    with torch.device("meta"):
        return model_class(config)(config)


def check_fleet(model_dir: str, cfg: RecoverConfig) -> list[dict]:
    """Every device of the fleet file gets a rank and depth that fit, or the error says which
    device and what budget it needs, before Flower starts."""
    from .fleet import check_ranks, plan_devices

    plans = plan_devices(meta_model(model_dir), cfg, cfg.clients)  # the ServerApp's planner, on the meta model
    check_ranks(cfg.aggregation, {p.rank for p in plans})
    return [p.to_dict() for p in plans]


def prepare_data(model_dir: str, data: list[str], cfg: RecoverConfig, path: Path) -> dict:
    """Tokenize and partition once, before Flower starts, so bad data fails early and every
    simulated client reads its share from one file."""
    import llmprune

    from .partition import build_client_data

    tokenizer = llmprune.load_tokenizer(model_dir)
    client_data = build_client_data(tokenizer, list(data), cfg.clients, cfg.partition, cfg.seq_len, cfg.seed,
                                    cfg.max_windows, cfg.eval_data, cfg.eval_windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    client_data.save(tmp)
    os.replace(tmp, path)
    return {"clients": client_data.stats,
            "eval_windows": 0 if client_data.eval_windows is None else int(client_data.eval_windows.shape[0])}


def run_config(model_dir: str, cfg: RecoverConfig, out: Path, state: Path, *, resume: bool, overwrite: bool) -> dict:
    settings = RunSettings(model=str(Path(model_dir).resolve()), out=str(out.resolve()), state_dir=str(state.resolve()),
                           resume=resume, overwrite=overwrite, data_cache=str((state / PARTITIONS_FILE).resolve()))
    return {**cfg.to_run_config(), **settings.to_run_config()}


def recover(model_dir: str | os.PathLike, data: list[str], config: RecoverConfig, out: str | os.PathLike, *,
            resume: bool = False, overwrite: bool = False, verbose: bool = False) -> RecoverResult:
    """Run the federated recovery in simulation; writes the merged checkpoint and metrics.json
    to `out` (atomically, at the end) and per-round checkpoints to `out`.rounds/."""
    from flwr.simulation import run_simulation

    from llmprune.checkpoint import check_output_dir

    from .client_app import build_client_app
    from .server_app import build_server_app

    model_dir, out = str(model_dir), Path(out)
    _check_checkpoint(model_dir)
    if not data:
        raise LLMPruneError("no --data given", "pass one or more text files, folders or HF dataset names")
    check_output_dir(out, overwrite)
    if config.fleet:
        check_fleet(model_dir, config)
    state = state_dir_for(out)
    if not resume and (state / "state.json").exists() and not overwrite:
        raise LLMPruneError(f"'{state}' holds rounds of an earlier run", "pass --resume to continue it, or --overwrite to start over")
    data_stats = prepare_data(model_dir, data, config, state / PARTITIONS_FILE)
    overrides = run_config(model_dir, config, out, state, resume=resume, overwrite=overwrite)
    cpus = os.cpu_count() or 1
    # A client process that dies (a device vanishing) is restarted by ray, and a job handed to it while it
    # restarts is retried once: Flower puts the dead actor back in its pool, which failed other clients too.
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 1},
               "init_args": {"num_cpus": cpus, "include_dashboard": False,
                             "logging_level": "info" if verbose else "error", "log_to_driver": verbose}}
    _quiet_flower(verbose)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(build_server_app(overrides), build_client_app(overrides), num_supernodes=config.clients,
                   backend_config=backend, verbose_logging=verbose)
    metrics_path = out / METRICS_FILE
    if not metrics_path.is_file():
        raise LLMPruneError("the federated run ended without writing a model", "run again with --debug to see Flower's log")
    metrics = json.loads(metrics_path.read_text())
    metrics["data"] = data_stats
    return RecoverResult(out, metrics)


def _quiet_flower(verbose: bool) -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)  # its round-by-round INFO and a deprecation notice
