"""Who trains what each round: the assignment policy the strategy asks for every sampled node's
Assignment (rank, depth, speed), and today's policy, the fleet plan.

A policy is any object with

    assign(server_round, nodes) -> {node: Assignment}   # every node it is given, every round
    observe(server_round, result) -> None                # the round's outcome (RoundResult), after it

The global adapter (its modules and rank) is fixed before the first round by the plan: a policy
assigns ranks up to `plan.rank` and depths whose modules the plan's adapter covers."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import numpy as np

from .fleet import Assignment, check_ranks, plan_devices
from .lora import init_arrays, module_shapes, top_layer_modules

log = logging.getLogger(__name__)


@runtime_checkable
class AssignmentPolicy(Protocol):
    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]: ...

    def observe(self, server_round: int, result) -> None: ...


@dataclass
class FleetPlan:
    """Who trains what: node -> (partition id, assignment), the modules per partition, the global
    rank, the seeded initial adapter over every trained module, and the per-device report."""

    clients: dict[int, tuple[int, Assignment]]
    modules: dict[int, list[str]]
    rank: int
    init: dict[str, np.ndarray]
    devices: list[dict]
    refused: list[dict] = field(default_factory=list)

    @property
    def partitions(self) -> dict[int, int]:
        """node -> partition id."""
        return {node: pid for node, (pid, _) in self.clients.items()}


def match_nodes(found: dict[int, dict], plans: list[Assignment]) -> dict[int, tuple[int, Assignment]]:
    """Node -> (partition id, assignment): by device name when the node names one, else by
    partition id (client i gets the fleet's device i)."""
    by_name = {p.device: p for p in plans}
    out = {}
    for node, info in found.items():
        plan = by_name.get(info["device"]) if info["device"] else None
        out[node] = (info["partition-id"], plan or plans[info["partition-id"] % len(plans)])
    return out


def plan_fleet(model, cfg, found: dict[int, dict]) -> FleetPlan:
    """The fleet plan for the nodes discovery `found` (node -> partition-id, num-examples, device).
    Devices refused for want of memory (--skip-unfit) are reported and never sampled."""
    matched = match_nodes(found, plan_devices(model, cfg, cfg.clients))
    refused = [{"partition-id": pid, "node-id": node, "device": plan.device, "memory_mb": plan.memory_mb,
                "reason": plan.refused} for node, (pid, plan) in sorted(matched.items()) if plan.refused]
    for row in refused:
        log.warning("left out: %s", row["reason"])
    if cfg.policy != "bandit":
        for name in sorted({plan.device for _, plan in matched.values() if plan.memory_mb is None and cfg.fleet}):
            log.warning("device '%s' declares no memory_mb: the plan gives it the largest setting "
                        "(--policy bandit learns a device's limit instead)", name)
    clients = {node: entry for node, entry in matched.items() if not entry[1].refused}
    shapes = module_shapes(model, cfg.target_modules)
    if cfg.submodels or cfg.schedule:  # any module may be drawn (or be a stage's anchor) for anyone
        modules = {pid: list(shapes) for pid, _ in clients.values()}
    else:
        modules = {pid: top_layer_modules(shapes, plan.depth) for pid, plan in clients.values()}
    ranks = {plan.rank for _, plan in clients.values()}
    if cfg.policy == "bandit":   # the bandit may play any arm's rank on any device
        ranks |= set(cfg.bandit_ranks)
    check_ranks(cfg.aggregation, ranks)
    union = [m for m in shapes if any(m in mods for mods in modules.values())]
    init = init_arrays(shapes, union, max(ranks), cfg.seed)
    devices = [{"partition-id": pid, "node-id": node, **plan.to_dict(), "examples": found[node]["num-examples"],
                "modules": len(modules[pid])} for node, (pid, plan) in sorted(clients.items(), key=lambda kv: kv[1][0])]
    return FleetPlan(clients, modules, max(ranks), init, devices, refused)


class FleetPolicy:
    """Every node keeps the assignment the fleet plan gave it, every round."""

    def __init__(self, plan: FleetPlan) -> None:
        self.plan = plan

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        return {node: self.plan.clients[node][1] for node in nodes}

    def observe(self, server_round: int, result) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SubmodelPolicy:
    """FedPruner's per-round cut: each device holds a submodel of as many units (layers, or
    attention/MLP blocks) as its budget admits; which units is drawn every round, seeded, one per
    similarity group first, then by importance and by how long nobody held a unit (UnitSchedule).

    A device whose measured peak overran its budget gets its estimate scaled by measured/estimated
    from then on, so its next cut shrinks (logged with both numbers)."""

    def __init__(self, plan: FleetPlan, schedule, costs, cfg, devices: dict[str, object]) -> None:
        self.plan, self.schedule, self.costs, self.cfg, self.devices = plan, schedule, costs, cfg, devices
        self.num_layers = len(set(costs.layer_of))
        self.groups = len(schedule.groups)
        self.units = {a.device: a.units for _, a in plan.clients.values()}
        self.correction: dict[str, float] = {}
        self.last: dict[int, object] = {}           # partition id -> this round's Assignment

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        from .fleet import lean_memory_mb
        from .submodels import Submodel

        out = {}
        for node in nodes:
            pid, plan = self.plan.clients[node]
            count = max(self.units[plan.device], self.groups)
            units = self.schedule.draw(server_round, pid, count, self.cfg.seed)
            mb, params = lean_memory_mb(self.costs, units, units, plan.rank)
            mb *= self.correction.get(plan.device, 1.0)
            sub = Submodel.of_units(self.num_layers, units, self.cfg.submodel_granularity)
            out[node] = replace(plan, units=len(units), submodel=sub, estimate_mb=round(mb, 1), lora_params=params)
            self.last[pid] = out[node]
        return out

    def observe(self, server_round: int, result) -> None:
        from .fleet import assign_submodels

        held: set[int] = set()
        for m in result.client_metrics:
            plan = self.last.get(int(m["partition-id"]))
            if plan is None:
                continue
            held.update(plan.submodel.units(self.cfg.submodel_granularity))
            peak = float(m.get("peak-rss-mb", 0.0))
            if plan.memory_mb is not None and peak > plan.memory_mb:
                raw = plan.estimate_mb / self.correction.get(plan.device, 1.0)
                self.correction[plan.device] = max(self.correction.get(plan.device, 1.0), peak / raw)
                shrunk = assign_submodels(self.costs, [self.devices[plan.device]], self.cfg.lora_rank, True,
                                          self.correction)[0]
                self.units[plan.device] = max(1, shrunk.units or 1)
                log.warning("round %d: device '%s' peaked at %.0f MB, over its %.0f MB budget (estimate %.0f MB): "
                            "its next submodels hold %d units", server_round, plan.device, peak, plan.memory_mb,
                            plan.estimate_mb, self.units[plan.device])
        self.schedule.record(held)

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "units": dict(self.units), "correction": dict(self.correction)}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.schedule.load_state_dict(state["schedule"])
            self.units.update({k: int(v) for k, v in state["units"].items()})
            self.correction = {k: float(v) for k, v in state["correction"].items()}


def build_submodel_policy(model, cfg, plan: FleetPlan, windows) -> SubmodelPolicy:
    """Server side, once: profile the units on the server's own windows (importance = block
    influence; similarity = linear CKA of what each unit adds to the residual stream), group them
    into as many groups as the smallest submodel has units, and start the per-round schedule."""
    from .fleet import load_fleet, unit_costs

    schedule, profile = unit_schedule(model, cfg, windows, min(a.units for _, a in plan.clients.values()))
    devices = {d.name: d for d in load_fleet(cfg.fleet)}
    policy = SubmodelPolicy(plan, schedule, costs=unit_costs(model, cfg), cfg=cfg, devices=devices)
    policy.profile = profile
    return policy


def unit_schedule(model, cfg, windows, groups: int):
    """The per-round unit draw of submodels: units profiled on the server's windows, grouped into
    `groups` groups (at most one per unit); returns the UnitSchedule and its profile for metrics.json."""
    from llmprune.errors import LLMPruneError

    from .grouping import UnitSchedule, cka_matrix, group_units, unit_profiles

    if windows is None:
        raise LLMPruneError("--submodels needs text on the server to group the layers",
                            "pass --eval-data FILE (the server's own text)")
    if cfg.submodel_granularity == "sublayer":
        from llmprune.arch import adapter_for

        from .client_model import check_sublayer_skip

        check_sublayer_skip(adapter_for(model).decoder_layers(model)[0])
    importance, features = unit_profiles(model, windows, cfg.submodel_granularity)
    groups = group_units(cka_matrix(features), max(1, min(groups, len(importance))))
    log.info("submodels: %d units in %d groups %s; importance %s", len(importance), len(groups), groups,
             [round(float(x), 3) for x in importance])
    profile = {"importance": [round(float(x), 4) for x in importance], "groups": groups}
    return UnitSchedule(groups, importance, cfg.submodel_granularity), profile
