"""The strategy owns the round. `LoraStrategy.run` is the whole loop, top to bottom, as Flower's
`Strategy.start` reads:

    the policy begins the round -> sample -> the policy says what each device gets -> instructions
    (each device's view of the global adapter) -> the transport sends and collects -> aggregate
    (+ central DP) -> the server distils (--teacher) -> evaluate -> the policy observes (the
    bandit's reward reads the evaluation) -> the round's row -> checkpoint

`RunContext` is everything one run shares (config, Flower grid, the server's model, the fleet plan,
the round state, the stop event): no module-level state."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .aggregations import ClientUpdate, get_aggregation
from .config import RecoverConfig, RunSettings
from .device_models import DeviceModel
from .fleet import Assignment
from .lora import module_shapes
from .messages import TrainInstruction
from .planning import FleetPlan, plan_fleet
from .policies import RoundOutcome
from .privacy import CentralDP
from .rows import merge_rows, rows_applied, split_rows
from .state import RoundState
from .submodels import Submodel
from .transport import Collected

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]


@dataclass
class RunContext:
    """One federated run on the server: settings, Flower's grid and context, the server's model and
    evaluation windows, the discovered nodes, the fleet plan and the round state."""

    cfg: RecoverConfig
    settings: RunSettings
    grid: Any
    flower: Any
    simulation: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    model: Any = None
    tokenizer: Any = None
    model_path: str | None = None          # the checkpoint devices load when it is not the run's (prune-tune)
    windows: Any = None                    # the server's evaluation windows (None: no evaluation)
    nodes: dict[int, dict] = field(default_factory=dict)     # node -> partition-id, num-examples, device
    plan: FleetPlan | None = None
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    state: RoundState | None = None
    distillation: Any = None               # distill.Distillation when --teacher is given
    vocabulary: Any = None                 # fleet_vocab.FleetVocabulary when --vocab is given

    def replan(self, policy: Any) -> None:
        """The fleet plan (and the adapter's module shapes) for the current model."""
        self.plan = plan_fleet(self.model, self.cfg, self.nodes, policy)
        self.shapes = module_shapes(self.model, self.cfg.training.target_modules)

    def evaluate(self, arrays: Arrays, rows: Arrays | None = None, windows: int | None = None) -> float | None:
        """Perplexity of the server's model with `arrays` (and the embedding `rows`) applied, on its
        evaluation windows (the first `windows` of them, when given)."""
        from llmprune.evaluate import perplexity

        from .lora import lora_applied

        if self.windows is None:
            return None
        with rows_applied(self.model, rows), lora_applied(self.model, arrays, self.cfg.scale):
            chosen = self.windows if windows is None else self.windows[:windows]
            return round(perplexity(self.model, chosen, progress=False).perplexity, 4)


@dataclass
class Sent:
    """One round's messages and what each sampled device was given."""

    messages: list
    assignments: dict[int, Assignment]        # partition id -> assignment
    bytes_down: dict[int, int]                # partition id -> adapter bytes sent
    taught: set[int] = field(default_factory=set)  # partition ids told to distil from the teacher


class LoraStrategy:
    """Heterogeneous LoRA rounds: the policy decides who trains what, the registered aggregation
    merges, the transport carries the round (plain or SecAgg+), central DP when asked."""

    def __init__(self, run: RunContext, policy: Any, transport: Any,
                 checkpoint: Callable[[RoundState], None] = lambda state: None) -> None:
        cfg = run.cfg
        self.run, self.policy, self.transport, self.checkpoint = run, policy, transport, checkpoint
        self.aggregation = get_aggregation(cfg.training.aggregation)
        self.dp = None
        if cfg.privacy.dp_clip is not None:
            sampled = max(1, round(cfg.fleet.fraction * len(run.plan.partitions)))
            self.dp = CentralDP(cfg.privacy.dp_clip, cfg.privacy.dp_noise, sampled, cfg.seed)

    def run_rounds(self, rounds: range, progress: Callable = lambda it, **kw: it) -> None:
        """Every round from `rounds`, each checkpointed before the next starts."""
        run, policy, state = self.run, self.policy, self.run.state
        for server_round in progress(rounds):
            started = time.perf_counter()
            notes = policy.begin_round(run, server_round)               # e.g. a DevFT stage change, a pruning step
            policy_seconds = time.perf_counter() - started
            sampled = self.sample(server_round)
            sent = self.instructions(server_round, policy.assign(server_round, sampled))
            needed = run.cfg.fleet.min_replies(len(sent.messages))
            collected = Collected([]) if not sent.messages else self.transport.exchange(   # all sampled devices rest
                server_round, sent.messages, run.plan.partitions, state.arrays, run.plan.rank, needed)
            previous = state.arrays
            new, loss = self.aggregate(server_round, collected, needed, previous)
            rows = self.merge_rows(collected) if new is not None else state.rows
            if new is not None and run.distillation is not None and run.distillation.server is not None:
                with rows_applied(run.model, rows):
                    new, distilled = run.distillation.server.refine(run.model, new, run.cfg.scale, server_round)
                notes.update(distilled)
            if new is not None:
                state.arrays, state.rows = new, rows
            else:
                log.warning("round %d: %d of %d clients returned, %d needed: the global adapter is unchanged",
                            server_round, len(collected.replies), len(sent.messages), needed)
            eval_started = time.perf_counter()
            perplexity = run.evaluate(policy.eval_view(server_round, state.arrays), state.rows)
            eval_seconds = time.perf_counter() - eval_started
            hooks_started = time.perf_counter()
            policy.observe(server_round, RoundOutcome(collected.replies, collected.failures, sent.bytes_down,
                                                      perplexity, self.leave_one_out(collected, previous, new)))
            policy_seconds += time.perf_counter() - hooks_started    # the server's time in the policy
            row = self.round_row(server_round, sent, collected, new is not None, loss, perplexity, eval_seconds)
            row["policy_seconds"] = round(policy_seconds, 2)
            row.update(seconds=round(time.perf_counter() - started, 2), **notes)
            state.rounds.append(row)
            state.round = server_round
            state.policy = policy.state_dict()
            self.checkpoint(state)
            log.info("round %d: %d/%d clients, train loss %s, eval ppl %s, %.1f s", server_round,
                     len(collected.replies), len(sent.messages), "-" if loss is None else f"{loss:.4f}",
                     "-" if perplexity is None else f"{perplexity:.2f}", row["seconds"])

    def sample(self, server_round: int) -> list[int]:
        """Seeded by (seed, round) over partition ids, so a resumed run samples what the
        uninterrupted one would have, whatever node ids this run's SuperNodes got."""
        partitions = self.run.plan.partitions
        by_pid = sorted(partitions, key=lambda node: partitions[node])
        k = max(1, round(self.run.cfg.fleet.fraction * len(by_pid)))
        rng = np.random.default_rng([self.run.cfg.seed, server_round])
        return [by_pid[i] for i in sorted(rng.choice(len(by_pid), size=k, replace=False))]

    def instructions(self, server_round: int, assignments: dict[int, Assignment]) -> Sent:
        """Each sampled node's message: its view of the global adapter (its modules, its rank, as
        the aggregation hands it out) and its TrainInstruction."""
        run = self.run
        sent = Sent([], {}, {})
        for node, assignment in assignments.items():
            pid = run.plan.partitions[node]
            view = self.aggregation.client_view(run.state.arrays, assignment.modules(run.shapes), assignment.rank,
                                                run.plan.init)
            if run.cfg.training.train_rows:     # the rows changed so far, which the device's table lacks
                view = {**view, **(run.state.rows or {})}
            instruction = self.instruction(server_round, pid, assignment)
            msg, sent.bytes_down[pid] = instruction.to_message(node, view)
            sent.messages.append(msg)
            sent.assignments[pid] = assignment
            if instruction.teacher is not None:
                sent.taught.add(pid)
        return sent

    def instruction(self, server_round: int, pid: int, assignment: Assignment) -> TrainInstruction:
        cfg, run = self.run.cfg, self.run
        device_model = assignment.device_model
        if device_model is None and cfg.lean_clients:   # lean storage of the whole model
            device_model = DeviceModel.submodel(Submodel.full(len({int(m.split(".", 1)[0]) for m in run.shapes})))
        # a declared speed scales the steps; an emulated one is the device's secret (it just runs slower)
        speed = 1.0 if cfg.fleet.emulate_speed else assignment.speed
        distil = run.distillation
        teacher = distil.for_device(assignment.memory_mb, assignment.estimate_mb) if distil is not None else None
        return TrainInstruction(
            server_round=server_round, seed=int(np.random.default_rng([cfg.seed, server_round, pid]).integers(2**31)),
            local_steps=max(1, round(cfg.training.local_steps * speed)), scale=cfg.scale,
            batch_size=cfg.training.batch_size, lr=cfg.training.lr, uniform_weights=self.dp is not None,
            model_path=run.model_path, device_model=device_model, client_dtype=cfg.fleet.client_dtype,
            client_embedding=cfg.fleet.client_embedding, teacher=teacher, train_rows=cfg.training.train_rows,
            rows_lr=cfg.training.rows_lr or cfg.training.lr / 30,
            distill_alpha=distil.alpha if teacher else 0.0, distill_temperature=distil.temperature if teacher else 1.0,
            vocabulary=run.vocabulary.kept_bytes if run.vocabulary is not None else None,
            extra=self.dp.instruction_extra() if self.dp else {})

    def aggregate(self, server_round: int, collected: Collected, needed: int,
                  previous: Arrays) -> tuple[Arrays | None, float | None]:
        """The new global adapter (None: the round is not applied) and the mean training loss. The
        replies are taken in partition order, not arrival order, so float sums are reproducible."""
        replies = sorted(collected.replies, key=lambda r: r.partition_id)
        weights = [float(r.num_examples) for r in replies]
        loss = float(np.average([r.train_loss for r in replies], weights=weights)) if replies else None
        if collected.summed:                    # SecAgg+: the server learnt only the average
            return (collected.average, loss) if collected.average is not None else (None, None)
        if len(replies) < needed or not replies:
            return None, None
        new = self.aggregation.aggregate(client_updates(collected), previous, self.run.plan.rank)
        if self.dp is not None:
            new = self.dp.release(server_round, new, any_failed=any(
                why != "timeout" for why in collected.failures.values()))
        return (new, loss) if new is not None else (None, None)

    def leave_one_out(self, collected: Collected, previous: Arrays, new: Arrays | None) -> Callable | None:
        """The round's aggregate without one device (None: with all), for a policy that credits
        devices by what leaving them out costs (the bandit); None where no update can be taken out:
        SecAgg+ (only the sum is known), central DP (a device's own influence must not steer what
        the devices are told next), a round not applied."""
        if new is None or collected.summed or self.dp is not None:
            return None

        updates: list[ClientUpdate] = []

        def without(pid: int | None) -> Arrays:
            if not updates:                        # built on the first call: most policies never ask
                updates.extend(client_updates(collected))
            kept = [u for u in updates if pid is None or u.client != str(pid)]
            return self.aggregation.aggregate(kept, previous, self.run.plan.rank) if kept else previous
        return without

    def merge_rows(self, collected: Collected) -> Arrays | None:
        """--train-rows: the global embedding rows after this round's replies (rows.merge_rows),
        in partition order so that the float sums are reproducible."""
        run = self.run
        if not run.cfg.training.train_rows:
            return run.state.rows
        updates = [split_rows(r.arrays)[1] for r in sorted(collected.replies, key=lambda r: r.partition_id)]
        return merge_rows(run.model.get_input_embeddings().weight, run.state.rows or {}, [u for u in updates if u])

    def round_row(self, server_round: int, sent: Sent, collected: Collected, applied: bool, loss: float | None,
                  perplexity: float | None, eval_seconds: float) -> dict:
        replies = collected.replies
        return {"round": server_round, "clients_sampled": len(sent.messages), "clients_returned": len(replies),
                "applied": applied, "train_loss": loss, "eval_perplexity": perplexity,
                "eval_seconds": round(eval_seconds, 2), "bytes_up": collected.bytes_up,
                "bytes_down": sum(sent.bytes_down.values()) + collected.bytes_down,
                "bytes_up_per_client_max": collected.bytes_up_per_client,
                "client_seconds": [round(r.seconds, 2) for r in replies],
                "client_peak_rss_mb": [round(r.peak_rss_mb, 1) for r in replies],
                "clients": [self.client_row(r, sent) for r in sorted(replies, key=lambda r: r.partition_id)],
                "failures": [self.failure_row(pid, why, sent) for pid, why in sorted(collected.failures.items())],
                **({"rows_changed": len(self.run.state.rows["rows.ids"]) if self.run.state.rows else 0}
                   if self.run.cfg.training.train_rows else {})}

    def client_row(self, reply, sent: Sent) -> dict:
        """One device's line of the round in metrics.json: what it trained, what it was expected to
        need and what it measured, its time and its traffic."""
        pid = reply.partition_id
        plan = sent.assignments[pid].to_dict() if pid in sent.assignments else {}
        row = {"partition-id": pid, **{k: plan.get(k) for k in ("device", "memory_mb", "rank", "depth", "units",
                                                                 "submodel", "estimate_mb")},
               "peak_rss_mb": round(reply.peak_rss_mb, 1),
               "model_rss_mb": round(reply.model_rss_mb, 1) if reply.model_rss_mb is not None else None,
               "train_loss": round(reply.train_loss, 4), "seconds": round(reply.seconds, 2),
               "bytes_down": sent.bytes_down.get(pid), "bytes_up": reply.bytes_up,
               **({"rows": len(reply.arrays["rows.ids"])} if reply.arrays and "rows.ids" in reply.arrays else {}),
               **{k: round(v, 4) for k, v in (("loss_first", reply.loss_first), ("loss_last", reply.loss_last))
                  if v is not None}}
        if self.run.distillation is not None:
            row["teacher"] = pid in sent.taught
        return {**row, **self.policy.client_report(pid)}

    def failure_row(self, pid: int, why: str, sent: Sent) -> dict:
        """A sampled device that did not return: why (oom, crash, timeout) and what it was given."""
        plan = sent.assignments[pid].to_dict() if pid in sent.assignments else {}
        row = {"partition-id": pid, "failed": why, **{k: plan.get(k) for k in ("device", "memory_mb", "rank", "units")}}
        return {**row, **self.policy.client_report(pid)}


def client_updates(collected: Collected) -> list[ClientUpdate]:
    """The round's uploads as the aggregation takes them, in partition order (so float sums are
    reproducible); under split training the server's own update is one more holder."""
    replies = sorted(collected.replies, key=lambda r: r.partition_id)
    updates = [ClientUpdate(split_rows(r.arrays)[0], float(r.num_examples), str(r.partition_id)) for r in replies]
    if collected.server_update is not None:
        updates.append(collected.server_update)
    return updates
