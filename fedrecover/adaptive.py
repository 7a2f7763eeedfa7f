"""Adaptive policies on top of the submodel cut (policy.py): a per-device UCB bandit over (submodel
size, LoRA rank) arms (FedSpine), and staged growth through fused representative layers (DevFT).

Both are AssignmentPolicy objects the strategy asks every round; the bandit learns from what a
round returns (bandit.py holds its arithmetic), the stage policy follows a fixed schedule and
hands the global adapter from one stage to the next (devft.py holds the fusion)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

from llmprune.errors import LLMPruneError

from .bandit import DeviceBandit, arm_grid, round_rewards
from .fleet import Assignment, Device, UnitCosts, admitted_arms, arm_units, lean_memory_mb
from .policy import FleetPlan

log = logging.getLogger(__name__)


class BanditPolicy:
    """FedSpine's choice per device and round: a UCB bandit per device picks an arm (submodel
    size, LoRA rank) among those its declared memory admits (an undeclared device starts from the
    smallest and grows on success); which units the submodel holds is drawn as for --submodels.
    The reward is the device's loss gain per second of its round, less a straggler penalty; a
    failure (out of memory, crash, timeout) is penalised and its arm and costlier ones backed off."""

    def __init__(self, plan: FleetPlan, schedule, costs: UnitCosts, cfg, devices: dict[str, Device]) -> None:
        self.plan, self.schedule, self.costs, self.cfg = plan, schedule, costs, cfg
        self.arms = arm_grid(cfg.bandit_sizes, cfg.bandit_ranks)
        self.units = [max(u, len(schedule.groups)) for u in arm_units(self.arms, len(costs.weights))]
        self.num_layers = len(set(costs.layer_of))
        self.bandits = {}
        for pid, a in plan.clients.values():
            dev = devices[a.device]
            self.bandits[str(pid)] = DeviceBandit(self.arms, admitted_arms(costs, dev, self.arms, self.units),
                                                  declared=dev.memory_mb is not None,
                                                  exploration=cfg.bandit_exploration)
        self.scale = 0.0
        self.last: dict[int, tuple[int, Assignment]] = {}     # partition id -> (arm, assignment) this round
        self.reports: dict[int, dict] = {}

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        from .submodels import Submodel

        out = {}
        for node in nodes:
            pid, plan = self.plan.clients[node]
            arm = self.bandits[str(pid)].choose(server_round)
            units = self.schedule.draw(server_round, pid, self.units[arm], self.cfg.seed)
            mb, params = lean_memory_mb(self.costs, units, units, self.arms[arm].rank)
            sub = Submodel.of_units(self.num_layers, units, self.cfg.submodel_granularity)
            out[node] = replace(plan, rank=self.arms[arm].rank, units=len(units), submodel=sub,
                                estimate_mb=round(mb, 1), lora_params=params)
            self.last[pid] = (arm, out[node])
        return out

    def observe(self, server_round: int, result) -> None:
        results: dict[str, dict] = {}
        held: set[int] = set()
        for m in result.client_metrics:
            pid = int(m["partition-id"])
            if pid in self.last and "loss-first" in m:
                results[str(pid)] = {"loss_first": float(m["loss-first"]), "loss_last": float(m["loss-last"]),
                                     "seconds": float(m["seconds"])}
                held.update(self.last[pid][1].submodel.units(self.cfg.submodel_granularity))
        results.update({str(pid): {"failed": why} for pid, why in result.failures.items() if pid in self.last})
        parts, self.scale = round_rewards(results, self.scale, self.cfg.straggler_weight)
        self.reports = {}
        for key, part in parts.items():
            arm, _ = self.last[int(key)]
            self.bandits[key].update(arm, part.reward, server_round, part.failed)
            self.reports[int(key)] = {"arm": self.arms[arm].label(), "reward": part.to_dict()}
        self.schedule.record(held)

    def client_report(self, pid: int) -> dict:
        return self.reports.get(pid, {})

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "scale": self.scale,
                "bandits": {k: b.state_dict() for k, b in self.bandits.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.schedule.load_state_dict(state["schedule"])
            self.scale = float(state["scale"])
            for key, saved in state["bandits"].items():
                self.bandits[key].load_state_dict(saved)


class StagePolicy:
    """DevFT's staged growth: every device trains the current stage's model (one fused layer per
    group of similar layers; the last stage is the whole model). At a stage change each group's
    trained LoRA initialises its members (`prepare`); evaluation always runs the whole model with
    the stage's LoRA spread over the groups (`eval_view`)."""

    def __init__(self, plan: FleetPlan, stages: list, stage_of_round: list[int]) -> None:
        self.plan, self.stages, self.stage_of_round = plan, stages, stage_of_round

    def stage_at(self, server_round: int):
        return self.stages[self.stage_of_round[min(server_round, len(self.stage_of_round)) - 1]]

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        stage = self.stage_at(server_round)
        sub = stage.submodel()
        return {node: replace(self.plan.clients[node][1], submodel=sub, stage=stage, units=len(stage.anchors))
                for node in nodes}

    def prepare(self, server_round: int, arrays: dict) -> dict:
        from .devft import expand_lora

        if server_round > 1 and self.stage_at(server_round) is not self.stage_at(server_round - 1):
            log.info("round %d: stage %d -> %d layers; each group's LoRA initialises its members", server_round,
                     len(self.stage_at(server_round - 1).anchors), len(self.stage_at(server_round).anchors))
            return expand_lora(arrays, self.stage_at(server_round - 1))
        return arrays

    def eval_view(self, server_round: int, arrays: dict) -> dict:
        from .devft import expand_lora

        return expand_lora(arrays, self.stage_at(server_round))

    def observe(self, server_round: int, result) -> None:
        pass

    def client_report(self, pid: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"stages": [s.to_json() for s in self.stages]}

    def load_state_dict(self, state: dict) -> None:
        from .devft import Stage

        if state and state.get("stages"):   # the saved grouping wins: a resumed run trains what it trained
            self.stages = [Stage.from_json(text) for text in state["stages"]]


def build_bandit_policy(model, cfg, plan: FleetPlan, windows) -> BanditPolicy:
    """Server side, once: the unit profile and groups as for --submodels (as many groups as the
    smallest arm holds units), then one bandit per device."""
    from .fleet import load_fleet, unit_costs
    from .policy import unit_schedule

    costs = unit_costs(model, cfg)
    arms = arm_grid(cfg.bandit_sizes, cfg.bandit_ranks)
    schedule, profile = unit_schedule(model, cfg, windows, min(arm_units(arms, len(costs.weights))))
    policy = BanditPolicy(plan, schedule, costs, cfg, {d.name: d for d in load_fleet(cfg.fleet)})
    policy.profile = profile
    return policy


def build_stage_policy(model, cfg, plan: FleetPlan, windows) -> StagePolicy:
    """Server side, once: layers grouped by the similarity of what they add to the residual stream
    (linear CKA on the server's windows), contiguous groups per stage, each with its anchor."""
    from .devft import build_stages, parse_schedule, stage_of_rounds
    from .grouping import cka_matrix, unit_profiles

    if windows is None:
        raise LLMPruneError("--schedule needs text on the server to group the layers",
                            "pass --eval-data FILE (the server's own text)")
    _, features = unit_profiles(model, windows, "layer")
    similarity = cka_matrix(features)
    schedule = parse_schedule(cfg.schedule, len(features))
    stages = build_stages(similarity, schedule, cfg.devft_beta)
    log.info("DevFT stages: %s", [[list(g) for g in s.groups] for s in stages])
    policy = StagePolicy(plan, stages, stage_of_rounds(schedule, cfg.rounds))
    policy.profile = {"stages": [json.loads(s.to_json()) for s in stages]}
    return policy
