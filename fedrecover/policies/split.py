"""`--policy split` (MergeSFL on a U-shaped split, for LLM recovery): a device runs the embedding,
its first layers and, above the server's layers, the final norm, the tied head and the loss; the
server runs the rest on the merged features of all devices (split.py, split_round.py). Token ids and
labels stay on the device.

What MergeSFL leaves open, decided here:
- the cut: per device as many layers as its memory admits (the submodel estimate of those layers),
  at most --split-layers, scaled down by its speed against the fastest device's (declared before
  round 1; measured, in seconds per window of its jobs, once every sampled device has been), at
  least one, so that a slow or small device runs less;
- feature merging for devices cut at different layers: a device's features join the merged batch
  at its own cut; the merged loss is the mean over all merged windows;
- batch regulation: per round, proportional to each device's measured seconds per window of the
  round before (so the front parts finish together), at most twice the fair share (the merged batch
  stays a mix), within the batch its memory admits; the merged batch is --batch-size per device;
- the layers some devices hold and the server runs for others: the server's copy joins the
  aggregation as one more holder, weighted by the examples of the devices it trained them for."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from llmprune.errors import LLMPruneError
from llmprune.options import option, positive_int

from ..client_model import load_submodel
from ..device_models import DeviceModel, DeviceModelKind, register_device_model
from ..fleet import Assignment, assign_submodels, fleet_devices, lean_memory_mb, unit_costs
from ..split import Cut
from .base import Policy, PolicyConfig

log = logging.getLogger(__name__)


@dataclass
class SplitConfig(PolicyConfig):
    layers: int = option(2, flag="--split-layers", parse=positive_int,
                         help="most decoder layers a device runs below the server's (fewer where its memory or "
                              "declared speed is smaller)")
    merge: bool = option(True, flag="--split-merge",
                         help="one server batch per step of every device's features (MergeSFL); "
                              "--no-split-merge: one server pass and step per device")
    regulate: bool = option(True, flag="--split-regulate",
                            help="per device and round the batch that makes devices finish together (measured "
                                 "seconds per window), at most twice the fair share; --no-split-regulate: --batch-size")


register_device_model(DeviceModelKind(
    "split", Cut.from_json, lambda cut: cut.submodel(),
    lambda folder, cut, dtype, embedding: load_submodel(folder, cut.submodel(), dtype=dtype, embedding=embedding)))


class SplitPolicy(Policy):
    name = "split"
    config_class = SplitConfig
    summary = ("MergeSFL: devices run the embedding, their first layers and the loss; the server the rest, "
               "on every device's features merged")
    lean_devices = True
    secagg = False
    fleet_vocabulary = False
    defaults = {"client_dtype": "bfloat16", "client_embedding": "int8"}
    state_schema = {"seconds_per_window": {str: float}}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.seconds_per_window: dict[str, float] = {}     # device name -> measured, the round before
        self.batches: dict[int, int] = {}                   # partition id -> this round's batch
        self.rows: dict[int, dict] = {}                     # partition id -> its split line of the round
        self._max_batch: dict[tuple, int] = {}
        self.fit_units: dict[str, int] = {}                 # device name -> the layers its memory admits
        self.assigned: dict[int, Assignment] = {}           # partition id -> this round's assignment
        self.server_seconds: list[float] = []
        self.parallel_seconds: list[float] = []

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        clashes = [(cfg.distill.teacher is not None and cfg.distill.where != "server", "--teacher on the devices",
                    "distil on the server (--distill server), where the whole model is"),
                   (cfg.privacy.dp_clip is not None, "--dp-clip",
                    "run without central DP (the server trains on the devices' features, which the clipping does not bound)")]
        for clash, what, fix in clashes:
            if clash:
                raise LLMPruneError(f"--policy split cannot be combined with {what}", fix)

    def check_model(self, model, model_dir: str) -> None:
        layers = model.config.num_hidden_layers
        if layers < 2:
            raise LLMPruneError(f"--policy split needs at least 2 decoder layers, the model has {layers}",
                                "recover this model with --policy plan")
        if self.config.layers >= layers:
            raise LLMPruneError(f"--split-layers {self.config.layers} leaves the server none of the model's {layers} layers",
                                f"pass --split-layers {layers - 1} or fewer")

    def plan_devices(self, model, count: int) -> list[Assignment]:
        from ..fleet import cycled, plan_rank_depth

        num_layers = model.config.num_hidden_layers
        rank = self.cfg.training.lora_rank
        costs = unit_costs(model, self.cfg, "layer")
        devices = fleet_devices(self.cfg)
        if not devices:
            plans = plan_rank_depth(model, self.cfg, count)
            return [self._with_cut(p, self.config.layers, num_layers, costs, rank) for p in plans]
        fits = assign_submodels(costs, devices, rank, self.cfg.fleet.skip_unfit)
        fastest = max(d.speed for d in devices)
        plans = []
        for dev, fit in zip(devices, fits):
            if fit.refused:
                plans.append(fit)
                continue
            self.fit_units[dev.name] = fit.units
            plans.append(self._with_cut(fit, self.front_for(dev.name, dev.speed / fastest), num_layers, costs, rank))
        return cycled(plans, count)

    def front_for(self, device: str, speed_share: float) -> int:
        """The first cut: the layers the device's memory admits, at most --split-layers, times its speed
        against the fastest device's (declared before round 1, measured after), at least 1."""
        most = self.config.layers
        return max(1, min(self.fit_units.get(device, most), most, round(most * speed_share)))

    @staticmethod
    def _with_cut(plan: Assignment, front: int, num_layers: int, costs, rank: int) -> Assignment:
        mb, params = lean_memory_mb(costs, list(range(front)), list(range(front)), rank)
        return dataclasses.replace(plan, rank=rank, depth=front, units=front, estimate_mb=round(mb, 1),
                                   lora_params=params, device_model=DeviceModel("split", Cut(num_layers, front, num_layers)))

    def adapter_modules(self, shapes, assignment: Assignment) -> list[str]:
        return list(shapes)      # the server trains every layer no device holds

    def transport(self, run, plain, timeout):
        from ..split_round import SplitTransport

        return SplitTransport(run, self, timeout, run.stop)

    def start(self, run) -> None:
        super().start(run)
        self.costs = unit_costs(run.model, self.cfg, "layer")

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        """The round's cut and batch per device: once every sampled device has been measured, its cut
        follows its measured speed (and --split-regulate its batch); before that, the plan's."""
        from ..split_round import regulate_batches

        plans = dict(self.run.plan.clients[node] for node in nodes)          # partition id -> plan
        measured = {pid: self.seconds_per_window.get(plan.device) for pid, plan in plans.items()}
        if all(measured.values()):
            fastest = min(measured.values())
            plans = {pid: self._with_cut(plan, self.front_for(plan.device, fastest / measured[pid]),
                                         plan.device_model.spec.num_layers, self.costs, plan.rank)
                     for pid, plan in plans.items()}
        self.assigned = plans
        size = self.cfg.training.batch_size
        if self.config.regulate:
            bounds = {pid: self.max_batch(plan, 2 * size) for pid, plan in plans.items()}
            self.batches = regulate_batches(measured, size * len(nodes), bounds)
        else:
            self.batches = {pid: size for pid in plans}
        return {node: plans[self.run.plan.clients[node][0]] for node in nodes}

    def max_batch(self, plan: Assignment, upto: int) -> int:
        """The largest batch (at most `upto`) whose memory estimate for the device's cut fits its budget."""
        if plan.memory_mb is None:
            return upto
        front = plan.device_model.spec.front
        key = (plan.device, front, upto)
        if key not in self._max_batch:
            fits = [b for b in range(1, upto + 1) if lean_memory_mb(unit_costs(self.run.model, _with_batch(self.cfg, b), "layer"),
                                                                   list(range(front)), list(range(front)), plan.rank)[0]
                    <= plan.memory_mb]
            self._max_batch[key] = max(fits, default=1)
        return self._max_batch[key]

    # -- what the split round asks of the policy (split_round.SplitTransport) ---------------------------
    def cut_of(self, partition_id: int) -> Cut:
        return self.assigned[partition_id].device_model.spec

    def batch_of(self, partition_id: int) -> int:
        return self.batches.get(partition_id, self.cfg.training.batch_size)

    def server_modules(self, devices) -> set[str]:
        """The modules of every layer the server runs for some device this round."""
        layers = {i for d in devices for i in d.cut.server_layers}
        return {m for m in self.run.shapes if int(m.split(".", 1)[0]) in layers}

    def record_round(self, server_round: int, record) -> None:
        names = {pid: a.device for pid, a in self.run.plan.clients.values()}
        self.rows = {pid: d.row() for pid, d in record.devices.items()}
        for pid, d in record.devices.items():
            if (per_window := d.seconds_per_window()) is not None:
                self.seconds_per_window[names[pid]] = per_window
        log.info("split round %d: server %.1f s; devices %s", server_round, record.server_seconds,
                 {pid: (r["cut"]["front"], r["batch_size"], r["compute_seconds"], r["idle_seconds"])
                  for pid, r in self.rows.items()})
        self.server_seconds.append(round(record.server_seconds, 2))
        self.parallel_seconds.append(round(record.parallel_seconds, 2))

    # -- reporting and resume --------------------------------------------------------------------------
    def client_report(self, partition_id: int) -> dict:
        return self.rows.get(partition_id, {})

    def begin_round(self, run, server_round: int) -> dict:
        self.rows = {}
        return {}

    def report(self) -> dict:
        return {"split": {"merge": self.config.merge, "regulate": self.config.regulate,
                          "seconds_per_window": dict(self.seconds_per_window),
                          "server_seconds_per_round": self.server_seconds,
                          "parallel_seconds_per_round": self.parallel_seconds}}

    def state_dict(self) -> dict:
        return {"seconds_per_window": dict(self.seconds_per_window)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.seconds_per_window = {k: float(v) for k, v in state["seconds_per_window"].items()}


def _with_batch(cfg: Any, batch_size: int) -> Any:
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, batch_size=batch_size))


POLICY = SplitPolicy
