"""How a round's instructions travel to the devices and what comes back: plainly (send, wait up to
the round timeout, collect each device's reply) or through Flower's SecAgg+ (the server learns only
the weighted average of the uploads). A transport sends and collects; it never aggregates a
plain round and never calls back into the strategy."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from llmprune.errors import LLMPruneError

from .messages import TrainReply

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]
PULL_INTERVAL = 0.1


class RunStopped(Exception):
    """The ServerApp stops because the run's stop event was set (the simulation was interrupted)."""


def send_and_receive(grid: Grid, messages: list[Message], timeout: float | None,
                     stop: threading.Event | None = None) -> list[Message]:
    """Flower's Grid.send_and_receive, but `timeout=None` waits for every reply (a simulation on a
    busy machine: slow is not lost) and the run's `stop` event ends the wait at once."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        if stop is not None and stop.is_set():
            raise RunStopped("interrupted")
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(r.metadata.reply_to_message_id for r in got)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(PULL_INTERVAL)
    return replies


@dataclass
class Collected:
    """What came back in one round: the replies of the devices that answered, why the others did
    not (partition id -> oom | crash | timeout; under SecAgg+ `dropped`, the reason unseen), the
    bytes uploaded, and (SecAgg+ only) the average the server learnt instead of the uploads."""

    replies: list[TrainReply]
    failures: dict[int, str] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_up_per_client: int = 0
    average: Arrays | None = None
    summed: bool = False      # the uploads arrived summed (SecAgg+): `average` is the round's result
    server_update: Any = None  # split training: the LoRA the server trained this round (a ClientUpdate)
    bytes_down: int = 0        # sent beyond the round's instructions (split training's per-step tensors)


def failure_kind(reason: str) -> str:
    """A failed client's error as the policy sees it: out of memory, or another crash."""
    return "oom" if ("MemoryError" in reason or "out of memory" in reason.lower()) else "crash"


class PlainTransport:
    """Send, wait up to the round timeout (None: for every reply), collect."""

    def __init__(self, grid: Grid, timeout: float | None, stop: threading.Event | None = None) -> None:
        self.grid, self.timeout, self.stop = grid, timeout, stop

    def exchange(self, server_round: int, messages: list[Message], partitions: dict[int, int],
                 global_arrays: Arrays, rank: int, needed: int) -> Collected:
        replies = send_and_receive(self.grid, messages, self.timeout, self.stop)
        failures = {}
        for r in replies:
            if r.has_error():
                reason = (r.error.reason or "").strip().splitlines()
                log.warning("round %d: client %d failed: %s", server_round, partitions[r.metadata.src_node_id],
                            reason[-1][:300] if reason else r.error.code)
                failures[partitions[r.metadata.src_node_id]] = failure_kind(r.error.reason or "")
        if len(messages) > len(replies):
            log.warning("round %d: %d client(s) did not answer within %.0f s", server_round,
                        len(messages) - len(replies), self.timeout)
            answered = {r.metadata.src_node_id for r in replies}
            failures.update({partitions[m.metadata.dst_node_id]: "timeout" for m in messages
                             if m.metadata.dst_node_id not in answered})
        ok = [TrainReply.from_message(r) for r in replies if not r.has_error()]
        sizes = [reply.bytes_up for reply in ok]
        return Collected(ok, failures, sum(sizes), max(sizes, default=0))


class SecAggTransport:
    """Flower's SecAgg+ (see secagg.py): the server learns only the weighted sum of the uploads,
    so only aggregations registered with secagg=True can use it."""

    def __init__(self, grid: Grid, context, max_weight: float, timeout: float | None) -> None:
        self.grid, self.context, self.max_weight, self.timeout = grid, context, max_weight, timeout

    def exchange(self, server_round: int, messages: list[Message], partitions: dict[int, int],
                 global_arrays: Arrays, rank: int, needed: int) -> Collected:
        from .secagg import run_secagg_round

        if len(messages) < 2:
            raise LLMPruneError("SecAgg+ needs at least 2 sampled clients per round", "raise --clients or --fraction")
        average, metrics, up = run_secagg_round(self.grid, self.context, messages, global_arrays, rank, needed,
                                                self.max_weight, self.timeout)
        if average is not None and len(metrics) < needed:
            average = None
        per_client = up // max(len(metrics), 1)
        replies = [TrainReply.from_metrics(m, bytes_up=per_client) for m in metrics]
        # the masked protocol does not say why a device dropped out, only that its share is missing
        returned = {r.partition_id for r in replies}
        failures = {partitions[m.metadata.dst_node_id]: "dropped" for m in messages
                    if partitions[m.metadata.dst_node_id] not in returned}
        return Collected(replies, failures, up, per_client, average, summed=True)
