"""The Flower ServerApp: loads the checkpoint, finds the clients, plans the fleet, builds the
LoraStrategy (strategy.py, which owns each round) and runs its rounds, then writes the merged
model and metrics.json.

Run config keys are RecoverConfig's and RunSettings' fields with dashes (see
fedrecover/app/pyproject.toml), parsed once by `parse_run_config`."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from llmprune.errors import LLMPruneError

from .config import RecoverConfig, RunSettings, parse_run_config
from .lora import module_shapes, modules_of
from .policy import FleetPlan, FleetPolicy, plan_fleet
from .state import RoundState, load_state, save_state, saved_round
from .strategy import STOP, LoraStrategy, PlainTransport, RoundResult, RunStopped, SecAggTransport, send_and_receive

__all__ = ["FleetPlan", "LoraStrategy", "RoundResult", "SERVER_ROOT_ENV", "build_server_app", "discover", "plan_fleet",
           "run_server", "server_paths", "write_recovered"]
log = logging.getLogger(__name__)
# On a fleet the run config comes from whoever can reach the Control API: the server reads and
# writes only inside this folder, which the operator sets on the server machine.
SERVER_ROOT_ENV = "LLMPRUNE_SERVER_ROOT"
SERVER_PATH_KEYS = ("model", "out", "state_dir", "fleet", "eval_data")


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise LLMPruneError(f"only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s",
                                "start more flower-supernode processes, or lower --clients")
        if STOP.is_set():
            raise RunStopped("interrupted")
        time.sleep(0.5)


def discover(grid: Grid, nodes: list[int], timeout: float | None) -> dict[int, dict]:
    """Ask every node which client it is (partition id, example count, device name); timeout
    None waits for every answer (simulation)."""
    messages = [Message(RecordDict({"config": ConfigRecord({"what": "identity"})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    found = {}
    for reply in send_and_receive(grid, messages, timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d failed to identify itself: %s", node, reply.error.reason.splitlines()[-1][:200])
            continue
        metrics = reply.content["metrics"]
        device = reply.content.config_records.get("device")
        found[node] = {"partition-id": int(metrics["partition-id"]), "num-examples": int(metrics["num-examples"]),
                       "device": str(device["name"]) if device else None}
    if not found:
        raise LLMPruneError("no SuperNode answered", "check the SuperNodes' logs (data or model missing?)")
    return found


def evaluate(model, arrays: dict[str, np.ndarray], scale: float, windows) -> float | None:
    from llmprune.evaluate import perplexity

    from .lora import lora_applied

    if windows is None:
        return None
    with lora_applied(model, arrays, scale):
        return round(perplexity(model, windows, progress=False).perplexity, 4)


def eval_windows(cfg: RecoverConfig, settings: RunSettings, tokenizer):
    import llmprune

    if cfg.eval_data:
        return llmprune.token_windows(tokenizer, llmprune.load_texts(cfg.eval_data), cfg.seq_len, cfg.eval_windows)
    if settings.data_cache:
        from .partition import ClientData

        return ClientData.load(settings.data_cache).eval_windows
    return None


def start_state(cfg: RecoverConfig, settings: RunSettings, init: dict[str, np.ndarray], evaluate_fn) -> RoundState:
    """The saved state to continue with --resume, else round 0 at the seeded initial adapter."""
    if not settings.resume:
        return RoundState(round=0, arrays=init, rounds=[], initial_eval_perplexity=evaluate_fn(init))
    state = load_state(settings.state_path, cfg, model=settings.model, expected=init)
    log.info("resuming after round %d from %s", state.round, settings.state_path)
    # safetensors gives the names sorted: back to the run's order, in which DP noise is drawn
    state.arrays = {**{k: state.arrays[k] for k in init if k in state.arrays}, **state.arrays}
    return state


def build_policy(model, cfg: RecoverConfig, plan: FleetPlan, windows):
    """Who trains what each round: the fleet plan as it is, (--submodels) a per-round submodel cut,
    (--policy bandit) a learned arm per device, or (--schedule devft:...) the stage's fused model."""
    if cfg.policy == "bandit":
        from .adaptive import build_bandit_policy

        return build_bandit_policy(model, cfg, plan, windows)
    if cfg.schedule:
        from .adaptive import build_stage_policy

        return build_stage_policy(model, cfg, plan, windows)
    if cfg.submodels:
        from .policy import build_submodel_policy

        return build_submodel_policy(model, cfg, plan, windows)
    return FleetPolicy(plan)


def build_strategy(cfg: RecoverConfig, settings: RunSettings, plan: FleetPlan, found: dict[int, dict], model,
                   evaluate_fn, grid: Grid, context: Context, *, simulation: bool = False, policy=None) -> LoraStrategy:
    timeout = cfg.round_deadline(simulation)
    if cfg.secagg:
        max_weight = float(max(info["num-examples"] for info in found.values()) + 1)
        transport = SecAggTransport(grid, context, cfg.aggregation, max_weight, timeout)
    else:
        transport = PlainTransport(grid, timeout)
    return LoraStrategy(cfg, policy or FleetPolicy(plan), plan.partitions, module_shapes(model, cfg.target_modules), plan.init,
                        plan.rank, transport=transport, evaluate=evaluate_fn,
                        checkpoint=lambda state: save_state(settings.state_path, state, cfg, model=settings.model))


def server_paths(cfg: RecoverConfig, settings: RunSettings, root: str | None) -> tuple[RecoverConfig, RunSettings]:
    """On a fleet, the server-side paths of a run config (model, out, state-dir, fleet, eval-data)
    resolved inside the operator's root (LLMPRUNE_SERVER_ROOT; relative paths are relative to it);
    anything outside it, a data-cache, or an overwrite of a folder that is not an earlier output
    is refused with one line."""
    from dataclasses import replace

    if not root:
        raise LLMPruneError(f"this server has no {SERVER_ROOT_ENV}: a run config may not choose server paths",
                            f"set {SERVER_ROOT_ENV}=/srv/llmprune (the folder runs may read and write) in the "
                            "environment of flower-superlink, and restart it")
    base = Path(root).resolve()
    if not base.is_dir():
        raise LLMPruneError(f"{SERVER_ROOT_ENV} '{root}' is not a folder", f"create it or point {SERVER_ROOT_ENV} at one")
    if settings.data_cache:
        raise LLMPruneError("run-config key 'data-cache' is for the simulation only", "leave data-cache empty on a fleet")

    def inside(key: str, value: str) -> str:
        path = (base / value).resolve()        # an absolute value stays absolute; symlinks and .. are resolved
        if not path.is_relative_to(base):
            raise LLMPruneError(f"run-config key '{key.replace('_', '-')}' = '{value}' is outside the server root "
                                f"'{base}'", f"use a path inside {SERVER_ROOT_ENV} ('{base}'), e.g. a relative one")
        return str(path)

    settings = replace(settings, model=inside("model", settings.model or "."), out=inside("out", settings.out or "recovered"),
                       state_dir=inside("state_dir", settings.state_dir) if settings.state_dir else "")
    cfg = replace(cfg, fleet=inside("fleet", cfg.fleet) if cfg.fleet else None,
                  eval_data=inside("eval_data", cfg.eval_data) if cfg.eval_data else None)
    out = settings.out_dir
    if settings.overwrite and out.exists() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise LLMPruneError(f"overwrite=true would replace '{out}', which is not an output of llmprune recover",
                            "choose another out, or remove that folder on the server yourself")
    return cfg, settings


def run_server(grid: Grid, context: Context, overrides: dict | None = None, *, simulation: bool = False) -> None:
    """The whole federated run (the ServerApp's main). `simulation` (set by `llmprune recover`,
    never by a run config): the local user's paths are taken as given, and rounds wait for every
    sampled client unless --round-timeout is given."""
    import llmprune
    from llmprune.memory import peak_rss_mb
    from tqdm import tqdm

    cfg, settings = parse_run_config({**dict(context.run_config), **(overrides or {})})
    if not simulation:
        cfg, settings = server_paths(cfg, settings, os.environ.get(SERVER_ROOT_ENV))
    model, tokenizer = llmprune.load(settings.model)
    model.eval()
    started = time.perf_counter()
    pruning, model_path = None, None
    if cfg.target_ratio is not None:
        model, pruning, model_path = start_pruning(cfg, settings, model, simulation)

    nodes = wait_for_nodes(grid, cfg.clients, cfg.node_timeout)
    # a client's first answer waits for its process to start and load data: the connect timeout,
    # not the (possibly short) round timeout; in simulation, for every client
    deadline = cfg.round_deadline(simulation)
    found = discover(grid, nodes, None if deadline is None else max(cfg.node_timeout, deadline))
    plan = plan_fleet(model, cfg, found)
    windows = eval_windows(cfg, settings, tokenizer)
    model_bytes = int(sum(p.numel() * p.element_size() for p in model.parameters()))
    evaluate_fn = lambda arrays: evaluate(model, arrays, cfg.scale, windows)  # noqa: E731
    state = start_state(cfg, settings, plan.init, evaluate_fn)
    policy = build_policy(model, cfg, plan, windows)
    if hasattr(policy, "load_state_dict"):   # a policy with state continues where the saved run left it
        policy.load_state_dict(state.policy or {})
    strategy = build_strategy(cfg, settings, plan, found, model, evaluate_fn, grid, context, simulation=simulation,
                              policy=policy)
    strategy.model_path = model_path
    for server_round in tqdm(range(state.round + 1, cfg.rounds + 1), desc="rounds", unit="round",
                             initial=state.round, total=cfg.rounds):
        if pruning is not None and server_round in pruning.events:   # prune-tune: the model shrinks, the LoRA follows
            model, state.arrays = pruning.step(server_round, model, tokenizer, state.arrays, cfg.scale)
            plan = plan_fleet(model, cfg, found)
            strategy = build_strategy(cfg, settings, plan, found, model, evaluate_fn, grid, context,
                                      simulation=simulation)
            strategy.model_path = model_path = str(pruning.folder(server_round))
            strategy.round_note = {"prune": pruning.steps[-1]}
        strategy.run_round(server_round, grid, state)
    check_some_round_applied(state.rounds, cfg.round_deadline(simulation), settings.state_path)

    metrics = {
        "rounds": state.rounds, "devices": plan.devices, "refused": plan.refused,
        "submodels": getattr(policy, "profile", None),
        "prune_tune": {"dense_decoder_params": pruning.dense, "start_ratio": pruning.start, "steps": pruning.steps}
        if pruning is not None else None,
        "initial_eval_perplexity": state.initial_eval_perplexity,
        "final_eval_perplexity": state.rounds[-1]["eval_perplexity"] if state.rounds else state.initial_eval_perplexity,
        "model_bytes": model_bytes, "adapter_bytes": int(sum(a.nbytes for a in state.arrays.values())),
        "aggregation": cfg.aggregation, "config": {**cfg.to_run_config(), **settings.to_run_config()},
        "server_seconds": round(time.perf_counter() - started, 2), "server_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write_recovered(model, tokenizer, state.arrays, cfg.scale, settings.out_dir, metrics, model_path or settings.model,
                    overwrite=settings.overwrite)
    context.state["metrics"] = ConfigRecord({"json": json.dumps(metrics, default=str)})


def start_pruning(cfg: RecoverConfig, settings: RunSettings, model, simulation: bool):
    """Prune-tune's server side: the schedule of pruning steps, and on --resume the re-pruned
    checkpoint the saved rounds trained on (returned as the model and the path clients load)."""
    import llmprune

    from .prune_rounds import PruneRounds

    if not simulation:
        raise LLMPruneError("prune-tune (--target-ratio) needs the devices to load each re-pruned checkpoint, "
                            "which only a simulation can hand them", "run it with llmprune recover")
    pruning = PruneRounds(cfg, settings.state_path, model, settings.model)
    latest = pruning.latest_before(saved_round(settings.state_path)) if settings.resume else None
    if latest is None:
        return model, pruning, None
    model = llmprune.load(str(latest))[0].eval()
    return model, pruning, str(latest)


def check_some_round_applied(rows: list[dict], timeout: float | None, state_path: Path) -> None:
    """A run in which no round changed the adapter would write the input model as "recovered":
    refuse with one line (the per-round warnings above say what failed)."""
    if any(row["applied"] for row in rows):
        return
    got = ", ".join(f"{row['clients_returned']}/{row['clients_sampled']}" for row in rows)
    waited = "" if timeout is None else f" within the {timeout:.0f} s round timeout"
    raise LLMPruneError(f"no round was applied (clients returned{waited} per round: {got}), so no recovered model "
                        "was written", "see the warnings above for why clients failed; on a fleet raise round-timeout "
                        f"or lower min-clients; the rounds are in '{state_path}' (start over with --overwrite)")


def write_recovered(model, tokenizer, arrays, scale: float, out: Path, metrics: dict, source: str, overwrite: bool) -> None:
    """Fold the adapter into the weights and write a checkpoint like compress's, with metrics.json."""
    from llmprune.checkpoint import REPORT_FILE, save_pruned

    from .lora import merge_lora

    merge_lora(model, arrays, scale)
    report_path = Path(source) / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["recovery"] = {k: metrics[k] for k in ("initial_eval_perplexity", "final_eval_perplexity", "aggregation")}
    report["recovery"].update(source=str(source), rounds=len(metrics["rounds"]),
                              modules=len(modules_of(arrays)))
    save_pruned(model, tokenizer, out, report=report, overwrite=overwrite,
                extra_files={"metrics.json": json.dumps(metrics, indent=2, default=str)})


def build_server_app(overrides: dict | None = None, *, simulation: bool = False) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, overrides, simulation=simulation)

    return app


app = build_server_app()
