"""The fleet plan: who each discovered node is and what it trains before round 1 (the policy's
`plan_devices`), the global adapter's modules and rank (the union of what any device may train),
and the seeded initial adapter. Planned again when the model changes (prune-tune)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fleet import Assignment, check_ranks
from .lora import init_arrays, module_shapes

log = logging.getLogger(__name__)


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


def meta_model(model_dir: str):
    """The checkpoint's module tree on the meta device (shapes, no weights): enough to plan the
    fleet and check a policy's settings before anything is loaded."""
    import llmprune
    from llmprune.reader import meta_model as build

    return build(llmprune.load_config(model_dir))


def match_nodes(found: dict[int, dict], plans: list[Assignment]) -> dict[int, tuple[int, Assignment]]:
    """Node -> (partition id, assignment): by device name when the node names one, else by
    partition id (client i gets the fleet's device i)."""
    by_name = {p.device: p for p in plans}
    out = {}
    for node, info in found.items():
        plan = by_name.get(info["device"]) if info["device"] else None
        out[node] = (info["partition-id"], plan or plans[info["partition-id"] % len(plans)])
    return out


def plan_fleet(model, cfg: Any, found: dict[int, dict], policy: Any) -> FleetPlan:
    """The fleet plan for the nodes discovery `found` (node -> partition-id, num-examples, device).
    Devices refused for want of memory (--skip-unfit) are reported and never sampled."""
    matched = match_nodes(found, policy.plan_devices(model, cfg.fleet.clients))
    refused = [{"partition-id": pid, "node-id": node, "device": plan.device, "memory_mb": plan.memory_mb,
                "reason": plan.refused} for node, (pid, plan) in sorted(matched.items()) if plan.refused]
    for row in refused:
        log.warning("left out: %s", row["reason"])
    if not policy.learns_memory and cfg.fleet.file:
        for name in sorted({plan.device for _, plan in matched.values() if plan.memory_mb is None}):
            log.warning("device '%s' declares no memory_mb: the plan gives it the largest setting "
                        "(--policy bandit learns a device's limit instead)", name)
    clients = {node: entry for node, entry in matched.items() if not entry[1].refused}
    shapes = module_shapes(model, cfg.training.target_modules)
    modules = {pid: policy.adapter_modules(shapes, plan) for pid, plan in clients.values()}
    ranks = policy.adapter_ranks([plan for _, plan in clients.values()])
    check_ranks(cfg.training.aggregation, ranks)
    union = [m for m in shapes if any(m in mods for mods in modules.values())]
    init = init_arrays(shapes, union, max(ranks), cfg.seed)
    devices = [{"partition-id": pid, "node-id": node, **plan.to_dict(), "examples": found[node]["num-examples"],
                "modules": len(modules[pid])} for node, (pid, plan) in sorted(clients.items(), key=lambda kv: kv[1][0])]
    return FleetPlan(clients, modules, max(ranks), init, devices, refused)
