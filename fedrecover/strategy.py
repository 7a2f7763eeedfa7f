"""The Flower strategy that owns a round: sample, ask the assignment policy who trains what,
send each sampled client its slice of the global adapter (its rank, its layers), collect within
the round timeout (plainly or through SecAgg+), aggregate with the registered aggregation,
evaluate, checkpoint, and tell the policy how the round went."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from .aggregations import ClientUpdate, get_aggregation
from .config import RecoverConfig
from .fleet import Assignment
from .lora import top_layer_modules
from .policy import AssignmentPolicy
from .records import from_record, payload_bytes, to_record
from .state import RoundState

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]
# Set when the run is interrupted (Ctrl-C in `llmprune recover`): the ServerApp's waits end at once.
STOP = threading.Event()
PULL_INTERVAL = 0.1


class RunStopped(Exception):
    """The ServerApp stops because STOP was set (the simulation was interrupted)."""


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """Flower's Grid.send_and_receive, but `timeout=None` waits for every reply (a simulation on a
    busy machine: slow is not lost) and an interruption (STOP) ends the wait at once."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        if STOP.is_set():
            raise RunStopped("interrupted")
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(r.metadata.reply_to_message_id for r in got)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(PULL_INTERVAL)
    return replies


@dataclass
class RoundResult:
    """What came back in one round: the new global adapter (None: unchanged) and the clients' metrics."""

    arrays: Arrays | None
    applied: bool
    train_loss: float | None
    client_metrics: list[dict]
    bytes_up: int
    bytes_up_per_client: int
    failures: dict[int, str] = field(default_factory=dict)   # partition id -> oom | crash | timeout


class LoraStrategy(Strategy):
    """Heterogeneous LoRA rounds as a Flower strategy. `run_round` drives one round; its
    configure/aggregate steps go through `self.outer`, which is Flower's DP wrapper around this
    strategy when --dp-clip is set (so the wrapper clips, checks and adds noise), else itself."""

    def __init__(self, cfg: RecoverConfig, policy: AssignmentPolicy, partitions: dict[int, int],
                 shapes: dict[str, tuple[int, int]], init: Arrays, rank: int, *, transport: RoundTransport,
                 evaluate: Callable[[Arrays], float | None] = lambda arrays: None,
                 checkpoint: Callable[[RoundState], None] = lambda state: None) -> None:
        self.cfg, self.policy, self.partitions = cfg, policy, partitions   # partitions: node id -> partition id
        self.shapes, self.init, self.rank = shapes, init, rank
        self.aggregation = get_aggregation(cfg.aggregation)
        self.transport, self.evaluate_fn, self.checkpoint_fn = transport, evaluate, checkpoint
        self.global_arrays: Arrays = dict(init)
        self._modules: dict[int, list[str]] = {}
        self.num_layers = len({int(m.split(".", 1)[0]) for m in shapes})
        self.round_info: dict = {}
        self.round_plans: dict[int, Assignment] = {}
        self.model_path: str | None = None      # prune-tune: the re-pruned checkpoint the clients load
        self.round_note: dict = {}              # extra entries for the next round's metrics row (a pruning step)
        self.outer: Strategy = self
        if cfg.dp_clip is not None:
            sampled = max(1, round(cfg.fraction * len(partitions)))
            self.outer = DifferentialPrivacyClientSideFixedClipping(self, cfg.dp_noise, cfg.dp_clip, sampled)
        self.train_config = {"scale": cfg.scale, "batch-size": cfg.batch_size, "lr": cfg.lr,
                             "uniform-weights": cfg.dp_clip is not None}

    # -- one round -----------------------------------------------------------------------------
    def run_round(self, server_round: int, grid: Grid, state: RoundState) -> dict:
        """configure -> train (transport) -> aggregate -> evaluate -> save; returns the metrics row."""
        t0 = time.perf_counter()
        if hasattr(self.policy, "prepare"):   # e.g. a DevFT stage change: the new stage starts from the last
            state.arrays = self.policy.prepare(server_round, state.arrays)
        np.random.seed(np.random.default_rng([self.cfg.seed, server_round, 7]).integers(2**31))  # DP noise
        messages = list(self.outer.configure_train(server_round, to_record(state.arrays), ConfigRecord(self.train_config),
                                                   grid))
        needed = self.cfg.min_replies(len(messages))
        result = self.transport.exchange(self, server_round, messages, needed)
        if result.arrays is not None:
            state.arrays = result.arrays
        if not result.applied:
            log.warning("round %d: %d of %d clients returned, %d needed: the global adapter is unchanged",
                        server_round, len(result.client_metrics), len(messages), needed)
        ok_metrics = result.client_metrics
        self.policy.observe(server_round, result)   # before the rows (its rewards are in them) and the checkpoint
        view = self.policy.eval_view(server_round, state.arrays) if hasattr(self.policy, "eval_view") else state.arrays
        t_eval = time.perf_counter()
        perplexity = self.evaluate_fn(view)
        row = {"round": server_round, "clients_sampled": len(messages), "clients_returned": len(ok_metrics),
               "applied": result.applied, "train_loss": result.train_loss,
               "eval_perplexity": perplexity, "eval_seconds": round(time.perf_counter() - t_eval, 2),
               "bytes_up": result.bytes_up, "bytes_down": self.round_info["bytes_down"],
               "bytes_up_per_client_max": result.bytes_up_per_client,
               "client_seconds": [round(float(m["seconds"]), 2) for m in ok_metrics],
               "client_peak_rss_mb": [round(float(m["peak-rss-mb"]), 1) for m in ok_metrics],
               "clients": [self.client_row(m) for m in sorted(ok_metrics, key=lambda m: int(m["partition-id"]))],
               "failures": [self.failure_row(pid, why) for pid, why in sorted(result.failures.items())],
               "seconds": round(time.perf_counter() - t0, 2), **self.round_note}
        self.round_note = {}
        state.rounds.append(row)
        state.round = server_round
        state.policy = self.policy.state_dict() if hasattr(self.policy, "state_dict") else {}
        self.checkpoint_fn(state)
        log.info("round %d: %d/%d clients, train loss %s, eval ppl %s, %.1f s", server_round, len(ok_metrics),
                 len(messages), result.train_loss, row["eval_perplexity"], row["seconds"])
        return row

    def client_row(self, metrics: dict) -> dict:
        """One device's line of the round in metrics.json: what it trained, what it was expected to
        need and what it measured, its time and its traffic."""
        pid = int(metrics["partition-id"])
        plan = self.round_plans[pid].to_dict() if pid in self.round_plans else {}
        row = {"partition-id": pid, **{k: plan.get(k) for k in ("device", "memory_mb", "rank", "depth", "units",
                                                                 "submodel", "estimate_mb")},
               "peak_rss_mb": round(float(metrics["peak-rss-mb"]), 1),
               "model_rss_mb": round(float(metrics["model-rss-mb"]), 1) if "model-rss-mb" in metrics else None,
               "train_loss": round(float(metrics["train-loss"]), 4), "seconds": round(float(metrics["seconds"]), 2),
               "bytes_down": self.round_info.get("bytes_down_by_pid", {}).get(pid),
               "bytes_up": int(metrics["bytes-up"]) if "bytes-up" in metrics else None,
               **{k.replace("-", "_"): round(float(metrics[k]), 4) for k in ("loss-first", "loss-last") if k in metrics}}
        return {**row, **self.policy_report(pid)}

    def failure_row(self, pid: int, why: str) -> dict:
        """A sampled device that did not return: why (oom, crash, timeout) and what it was given."""
        plan = self.round_plans[pid].to_dict() if pid in self.round_plans else {}
        row = {"partition-id": pid, "failed": why, **{k: plan.get(k) for k in ("device", "memory_mb", "rank", "units")}}
        return {**row, **self.policy_report(pid)}

    def policy_report(self, pid: int) -> dict:
        """What the policy says of a device's round (the bandit: its arm and the reward's parts)."""
        return self.policy.client_report(pid) if hasattr(self.policy, "client_report") else {}

    def sample(self, server_round: int) -> list[int]:
        """Seeded by (seed, round) over partition ids, so a resumed run samples what the
        uninterrupted one would have, whatever node ids this run's SuperNodes got."""
        by_pid = sorted(self.partitions, key=lambda node: self.partitions[node])
        k = max(1, round(self.cfg.fraction * len(by_pid)))
        rng = np.random.default_rng([self.cfg.seed, server_round])
        return [by_pid[i] for i in sorted(rng.choice(len(by_pid), size=k, replace=False))]

    def modules_for(self, depth: int) -> list[str]:
        """The modules of a client training LoRA on the top `depth` layers."""
        if depth not in self._modules:
            self._modules[depth] = top_layer_modules(self.shapes, depth)
        return self._modules[depth]

    # -- the Flower Strategy steps ---------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_arrays = from_record(arrays)
        sampled = self.sample(server_round)
        plans: dict[int, Assignment] = self.policy.assign(server_round, sampled)
        messages, down, down_by_pid = [], 0, {}
        self.round_plans = {self.partitions[node]: plans[node] for node in sampled}
        for node in sampled:
            pid, plan = self.partitions[node], plans[node]
            modules = plan.submodel.modules(self.shapes) if plan.submodel is not None else self.modules_for(plan.depth)
            view = self.aggregation.client_view(self.global_arrays, modules, plan.rank, self.init)
            record = to_record(view)
            down_by_pid[pid] = payload_bytes(record)
            down += down_by_pid[pid]
            node_config = ConfigRecord(dict(config))
            if self.cfg.lean_clients:   # what the device loads: its submodel (or all layers), in the lean dtypes
                from .submodels import Submodel

                held = plan.submodel if plan.submodel is not None else Submodel.full(self.num_layers)
                node_config["submodel"] = held.to_json()
                node_config["client-dtype"] = self.cfg.client_dtype
                node_config["client-embedding"] = self.cfg.client_embedding
            if plan.stage is not None:   # DevFT: the device fuses each group into its anchor
                node_config["stage"] = plan.stage.to_json()
            if self.model_path is not None:
                node_config["model-path"] = self.model_path
            node_config["server-round"] = server_round
            # a declared speed scales the steps; an emulated one is the device's secret (it just runs slower)
            speed = 1.0 if self.cfg.emulate_speed else plan.speed
            node_config["local-steps"] = max(1, round(self.cfg.local_steps * speed))
            node_config["seed"] = int(np.random.default_rng([self.cfg.seed, server_round, pid]).integers(2**31))
            messages.append(Message(RecordDict({"arrays": record, "config": node_config}), dst_node_id=node,
                                    message_type=MessageType.TRAIN))
        self.round_info = {"sampled": len(messages), "bytes_down": down, "bytes_down_by_pid": down_by_pid}
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
        new = self.aggregation.aggregate(updates, self.global_arrays, self.rank)
        loss = float(np.average(losses, weights=weights))
        return to_record(new), MetricRecord({"train-loss": loss, "num-examples": int(sum(weights))})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation is centralized, on the server's held-out windows

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("LoRA strategy: %s, %d clients, global rank %d", self.cfg.aggregation, len(self.partitions), self.rank)


# -- how a round's messages travel -----------------------------------------------------------------
class RoundTransport:
    """Carries one round's train messages to the clients and turns what comes back into a RoundResult."""

    def exchange(self, strategy: LoraStrategy, server_round: int, messages: list[Message], needed: int) -> RoundResult:
        raise NotImplementedError


class PlainTransport(RoundTransport):
    """Send, wait up to the round timeout (None: for every reply), aggregate what came back
    (through the strategy's outer layer, e.g. the DP wrapper) if enough did."""

    def __init__(self, grid: Grid, timeout: float | None) -> None:
        self.grid, self.timeout = grid, timeout

    def exchange(self, strategy: LoraStrategy, server_round: int, messages: list[Message], needed: int) -> RoundResult:
        replies = send_and_receive(self.grid, messages, self.timeout)
        ok = [r for r in replies if not r.has_error()]
        failures = {}
        for r in replies:
            if r.has_error():
                reason = (r.error.reason or "").strip().splitlines()
                log.warning("round %d: client on node %d failed: %s", server_round, r.metadata.src_node_id,
                            reason[-1][:300] if reason else r.error.code)
                failures[strategy.partitions[r.metadata.src_node_id]] = failure_kind(r.error.reason or "")
        if len(messages) > len(replies):
            log.warning("round %d: %d client(s) did not answer within %.0f s", server_round,
                        len(messages) - len(replies), self.timeout)
            answered = {r.metadata.src_node_id for r in replies}
            failures.update({strategy.partitions[m.metadata.dst_node_id]: "timeout" for m in messages
                             if m.metadata.dst_node_id not in answered})
        sizes = [payload_bytes(r.content["arrays"]) for r in ok]
        metrics = [{**dict(r.content["metrics"]), "bytes-up": size} for r, size in zip(ok, sizes)]
        arrays, loss = None, None
        if len(ok) >= needed:
            # Flower's DP wrapper checks the replies itself (and refuses a round with failures).
            new, agg_metrics = strategy.outer.aggregate_train(server_round, replies if strategy.outer is not strategy else ok)
            if new is not None:
                arrays = from_record(new)
                loss = float(agg_metrics["train-loss"]) if agg_metrics else None
        return RoundResult(arrays, arrays is not None, loss, metrics, sum(sizes), max(sizes, default=0), failures)


def failure_kind(reason: str) -> str:
    """A failed client's error as the policy sees it: out of memory, or another crash."""
    return "oom" if ("MemoryError" in reason or "out of memory" in reason.lower()) else "crash"


class SecAggTransport(RoundTransport):
    """Flower's SecAgg+ (see secagg.py): the server learns only the weighted sum of the uploads,
    so only aggregations registered with secagg=True can use it."""

    def __init__(self, grid: Grid, context, aggregation: str, max_weight: float, timeout: float | None) -> None:
        from llmprune.errors import LLMPruneError

        from .aggregations.base import names_text, secagg_names

        if not get_aggregation(aggregation).secagg:
            raise LLMPruneError(f"--secagg cannot be used with --aggregation {aggregation}",
                                f"secure aggregation only sums uploads: use {names_text(secagg_names())}")
        self.grid, self.context, self.max_weight, self.timeout = grid, context, max_weight, timeout

    def exchange(self, strategy: LoraStrategy, server_round: int, messages: list[Message], needed: int) -> RoundResult:
        from llmprune.errors import LLMPruneError

        from .secagg import run_secagg_round

        if len(messages) < 2:
            raise LLMPruneError("SecAgg+ needs at least 2 sampled clients per round", "raise --clients or --fraction")
        new, metrics, up = run_secagg_round(self.grid, self.context, messages, strategy.global_arrays, strategy.rank,
                                            needed, self.max_weight, self.timeout)
        if new is not None and len(metrics) < needed:
            new = None
        loss = None
        if metrics:
            w = [float(m["num-examples"]) for m in metrics]
            loss = float(np.average([float(m["train-loss"]) for m in metrics], weights=w))
        per_client = up // max(len(metrics), 1)
        metrics = [{**m, "bytes-up": per_client} for m in metrics]
        return RoundResult(new, new is not None, loss if new is not None else None, metrics, up, per_client)
