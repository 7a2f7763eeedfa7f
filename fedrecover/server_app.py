"""The Flower ServerApp: loads the checkpoint, finds the clients, plans the fleet, builds the
LoraStrategy (strategy.py, which owns each round) and runs its rounds, then writes the merged
model and metrics.json.

Run config keys are RecoverConfig's and RunSettings' fields with dashes (see
fedrecover/app/pyproject.toml), parsed once by `parse_run_config`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from llmprune.errors import LLMPruneError

from .config import RecoverConfig, RunSettings, parse_run_config
from .lora import module_shapes, modules_of
from .policy import FleetPlan, FleetPolicy, plan_fleet
from .state import RoundState, load_state, save_state
from .strategy import LoraStrategy, PlainTransport, RoundResult, SecAggTransport

__all__ = ["FleetPlan", "LoraStrategy", "RoundResult", "build_server_app", "discover", "plan_fleet", "run_server",
           "write_recovered"]
log = logging.getLogger(__name__)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise LLMPruneError(f"only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s",
                                "start more flower-supernode processes, or lower --clients")
        time.sleep(0.5)


def discover(grid: Grid, nodes: list[int], timeout: float) -> dict[int, dict]:
    """Ask every node which client it is (partition id, example count, device name)."""
    messages = [Message(RecordDict({"config": ConfigRecord({"what": "identity"})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
    found = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
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
    state = load_state(settings.state_path, cfg, model=settings.model)
    log.info("resuming after round %d from %s", state.round, settings.state_path)
    # safetensors gives the names sorted: back to the run's order, in which DP noise is drawn
    state.arrays = {**{k: state.arrays[k] for k in init if k in state.arrays}, **state.arrays}
    return state


def build_strategy(cfg: RecoverConfig, settings: RunSettings, plan: FleetPlan, found: dict[int, dict], model,
                   evaluate_fn, grid: Grid, context: Context) -> LoraStrategy:
    if cfg.secagg:
        max_weight = float(max(info["num-examples"] for info in found.values()) + 1)
        transport = SecAggTransport(grid, context, cfg.aggregation, max_weight, cfg.round_timeout)
    else:
        transport = PlainTransport(grid, cfg.round_timeout)
    return LoraStrategy(cfg, FleetPolicy(plan), plan.partitions, module_shapes(model, cfg.target_modules), plan.init,
                        plan.rank, transport=transport, evaluate=evaluate_fn,
                        checkpoint=lambda state: save_state(settings.state_path, state, cfg, model=settings.model))


def run_server(grid: Grid, context: Context, overrides: dict | None = None) -> None:
    """The whole federated run (the ServerApp's main)."""
    import llmprune
    from llmprune.memory import peak_rss_mb
    from tqdm import tqdm

    cfg, settings = parse_run_config({**dict(context.run_config), **(overrides or {})})
    model, tokenizer = llmprune.load(settings.model)
    model.eval()
    started = time.perf_counter()

    nodes = wait_for_nodes(grid, cfg.clients, cfg.node_timeout)
    # a client's first answer waits for its process to start and load data: the connect timeout,
    # not the (possibly short) round timeout
    found = discover(grid, nodes, max(cfg.node_timeout, cfg.round_timeout))
    plan = plan_fleet(model, cfg, found)
    windows = eval_windows(cfg, settings, tokenizer)
    model_bytes = int(sum(p.numel() * p.element_size() for p in model.parameters()))
    evaluate_fn = lambda arrays: evaluate(model, arrays, cfg.scale, windows)  # noqa: E731
    state = start_state(cfg, settings, plan.init, evaluate_fn)
    strategy = build_strategy(cfg, settings, plan, found, model, evaluate_fn, grid, context)
    for server_round in tqdm(range(state.round + 1, cfg.rounds + 1), desc="rounds", unit="round",
                             initial=state.round, total=cfg.rounds):
        strategy.run_round(server_round, grid, state)

    metrics = {
        "rounds": state.rounds, "devices": plan.devices,
        "initial_eval_perplexity": state.initial_eval_perplexity,
        "final_eval_perplexity": state.rounds[-1]["eval_perplexity"] if state.rounds else state.initial_eval_perplexity,
        "model_bytes": model_bytes, "adapter_bytes": int(sum(a.nbytes for a in state.arrays.values())),
        "aggregation": cfg.aggregation, "config": {**cfg.to_run_config(), **settings.to_run_config()},
        "server_seconds": round(time.perf_counter() - started, 2), "server_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write_recovered(model, tokenizer, state.arrays, cfg.scale, settings.out_dir, metrics, settings.model,
                    overwrite=settings.overwrite)
    context.state["metrics"] = ConfigRecord({"json": json.dumps(metrics, default=str)})


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


def build_server_app(overrides: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, overrides)

    return app


app = build_server_app()
