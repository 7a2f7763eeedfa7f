"""`recover()`: federated LoRA recovery of a checkpoint in Flower's simulation on this machine
(one CPU per client), with the same ServerApp/ClientApp a real fleet runs."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmprune.errors import LLMPruneError

from .config import RecoverConfig, RunSettings
from .strategy import STOP

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
    """A checkpoint folder whose config and weights agree, checked without reading the weights:
    the clients load it in other processes, where a broken checkpoint would surface only as a
    failed round."""
    from llmprune.models import check_checkpoint, resolve_model_spec

    def not_a_checkpoint() -> LLMPruneError:
        return LLMPruneError(f"'{model_dir}' is not a checkpoint folder (no config.json)",
                             "pass a folder written by `llmprune compress` (or any HF model folder)")

    path = Path(model_dir)
    if path.is_dir() and not (path / "config.json").is_file():
        raise not_a_checkpoint()
    source = resolve_model_spec(model_dir)  # a device, a FIFO, a name that is not UTF-8: one line each
    if source.kind != "folder" or not path.is_dir():
        raise not_a_checkpoint()
    check_checkpoint(source)


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

    model = meta_model(model_dir)
    plans = plan_devices(model, cfg, cfg.clients)  # the ServerApp's planner, on the meta model
    check_ranks(cfg.aggregation, {p.rank for p in plans if not p.refused})
    if cfg.submodel_granularity == "sublayer":
        check_sublayer_skip_on_random(model)
    return [p.to_dict() for p in plans]


def check_adaptive(model_dir: str, cfg: RecoverConfig) -> None:
    """Staged growth and prune-tune settings the checkpoint must allow, refused in one line before
    Flower starts: a schedule longer than the model or than the rounds, a target ratio below the
    checkpoint's, prune-tune without server text."""
    if cfg.schedule:
        from .devft import parse_schedule, stage_of_rounds

        meta = meta_model(model_dir)
        from llmprune.arch import adapter_for

        stage_of_rounds(parse_schedule(cfg.schedule, len(adapter_for(meta).decoder_layers(meta))), cfg.rounds)
    if cfg.target_ratio is not None:
        from .prune_rounds import calibration_text, plan_pruning

        plan_pruning(meta_model(model_dir), cfg, model_dir)
        source = calibration_text(cfg)
        if not Path(source).exists():
            raise LLMPruneError(f"--prune-data '{source}' does not exist", "pass a text file the server holds")


def check_sublayer_skip_on_random(meta) -> None:
    """Whether this architecture lets attention and MLP blocks be skipped (the residual passes
    through), probed on one decoder layer with random weights: no checkpoint weights are read."""
    import copy

    import torch

    from llmprune.arch import adapter_for

    from .client_model import check_sublayer_skip

    layer = copy.deepcopy(adapter_for(meta).decoder_layers(meta)[0]).to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.05)
    check_sublayer_skip(layer)


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
    from llmprune.checkpoint import check_output_dir

    model_dir, out = str(model_dir), Path(out)
    _check_checkpoint(model_dir)
    if not data:
        raise LLMPruneError("no --data given", "pass one or more text files, folders or HF dataset names")
    check_output_dir(out, overwrite, marker="pruning_report.json")
    if config.fleet:
        check_fleet(model_dir, config)
    check_adaptive(model_dir, config)
    state = state_dir_for(out)
    if not resume and (state / "state.json").exists() and not overwrite:
        raise LLMPruneError(f"'{state}' holds rounds of an earlier run", "pass --resume to continue it, or --overwrite to start over")
    if resume:
        check_resumable(state, config, model_dir)
    before = _snapshot(out, state)
    try:
        data_stats = prepare_data(model_dir, data, config, state / PARTITIONS_FILE)
        overrides = run_config(model_dir, config, out, state, resume=resume, overwrite=overwrite)
        _run_simulation(model_dir, config, overrides, verbose)
    except KeyboardInterrupt:
        raise RecoverInterrupted(interrupted(out, state, before, resume)) from None
    except BaseException:
        _remove_new(out, state, before, keep_rounds=True)
        raise
    finally:
        STOP.clear()
    metrics_path = out / METRICS_FILE
    if not metrics_path.is_file():
        raise LLMPruneError("the federated run ended without writing a model", "run again with --debug to see Flower's log")
    metrics = json.loads(metrics_path.read_text())
    metrics["data"] = data_stats
    return RecoverResult(out, metrics)


class RecoverInterrupted(KeyboardInterrupt):
    """Ctrl-C during recover(): Ray is shut down, and the message says what was kept."""


def check_resumable(state: Path, cfg: RecoverConfig, model_dir: str) -> None:
    """--resume: the saved state must be readable and match, before any data or Flower work."""
    from .lora import module_shapes, top_layer_modules
    from .fleet import plan_devices
    from .state import load_state

    model = meta_model(model_dir)
    if cfg.target_ratio is not None:   # the saved rounds trained on the latest re-pruned checkpoint
        from .prune_rounds import FOLDER_PREFIX, plan_pruning
        from .state import saved_round

        _, _, events = plan_pruning(model, cfg, model_dir)
        done = [r for r in events if r <= saved_round(state)]
        if done:
            model = meta_model(str(state / f"{FOLDER_PREFIX}{max(done):03d}"))
    plans = plan_devices(model, cfg, cfg.clients)[:cfg.clients]   # client i gets device i, as in the simulation
    shapes = module_shapes(model, cfg.target_modules)
    if cfg.submodels or cfg.schedule:
        trained = set(shapes)
    else:
        trained = {m for p in plans if not p.refused for m in top_layer_modules(shapes, p.depth)}
    expected = {f"{m}.{part}": np.empty((shapes[m][0], 1) if part == "B" else (1, shapes[m][1]), np.float32)
                for m in trained for part in ("A", "B")}
    load_state(state, cfg, model=str(Path(model_dir).resolve()), expected=expected)


def simulation_env() -> dict[str, str]:
    """The environment Ray's processes get: ClientApp actors at normal priority (Ray's default
    nice 15 starves them on a busy machine), and token authentication on every Ray service
    (Ray 2.55 binds its gRPC ports on all interfaces; the random token exists only in this
    process's environment and its children's). A user's own RAY_AUTH_MODE is kept."""
    env = {"RAY_worker_niceness": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    if "RAY_AUTH_MODE" not in os.environ or os.environ.get("RAY_AUTH_TOKEN") == _ray_token():
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_ray_token())
    return env


@functools.lru_cache(maxsize=1)
def _ray_token() -> str:
    """One random token per process: Ray's driver caches the token it first read."""
    import secrets

    return secrets.token_hex(32)


def _run_simulation(model_dir: str, config: RecoverConfig, overrides: dict, verbose: bool) -> None:
    from flwr.simulation import run_simulation

    from .client_app import build_client_app
    from .server_app import build_server_app

    cpus = os.cpu_count() or 1
    # A client process that dies (a device vanishing) is restarted by ray, and a job handed to it while it
    # restarts is retried once: Flower puts the dead actor back in its pool, which failed other clients too.
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0, "max_restarts": -1, "max_task_retries": 1},
               "init_args": {"num_cpus": cpus, "include_dashboard": False,
                             "logging_level": "info" if verbose else "error", "log_to_driver": verbose}}
    _quiet_flower(verbose)
    saved = {k: os.environ.get(k) for k in simulation_env()}
    os.environ.update(simulation_env())
    try:
        run_simulation(build_server_app(overrides, simulation=True), build_client_app(overrides),
                       num_supernodes=config.clients, backend_config=backend, verbose_logging=verbose)
    except KeyboardInterrupt:
        STOP.set()              # the ServerApp thread stops waiting for replies
        shutdown_ray()
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown_ray() -> None:
    """Stop Ray (its GCS, raylet and ClientApp workers) if this process started it."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort while interrupted
            pass


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively, from /proc (Linux; elsewhere none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_children(grace: float = 3.0) -> None:
    """Terminate this process's remaining child processes (Ray's GCS, raylet, workers), then kill
    what is left after `grace` seconds."""
    import signal
    import time

    pids = _descendants(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            pids = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
            if not pids:
                return
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


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


def _quiet_flower(verbose: bool) -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)  # its round-by-round INFO and a deprecation notice
