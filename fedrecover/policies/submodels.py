"""`--policy submodels` (FedPruner): every device trains a submodel of as many units (layers, or
attention and MLP blocks) as its memory_mb admits, re-drawn every round, and loads only those
units. What FedPruner leaves open, done on the server: the units are profiled once on the
server's own text (importance = block influence; similarity = linear CKA of what each unit adds
to the residual stream, grouping.py), grouped into as many groups as the smallest submodel holds
units, and each round's draw takes one unit per group first, then by importance and by how long
nobody held a unit (grouping.UnitSchedule). A module is averaged over the devices that held it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

from llmprune.errors import LLMPruneError
from llmprune.options import one_of, option

from ..device_models import DeviceModel
from ..fleet import Assignment, assign_submodels, cycled, fleet_devices, lean_memory_mb, unit_costs
from ..submodels import Submodel
from .base import Policy, PolicyConfig, RoundOutcome

log = logging.getLogger(__name__)


@dataclass
class SubmodelConfig(PolicyConfig):
    granularity: Literal["layer", "sublayer"] = option(
        "layer", flag="--submodel-granularity", parse=one_of("layer", "sublayer"), choices=("layer", "sublayer"),
        help="what a submodel drops: whole layers, or attention and MLP blocks apart")


# the unit draw's state (grouping.UnitSchedule.state_dict)
SCHEDULE_STATE = {"groups": [[int]], "importance": [float], "granularity": str, "staleness": [int]}


def schedule_problem(saved: dict, granularity: str, units: int) -> str | None:
    """What keeps a saved unit schedule (shape already checked) from continuing a run of `units`
    units at `granularity`, or None."""
    from ..grouping import UnitSchedule

    if saved["granularity"] != granularity or len(saved["importance"]) != units:
        return (f"'schedule' is for {len(saved['importance'])} units at {saved['granularity']!r} granularity, "
                f"the run has {units} at {granularity!r}")
    try:
        UnitSchedule.from_state_dict(saved)
    except ValueError as exc:
        return f"'schedule' is inconsistent ({exc})"
    return None


def draw_submodel(schedule, costs, assignment: Assignment, server_round: int, partition_id: int, count: int,
                  rank: int, seed: int, correction: float = 1.0) -> Assignment:
    """This round's cut for one device: `count` units drawn by the schedule (seeded by seed, round
    and partition id), its lean memory estimate (times the device's measured/estimated
    correction) and LoRA size, as the device's assignment. The one draw every submodel policy and
    the benchmarks use."""
    units = schedule.draw(server_round, partition_id, count, seed)
    mb, params = lean_memory_mb(costs, units, units, rank)
    sub = Submodel.of_units(len(set(costs.layer_of)), units, costs.granularity)
    return replace(assignment, rank=rank, units=len(units), device_model=DeviceModel.submodel(sub),
                   estimate_mb=round(mb * correction, 1), lora_params=params)


def unit_schedule(model, granularity: str, windows, groups: int):
    """The per-round unit draw: units profiled on the server's windows, grouped into `groups`
    groups (at most one per unit); returns the UnitSchedule and its profile for metrics.json."""
    from ..grouping import UnitSchedule, cka_matrix, group_units, unit_profiles

    if windows is None:
        raise LLMPruneError("submodels need text on the server to group the layers",
                            "pass --eval-data FILE (the server's own text)")
    if granularity == "sublayer":
        from llmprune.arch import adapter_for

        from ..client_model import check_sublayer_skip

        check_sublayer_skip(adapter_for(model).decoder_layers(model)[0])
    importance, features = unit_profiles(model, windows, granularity)
    groups = group_units(cka_matrix(features), max(1, min(groups, len(importance))))
    log.info("submodels: %d units in %d groups %s; importance %s", len(importance), len(groups), groups,
             [round(float(x), 3) for x in importance])
    profile = {"importance": [round(float(x), 4) for x in importance], "groups": groups}
    return UnitSchedule(groups, importance, granularity), profile


class SubmodelPolicy(Policy):
    """Each round's cut per device; a device whose measured peak overran its budget gets its
    estimate scaled by measured/estimated from then on, so its next cut shrinks (logged)."""

    name = "submodels"
    config_class = SubmodelConfig
    summary = "FedPruner: each device trains a submodel of the units its memory_mb fits, re-drawn every round"
    needs_fleet = True
    lean_devices = True
    # the point is that a device smaller than the model takes part: its frozen weights in bfloat16
    # and its vocabulary table in int8 (a 1000 MB phone needs both for a 0.2-pruned Gemma-3-270M)
    defaults = {"client_dtype": "bfloat16", "client_embedding": "int8"}
    state_schema = {"schedule": SCHEDULE_STATE, "units": {str: int}, "correction": {str: float}}

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.granularity = self.config.granularity
        self.correction: dict[str, float] = {}
        self.last: dict[int, Assignment] = {}       # partition id -> this round's assignment
        self.profile: dict | None = None

    def check_model(self, model, model_dir: str) -> None:
        if self.granularity == "sublayer":
            check_sublayer_skip_on_random(model)

    def costs(self, model):
        return unit_costs(model, self.cfg, self.granularity)

    def plan_devices(self, model, count: int) -> list[Assignment]:
        plans = assign_submodels(self.costs(model), fleet_devices(self.cfg), self.cfg.training.lora_rank,
                                 self.cfg.fleet.skip_unfit)
        return cycled(plans, count)

    def adapter_modules(self, shapes, assignment: Assignment) -> list[str]:
        return list(shapes)   # any module may be drawn for anyone

    def group_count(self, run) -> int:
        """Groups of the unit profile: as many as the smallest submodel holds units."""
        return min(a.units for _, a in run.plan.clients.values())

    def start(self, run) -> None:
        super().start(run)
        self.unit_costs = self.costs(run.model)
        self.schedule, self.profile = unit_schedule(run.model, self.granularity, run.windows, self.group_count(run))
        self.devices = {d.name: d for d in fleet_devices(self.cfg)}
        self.units = {a.device: a.units for _, a in run.plan.clients.values()}

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        out = {}
        for node in nodes:
            pid, plan = self.run.plan.clients[node]
            count = max(self.units[plan.device], len(self.schedule.groups))
            out[node] = draw_submodel(self.schedule, self.unit_costs, plan, server_round, pid, count, plan.rank,
                                      self.cfg.seed, self.correction.get(plan.device, 1.0))
            self.last[pid] = out[node]
        return out

    def observe(self, server_round: int, outcome: RoundOutcome) -> None:
        held: set[int] = set()
        for reply in outcome.replies:
            plan = self.last.get(reply.partition_id)
            if plan is None:
                continue
            held.update(plan.device_model.held().units(self.granularity))
            if plan.memory_mb is not None and reply.peak_rss_mb > plan.memory_mb:
                self.shrink(server_round, plan, reply.peak_rss_mb)
        self.schedule.record(held)

    def shrink(self, server_round: int, plan: Assignment, peak: float) -> None:
        raw = plan.estimate_mb / self.correction.get(plan.device, 1.0)
        self.correction[plan.device] = max(self.correction.get(plan.device, 1.0), peak / raw)
        shrunk = assign_submodels(self.unit_costs, [self.devices[plan.device]], self.cfg.training.lora_rank, True,
                                  self.correction)[0]
        self.units[plan.device] = max(1, shrunk.units or 1)
        log.warning("round %d: device '%s' peaked at %.0f MB, over its %.0f MB budget (estimate %.0f MB): "
                    "its next submodels hold %d units", server_round, plan.device, peak, plan.memory_mb,
                    plan.estimate_mb, self.units[plan.device])

    def report(self) -> dict:
        return {"submodels": self.profile}

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "units": dict(self.units), "correction": dict(self.correction)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.schedule.load_state_dict(state["schedule"])
            self.units.update({k: int(v) for k, v in state["units"].items()})
            self.correction = {k: float(v) for k, v in state["correction"].items()}

    def state_problem(self, state: dict, model) -> str | None:
        return super().state_problem(state, model) or schedule_problem(state["schedule"], self.granularity,
                                                                       len(self.costs(model).weights))


def check_sublayer_skip_on_random(meta) -> None:
    """Whether this architecture lets attention and MLP blocks be skipped (the residual passes
    through), probed on one decoder layer with random weights: no checkpoint weights are read."""
    import copy

    import torch

    from llmprune.arch import adapter_for

    from ..client_model import check_sublayer_skip

    layer = copy.deepcopy(adapter_for(meta).decoder_layers(meta)[0]).to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.05)
    check_sublayer_skip(layer)


POLICY = SubmodelPolicy
