"""The Flower ServerApp: samples clients, sends each its slice of the global adapter (its rank,
its layers), aggregates what comes back within the round timeout, evaluates, checkpoints every
round, and at the end writes the merged model and metrics.json.

Run config keys are RecoverConfig's fields with dashes (see fedrecover/app/pyproject.toml), plus
`model` (checkpoint folder), `out` (output folder), `state-dir` (per-round checkpoints, default
OUT.rounds), `resume`, `overwrite`, `data-cache` (simulation partitions) and `eval-data`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import MessageType
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from llmprune.errors import LLMPruneError

from .aggregation import ClientUpdate, aggregate, client_view
from .client_app import from_record, to_record
from .config import RecoverConfig
from .fleet import Assignment, assign_devices, check_ranks, load_fleet, uniform_assignments
from .lora import init_arrays, module_shapes, modules_of, top_layer_modules
from .state import RoundState, load_state, save_state

log = logging.getLogger(__name__)


def _payload_bytes(record: ArrayRecord) -> int:
    return int(sum(len(arr.data) for arr in record.values()))


class LoraStrategy(Strategy):
    """Heterogeneous LoRA rounds as a Flower strategy (so Flower's DP wrappers can wrap it):
    per-client messages in configure_train, fedavg/hetlora/flexlora in aggregate_train."""

    def __init__(self, cfg: RecoverConfig, clients: dict[int, tuple[int, Assignment]], init: dict[str, np.ndarray],
                 modules: dict[int, list[str]], rank: int) -> None:
        self.cfg = cfg
        self.clients = clients            # node id -> (partition id, assignment)
        self.init = init
        self.modules = modules            # partition id -> canonical modules it trains
        self.rank = rank
        self.global_arrays: dict[str, np.ndarray] = dict(init)
        self.round_info: dict = {}

    def sample(self, server_round: int) -> list[int]:
        """Seeded by (seed, round) over partition ids, so a resumed run samples what the
        uninterrupted one would have, whatever node ids this run's SuperNodes got."""
        by_pid = sorted(self.clients, key=lambda node: self.clients[node][0])
        k = max(1, round(self.cfg.fraction * len(by_pid)))
        rng = np.random.default_rng([self.cfg.seed, server_round])
        return [by_pid[i] for i in sorted(rng.choice(len(by_pid), size=k, replace=False))]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_arrays = from_record(arrays)
        messages, down = [], 0
        for node in self.sample(server_round):
            pid, plan = self.clients[node]
            view = client_view(self.cfg.aggregation, self.global_arrays, self.modules[pid], plan.rank, self.init)
            record = to_record(view)
            down += _payload_bytes(record)
            node_config = ConfigRecord(dict(config))
            node_config["server-round"] = server_round
            node_config["local-steps"] = max(1, round(self.cfg.local_steps * plan.speed))
            node_config["seed"] = int(np.random.default_rng([self.cfg.seed, server_round, pid]).integers(2**31))
            messages.append(Message(RecordDict({"arrays": record, "config": node_config}), dst_node_id=node,
                                    message_type=MessageType.TRAIN))
        self.round_info = {"sampled": len(messages), "bytes_down": down}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates, losses, weights = [], [], []
        for reply in replies:
            if reply.has_error():
                continue
            metrics = reply.content["metrics"]
            arrays = from_record(reply.content["arrays"])
            updates.append(ClientUpdate(arrays, float(metrics["num-examples"]), str(metrics["partition-id"])))
            losses.append(float(metrics["train-loss"]))
            weights.append(float(metrics["num-examples"]))
        if not updates:
            return None, None
        new = aggregate(self.cfg.aggregation, updates, self.global_arrays, self.rank)
        loss = float(np.average(losses, weights=weights))
        return to_record(new), MetricRecord({"train-loss": loss, "num-examples": int(sum(weights))})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation is centralized, on the server's held-out windows

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("LoRA strategy: %s, %d clients, global rank %d", self.cfg.aggregation, len(self.clients), self.rank)


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


def plan_devices(model, cfg: RecoverConfig, count: int) -> list[Assignment]:
    if cfg.fleet:
        devices = load_fleet(cfg.fleet)
        plans = assign_devices(model, devices, cfg.lora_rank, cfg.batch_size, cfg.seq_len, cfg.target_modules)
        return [plans[i % len(plans)] for i in range(count)] if len(plans) < count else plans
    return uniform_assignments(model, count, cfg.lora_rank, cfg.batch_size, cfg.seq_len, cfg.target_modules)


def _match(found: dict[int, dict], plans: list[Assignment]) -> dict[int, tuple[int, Assignment]]:
    """Node -> (partition id, assignment): by device name when the node names one, else by
    partition id (client i gets the fleet's device i)."""
    by_name = {p.device: p for p in plans}
    out = {}
    for node, info in found.items():
        plan = by_name.get(info["device"]) if info["device"] else None
        out[node] = (info["partition-id"], plan or plans[info["partition-id"] % len(plans)])
    return out


def evaluate(model, arrays: dict[str, np.ndarray], scale: float, windows) -> float | None:
    from llmprune.evaluate import perplexity

    from .lora import lora_applied

    if windows is None:
        return None
    with lora_applied(model, arrays, scale):
        return round(perplexity(model, windows, progress=False).perplexity, 4)


def eval_windows(cfg: RecoverConfig, tokenizer):
    import llmprune

    if cfg.eval_data:
        return llmprune.token_windows(tokenizer, llmprune.load_texts(cfg.eval_data), cfg.seq_len, cfg.eval_windows)
    cache = cfg.extra.get("data-cache")
    if cache:
        from .partition import ClientData

        return ClientData.load(cache).eval_windows
    return None


@dataclass
class FleetPlan:
    """Who trains what: node -> (partition id, assignment), the modules per partition, the global
    rank, the seeded initial adapter over every trained module, and the per-device report."""

    clients: dict[int, tuple[int, Assignment]]
    modules: dict[int, list[str]]
    rank: int
    init: dict[str, np.ndarray]
    devices: list[dict]


def plan_fleet(model, cfg: RecoverConfig, found: dict[int, dict]) -> FleetPlan:
    clients = _match(found, plan_devices(model, cfg, cfg.clients))
    shapes = module_shapes(model, cfg.target_modules)
    modules = {pid: top_layer_modules(shapes, plan.depth) for pid, plan in clients.values()}
    ranks = {plan.rank for _, plan in clients.values()}
    check_ranks(cfg.aggregation, ranks)
    union = [m for m in shapes if any(m in mods for mods in modules.values())]
    init = init_arrays(shapes, union, max(ranks), cfg.seed)
    devices = [{"partition-id": pid, "node-id": node, **plan.to_dict(), "examples": found[node]["num-examples"],
                "modules": len(modules[pid])} for node, (pid, plan) in sorted(clients.items(), key=lambda kv: kv[1][0])]
    return FleetPlan(clients, modules, max(ranks), init, devices)


def run_server(grid: Grid, context: Context, overrides: dict | None = None) -> None:
    """The whole federated run (the ServerApp's main)."""
    import llmprune
    from llmprune.memory import peak_rss_mb

    cfg = RecoverConfig.from_run_config({**dict(context.run_config), **(overrides or {})})
    out = Path(str(cfg.extra.get("out") or "recovered"))
    state_dir = Path(str(cfg.extra.get("state-dir") or f"{out}.rounds"))
    model_dir = str(cfg.extra.get("model") or "")
    model, tokenizer = llmprune.load(model_dir)
    model.eval()
    started = time.perf_counter()

    nodes = wait_for_nodes(grid, cfg.clients, cfg.node_timeout)
    # a client's first answer waits for its process to start and load data: the connect timeout,
    # not the (possibly short) round timeout
    found = discover(grid, nodes, max(cfg.node_timeout, cfg.round_timeout))
    fleet = plan_fleet(model, cfg, found)
    clients, modules, rank, init, devices = fleet.clients, fleet.modules, fleet.rank, fleet.init, fleet.devices
    windows = eval_windows(cfg, tokenizer)
    model_bytes = int(sum(p.numel() * p.element_size() for p in model.parameters()))

    state = load_state(state_dir, cfg) if str(cfg.extra.get("resume", "")).lower() in ("true", "1") else None
    if state is None:
        state = RoundState(round=0, arrays=init, rounds=[],
                           initial_eval_perplexity=evaluate(model, init, cfg.scale, windows))
    else:
        log.info("resuming after round %d from %s", state.round, state_dir)
        # safetensors gives the names sorted: back to the run's order, in which DP noise is drawn
        state.arrays = {**{k: state.arrays[k] for k in init if k in state.arrays}, **state.arrays}

    strategy: Strategy = LoraStrategy(cfg, clients, init, modules, rank)
    inner = strategy
    if cfg.dp_clip is not None:
        sampled = max(1, round(cfg.fraction * len(clients)))
        strategy = DifferentialPrivacyClientSideFixedClipping(inner, cfg.dp_noise, cfg.dp_clip, sampled)
    train_config = {"scale": cfg.scale, "batch-size": cfg.batch_size, "lr": cfg.lr,
                    "uniform-weights": cfg.dp_clip is not None}

    from tqdm import tqdm

    for server_round in tqdm(range(state.round + 1, cfg.rounds + 1), desc="rounds", unit="round",
                             initial=state.round, total=cfg.rounds):
        t0 = time.perf_counter()
        np.random.seed(np.random.default_rng([cfg.seed, server_round, 7]).integers(2**31))  # DP noise
        messages = list(strategy.configure_train(server_round, to_record(state.arrays), ConfigRecord(train_config), grid))
        needed = cfg.min_replies(len(messages))
        if cfg.secagg:
            result = _secagg_round(grid, context, inner, messages, state.arrays, rank, needed, cfg, found)
        else:
            result = _plain_round(grid, strategy, messages, needed, cfg, server_round)
        if result.arrays is not None:
            state.arrays = result.arrays
        if not result.applied:
            log.warning("round %d: %d of %d clients returned, %d needed: the global adapter is unchanged",
                        server_round, len(result.client_metrics), len(messages), needed)
        ok_metrics = result.client_metrics
        row = {"round": server_round, "clients_sampled": len(messages), "clients_returned": len(ok_metrics),
               "applied": result.applied, "train_loss": result.train_loss,
               "eval_perplexity": evaluate(model, state.arrays, cfg.scale, windows),
               "bytes_up": result.bytes_up, "bytes_down": inner.round_info["bytes_down"],
               "bytes_up_per_client_max": result.bytes_up_per_client,
               "client_seconds": [round(float(m["seconds"]), 2) for m in ok_metrics],
               "client_peak_rss_mb": [round(float(m["peak-rss-mb"]), 1) for m in ok_metrics],
               "seconds": round(time.perf_counter() - t0, 2)}
        state.rounds.append(row)
        state.round = server_round
        save_state(state_dir, state, cfg)
        log.info("round %d: %d/%d clients, train loss %s, eval ppl %s, %.1f s", server_round, len(ok_metrics),
                 len(messages), result.train_loss, row["eval_perplexity"], row["seconds"])

    metrics = {
        "rounds": state.rounds, "devices": devices,
        "initial_eval_perplexity": state.initial_eval_perplexity,
        "final_eval_perplexity": state.rounds[-1]["eval_perplexity"] if state.rounds else state.initial_eval_perplexity,
        "model_bytes": model_bytes, "adapter_bytes": int(sum(a.nbytes for a in state.arrays.values())),
        "aggregation": cfg.aggregation, "config": {k: v for k, v in cfg.to_run_config().items()},
        "server_seconds": round(time.perf_counter() - started, 2), "server_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write_recovered(model, tokenizer, state.arrays, cfg.scale, out, metrics, model_dir,
                    overwrite=str(cfg.extra.get("overwrite", "")).lower() in ("true", "1"))
    context.state["metrics"] = ConfigRecord({"json": json.dumps(metrics, default=str)})


@dataclass
class RoundResult:
    arrays: dict[str, np.ndarray] | None
    applied: bool
    train_loss: float | None
    client_metrics: list[dict]
    bytes_up: int
    bytes_up_per_client: int


def _plain_round(grid: Grid, strategy: Strategy, messages: list[Message], needed: int, cfg: RecoverConfig,
                 server_round: int) -> RoundResult:
    """Send, wait up to the round timeout, aggregate what came back if enough did."""
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    ok = [r for r in replies if not r.has_error()]
    for r in replies:
        if r.has_error():
            reason = (r.error.reason or "").strip().splitlines()
            log.warning("round %d: client on node %d failed: %s", server_round, r.metadata.src_node_id,
                        reason[-1][:300] if reason else r.error.code)
    if len(messages) > len(replies):
        log.warning("round %d: %d client(s) did not answer within %.0f s", server_round, len(messages) - len(replies),
                    cfg.round_timeout)
    metrics = [dict(r.content["metrics"]) for r in ok]
    sizes = [_payload_bytes(r.content["arrays"]) for r in ok]
    arrays, loss = None, None
    if len(ok) >= needed:
        # Flower's DP wrapper checks the replies itself (and refuses a round with failures).
        new, agg_metrics = strategy.aggregate_train(server_round, replies if cfg.dp_clip is not None else ok)
        if new is not None:
            arrays = from_record(new)
            loss = float(agg_metrics["train-loss"]) if agg_metrics else None
    return RoundResult(arrays, arrays is not None, loss, metrics, sum(sizes), max(sizes, default=0))


def _secagg_round(grid: Grid, context: Context, strategy: LoraStrategy, messages: list[Message],
                  global_arrays: dict[str, np.ndarray], rank: int, needed: int, cfg: RecoverConfig,
                  found: dict[int, dict]) -> RoundResult:
    from .secagg import run_secagg_round

    if len(messages) < 2:
        raise LLMPruneError("SecAgg+ needs at least 2 sampled clients per round", "raise --clients or --fraction")
    max_weight = float(max(info["num-examples"] for info in found.values()) + 1)
    new, metrics, up = run_secagg_round(grid, context, messages, global_arrays, rank, needed, max_weight,
                                        cfg.round_timeout)
    if new is not None and len(metrics) < needed:
        new = None
    loss = None
    if metrics:
        w = [float(m["num-examples"]) for m in metrics]
        loss = float(np.average([float(m["train-loss"]) for m in metrics], weights=w))
    per_client = up // max(len(metrics), 1)
    return RoundResult(new, new is not None, loss if new is not None else None, metrics, up, per_client)


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
