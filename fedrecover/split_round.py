"""A round of split training on the server (MergeSFL): the policy's transport in place of the plain
one. Per step, two exchanges on Flower's Message API: every active device sends its features at
the first cut; the server runs its layers on all of them merged into one batch (split.merged_forward),
sends each device its slice at the second cut, gets back the gradient of the device's own loss there,
runs the merged backward, steps its own LoRA and returns each device the gradient at its first cut
with the request for the next step's features. A device that fails or does not answer in time is left
out for the rest of the round; the round applies with those that finished. The last exchange brings
each device's TrainReply (its trained LoRA); the server's own LoRA joins the aggregation as one more
holder of its modules, weighted by the examples of the devices whose features it trained on.

What the server sees: the features at the first cut and the gradients at the second (a cut feature
can be inverted to text by a determined server: see docs/recover.md). Never token ids or labels."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .aggregations import ClientUpdate
from .lora import attach_lora, detach_lora, get_lora_arrays
from .messages import CONFIG, SplitAnswer, SplitStep, TrainReply
from .split import Cut, merged_forward, server_steps, window_calls
from .transport import Collected, failure_kind, send_and_receive

log = logging.getLogger(__name__)
Arrays = dict[str, np.ndarray]


def regulate_batches(seconds_per_sample: dict, total: int, max_batch: dict, balance: float = 2.0) -> dict:
    """Each device's batch for the round (MergeSFL's regulation): proportional to its measured speed
    (samples per second), so that the devices finish their front part together; at most `balance`
    times the fair share total/n (the merged batch stays a mix of devices, not the fastest one's
    data) and its memory's `max_batch`; at least 1. The batches sum to `total` where the bounds allow.
    A device not measured yet counts at the mean speed of those measured (all equal if none is)."""
    keys = sorted(seconds_per_sample)
    known = [1.0 / s for s in seconds_per_sample.values() if s]
    speed = {k: 1.0 / seconds_per_sample[k] if seconds_per_sample[k] else (np.mean(known) if known else 1.0) for k in keys}
    cap = {k: max(1, min(int(max_batch.get(k, total)), math.floor(balance * total / len(keys)))) for k in keys}
    share: dict = {}
    free, left = set(keys), float(total)
    while free:                                   # water-filling: capped devices keep their cap, the rest share
        scale = left / sum(speed[k] for k in free)
        over = {k for k in free if speed[k] * scale > cap[k]}
        if not over:
            share.update({k: speed[k] * scale for k in free})
            break
        for k in over:
            share[k] = float(cap[k])
            left -= cap[k]
        free -= over
    out = {k: max(1, min(cap[k], int(math.floor(share[k])))) for k in keys}
    for k in sorted(keys, key=lambda k: (out[k] - share[k], k)):     # largest remainders first
        if sum(out.values()) >= total:
            break
        if out[k] < cap[k]:
            out[k] += 1
    return out


@dataclass
class DeviceSteps:
    """One device's traffic and time in a split round (its line in metrics.json)."""

    cut: Cut
    batch_size: int
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0           # the device's own compute, as its jobs measured it
    waited: float = 0.0            # time its exchanges took beyond its own compute (the server, the others)
    lag: float = 0.0               # where devices run side by side: its exchanges' slowest job minus its own
    first_job: float | None = None   # its round's first job: reading its part of the model, step 0's features
    peak_rss_mb: float = 0.0
    steps: int = 0

    def add_job(self, seconds: float, took: float, peak_rss_mb: float) -> None:
        """One job's measured compute and peak; `took`: its exchange's time on the server's clock."""
        self.seconds += seconds
        self.waited += max(0.0, took - seconds)
        self.peak_rss_mb = max(self.peak_rss_mb, peak_rss_mb)

    def seconds_per_window(self) -> float | None:
        """Its compute per window after reading its part (the time a bigger batch costs); None unmeasured."""
        if not self.steps or self.first_job is None:
            return None
        return max(self.seconds - self.first_job, 1e-6) / (self.steps * self.batch_size)

    def row(self) -> dict:
        per = max(self.steps, 1)
        return {"cut": self.cut.to_dict(), "batch_size": self.batch_size, "split_steps": self.steps,
                "bytes_up_per_step": self.bytes_up // per, "bytes_down_per_step": self.bytes_down // per,
                "compute_seconds": round(self.seconds, 2), "idle_seconds": round(self.waited, 2),
                "first_job_seconds": round(self.first_job or 0.0, 2), "idle_if_parallel_seconds": round(self.lag, 2),
                "split_peak_rss_mb": round(self.peak_rss_mb, 1)}


@dataclass
class SplitRound:
    """What one round left for the policy: per partition id its DeviceSteps, and the server's time."""

    devices: dict = field(default_factory=dict)
    server_seconds: float = 0.0
    parallel_seconds: float = 0.0    # the round where devices run side by side: each exchange's slowest job + the server

    def served(self, seconds: float) -> None:
        self.server_seconds += seconds
        self.parallel_seconds += seconds

    def exchanged(self, job_seconds: dict) -> None:
        """One exchange's measured job time per partition id: the lag each device had behind the slowest."""
        slowest = max(job_seconds.values(), default=0.0)
        self.parallel_seconds += slowest
        for pid, seconds in job_seconds.items():
            device = self.devices[pid]
            device.lag += slowest - seconds
            if device.first_job is None:
                device.first_job = seconds


class SplitTransport:
    """The split round in place of PlainTransport (same `exchange` contract)."""

    def __init__(self, run, policy, timeout: float | None, stop: threading.Event | None = None) -> None:
        self.run, self.policy, self.timeout, self.stop = run, policy, timeout, stop

    # long function: the whole round's protocol, readable top to bottom
    def exchange(self, server_round: int, messages: list, partitions: dict[int, int], global_arrays: Arrays,
                 rank: int, needed: int) -> Collected:
        run, cfg = self.run, self.run.cfg
        steps = cfg.training.local_steps
        pids = {m.metadata.dst_node_id: partitions[m.metadata.dst_node_id] for m in messages}
        record = SplitRound({pid: DeviceSteps(self.policy.cut_of(pid), self.policy.batch_of(pid)) for pid in pids.values()})
        failures: dict[int, str] = {}
        starts = {m.metadata.dst_node_id: _with_round_settings(m, steps, record.devices[pids[m.metadata.dst_node_id]])
                  for m in messages}
        answers = self._ask({node: SplitStep("front", 0).to_message(node, start) for node, start in starts.items()},
                            pids, record, failures)
        features = {node: a.tensor for node, a in answers.items()}
        server_modules = self.policy.server_modules(record.devices.values())
        peft_model = attach_lora(run.model, {k: v for k, v in global_arrays.items() if k.rsplit(".", 1)[0] in server_modules},
                                 cfg.scale)
        finals: dict[int, TrainReply] = {}
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.training.lr, weight_decay=0.0)
            base = peft_model.get_base_model()
            calls = window_calls(base, next(iter(features.values())).shape[1]) if features else {}
            for step in range(steps):
                if not features:
                    break
                started = time.perf_counter()
                passes = self._server_forward(base, features, pids, record, calls)
                record.served(time.perf_counter() - started)
                outputs = {node: out for p in passes for node, out in p.outputs.items()}
                answers = self._ask({node: SplitStep("tail", step, outputs[node].numpy()).to_message(node)
                                     for node in outputs}, pids, record, failures)
                for node in answers:
                    record.devices[pids[node]].steps += 1
                started = time.perf_counter()
                grads = self._server_backward(passes, answers, params, optimizer)
                record.served(time.perf_counter() - started)
                asks = {node: SplitStep("front", step + 1, grads[node].numpy()).to_message(node) for node in grads}
                if step + 1 < steps:
                    answers = self._ask(asks, pids, record, failures)
                    features = {node: a.tensor for node, a in answers.items()}
                else:
                    finals = self._finish(asks, pids, record, failures)
            server_arrays = get_lora_arrays(peft_model)
        finally:
            peft_model.eval()
            detach_lora(peft_model)
        self.policy.record_round(server_round, record)
        replies = list(finals.values())
        trained_for = sum(r.num_examples for r in replies)
        server = ClientUpdate(server_arrays, float(max(trained_for, 1)), "server") if replies else None
        up = {pid: d.bytes_up + next((r.bytes_up for r in replies if r.partition_id == pid), 0)
              for pid, d in record.devices.items()}
        return Collected(replies, failures, sum(up.values()), max(up.values(), default=0), server_update=server,
                         bytes_down=sum(d.bytes_down for d in record.devices.values()))

    def _server_forward(self, base, features: dict, pids: dict, record: SplitRound, calls: dict) -> list:
        """The server's layers on the features: one merged batch, or (merge off) one pass per device."""
        cuts = {node: record.devices[pids[node]].cut.front for node in features}
        back = min(record.devices[pids[node]].cut.back for node in features)
        tensors = {node: torch.from_numpy(features[node]) for node in sorted(features, key=lambda n: pids[n])}
        if self.policy.config.merge:
            return [merged_forward(base, tensors, cuts, back, calls)]
        return [merged_forward(base, {node: h}, {node: cuts[node]}, back, calls) for node, h in tensors.items()]

    def _server_backward(self, passes: list, answers: dict, params: list, optimizer) -> dict:
        """Each pass's backward with the gradients that came back (a device that dropped out gives
        none: its windows leave the merged mean), then the server's steps (split.server_steps)."""
        came = [{node: torch.from_numpy(answers[node].tensor) for node in p.outputs if node in answers} for p in passes]
        return server_steps(passes, came, params, optimizer)

    def _send(self, asks: dict, pids: dict, record: SplitRound, failures: dict) -> list:
        started = time.perf_counter()
        replies = send_and_receive(self.run.grid, [msg for msg, _ in asks.values()], self.timeout, self.stop)
        took = time.perf_counter() - started
        answered = {r.metadata.src_node_id for r in replies}
        for node, (_, size) in asks.items():
            record.devices[pids[node]].bytes_down += size
            if node not in answered:
                failures[pids[node]] = "timeout"
                log.warning("split: device %d did not answer in time: left out for the rest of the round", pids[node])
        ok = []
        for r in replies:
            pid = pids[r.metadata.src_node_id]
            if r.has_error():
                failures[pid] = failure_kind(r.error.reason or "")
                log.warning("split: device %d failed (%s): left out for the rest of the round", pid,
                            (r.error.reason or "").strip().splitlines()[-1:] or r.error.code)
                continue
            ok.append((r, took))
        return ok

    def _ask(self, asks: dict, pids: dict, record: SplitRound, failures: dict) -> dict:
        out, jobs = {}, {}
        for reply, took in self._send(asks, pids, record, failures):
            answer, size = SplitAnswer.from_message(reply)
            device = record.devices[pids[reply.metadata.src_node_id]]
            device.bytes_up += size
            device.add_job(answer.seconds, took, answer.peak_rss_mb)
            jobs[pids[reply.metadata.src_node_id]] = answer.seconds
            out[reply.metadata.src_node_id] = answer
        record.exchanged(jobs)
        return out

    def _finish(self, asks: dict, pids: dict, record: SplitRound, failures: dict) -> dict:
        out, jobs = {}, {}
        for reply, took in self._send(asks, pids, record, failures):
            final = TrainReply.from_message(reply)
            device = record.devices[pids[reply.metadata.src_node_id]]
            last_job = final.seconds - device.seconds     # the reply carries the round's total
            device.add_job(last_job, took, final.peak_rss_mb)
            jobs[pids[reply.metadata.src_node_id]] = last_job
            out[reply.metadata.src_node_id] = final
        record.exchanged(jobs)
        return out


def _with_round_settings(msg, steps: int, device: DeviceSteps):
    """The strategy's train message with this round's split settings for the device: every device
    runs the round's `steps` in lockstep (a declared speed does not scale them) at its regulated batch."""
    from flwr.app import ConfigRecord, Message, RecordDict

    config = {**dict(msg.content[CONFIG]), "local-steps": steps, "batch-size": device.batch_size}
    content = RecordDict({**dict(msg.content.items()), CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type)

