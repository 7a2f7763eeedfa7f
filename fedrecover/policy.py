"""Who trains what each round: the assignment policy the strategy asks for every sampled node's
Assignment (rank, depth, speed), and today's policy, the fleet plan.

A policy is any object with

    assign(server_round, nodes) -> {node: Assignment}   # every node it is given, every round
    observe(server_round, result) -> None                # the round's outcome (RoundResult), after it

The global adapter (its modules and rank) is fixed before the first round by the plan: a policy
assigns ranks up to `plan.rank` and depths whose modules the plan's adapter covers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .fleet import Assignment, check_ranks, plan_devices
from .lora import init_arrays, module_shapes, top_layer_modules


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
    """The fleet plan for the nodes discovery `found` (node -> partition-id, num-examples, device)."""
    clients = match_nodes(found, plan_devices(model, cfg, cfg.clients))
    shapes = module_shapes(model, cfg.target_modules)
    modules = {pid: top_layer_modules(shapes, plan.depth) for pid, plan in clients.values()}
    ranks = {plan.rank for _, plan in clients.values()}
    check_ranks(cfg.aggregation, ranks)
    union = [m for m in shapes if any(m in mods for mods in modules.values())]
    init = init_arrays(shapes, union, max(ranks), cfg.seed)
    devices = [{"partition-id": pid, "node-id": node, **plan.to_dict(), "examples": found[node]["num-examples"],
                "modules": len(modules[pid])} for node, (pid, plan) in sorted(clients.items(), key=lambda kv: kv[1][0])]
    return FleetPlan(clients, modules, max(ranks), init, devices)


class FleetPolicy:
    """Every node keeps the assignment the fleet plan gave it, every round."""

    def __init__(self, plan: FleetPlan) -> None:
        self.plan = plan

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        return {node: self.plan.clients[node][1] for node in nodes}

    def observe(self, server_round: int, result) -> None:
        pass
