"""`--policy bandit` (FedSpine): the submodel policy with a learned arm per device. A discounted
UCB bandit per device (fedrecover/bandit.py holds its arithmetic) picks an arm = (submodel size,
LoRA rank) among those the device's declared memory admits (an undeclared device starts where
the plan starts it, at the largest, and drops a size after a failure), starting from priors of
what each arm holds; which units the submodel holds is drawn as for `submodels`. The reward is
measured on the global model: the server's evaluation loss before and after the round, credited
to the devices by their holdings (or by leaving each one's update out), against a moving
baseline, less a straggler penalty; a failure (out of memory, crash, timeout, dropped from a
SecAgg+ sum) is penalised and its arm and the costlier ones backed off."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from llmprune.errors import LLMPruneError
from llmprune.options import fraction, non_negative_float, one_of, option, positive_int

from ..bandit import Arm, DeviceBandit, arm_grid, explorers, holdings_prior, next_baseline, parse_numbers, round_rewards
from ..fleet import Assignment, Device, UnitCosts, assign_submodels, cycled, fleet_devices, submodel_memory_mb
from .base import RoundOutcome
from .submodels import SCHEDULE_STATE, SubmodelConfig, SubmodelPolicy, draw_submodel

log = logging.getLogger(__name__)


def _sizes(text) -> tuple[float, ...]:
    return tuple(float(v) for v in text) if isinstance(text, tuple) else tuple(parse_numbers(text, float, "--arm-sizes"))


def _ranks(text) -> tuple[int, ...]:
    return tuple(int(v) for v in text) if isinstance(text, tuple) else tuple(parse_numbers(text, int, "--arm-ranks"))


@dataclass
class BanditConfig(SubmodelConfig):
    arm_sizes: tuple[float, ...] = option((0.25, 0.5, 0.75, 1.0), flag="--arm-sizes", parse=_sizes,
                                          help="bandit arms: submodel sizes as shares of the model's units")
    arm_ranks: tuple[int, ...] = option((), flag="--arm-ranks", parse=_ranks,
                                        default_text="lora-rank/4, lora-rank/2, lora-rank",
                                        help="bandit arms: LoRA ranks (each at most --lora-rank)")
    exploration: float = option(0.2, flag="--bandit-exploration", parse=non_negative_float,
                                help="bandit: weight of the UCB exploration bonus")
    discount: float = option(0.9, flag="--bandit-discount", parse=fraction,
                             help="bandit: each round's weight on the past, in (0, 1]; 1 never forgets")
    prior_weight: float = option(1.0, flag="--bandit-prior-weight", parse=non_negative_float,
                                 help="bandit: pseudo-plays of each arm's prior (its holdings against the "
                                      "largest arm's); 0 plays every arm once first")
    baseline_decay: float = option(0.5, flag="--bandit-baseline-decay", parse=fraction,
                                   help="bandit: weight of the latest round in the moving baseline of the "
                                        "global model's loss change, in (0, 1]")
    straggler_weight: float = option(0.5, flag="--straggler-weight", parse=non_negative_float,
                                     help="bandit: reward penalty per unit of round time beyond the round's median")
    credit: str = option("holdings", flag="--bandit-credit", parse=one_of("holdings", "leave-one-out"),
                         help="bandit: a device's credit is its holdings share of the global model's change, or "
                              "what leaving its update out costs it (one server evaluation per device per round)")
    unknown_start: str = option("largest", flag="--bandit-unknown-start", parse=one_of("largest", "smallest"),
                                help="bandit: the arm a device of undeclared memory starts on: the largest (as the "
                                     "fleet plan assumes all fits; an out-of-memory failure drops it a size) or "
                                     "the smallest (grown one arm per success: no device is ever pushed past its "
                                     "memory, at the cost of rounds on small arms)")
    explore_share: float = option(0.25, flag="--bandit-explore-share", parse=fraction,
                                  help="bandit: at most this share of a round's devices (at least one, in turn) "
                                       "play an arm other than their best-known one; 1 lets every device explore "
                                       "at once")
    credit_windows: int | None = option(None, flag="--bandit-credit-windows", parse=positive_int, default_text="all",
                                        help="bandit: the server's first evaluation windows each leave-one-out "
                                             "evaluation reads (all: every domain of a per-domain --eval-data counts)")


# one device's bandit (bandit.DeviceBandit.state_dict)
BANDIT_STATE = {"arms": [[float]], "allowed": [int], "declared": int, "plays": [int], "counts": [float],
                "sums": [float], "failures": [int], "backoff_until": [int], "ceiling": int}


def arm_ranks(cfg: Any) -> list[int]:
    """The arms' ranks: --arm-ranks, else lora-rank/4, lora-rank/2 and lora-rank."""
    if cfg.policy.arm_ranks:
        return list(cfg.policy.arm_ranks)
    rank = cfg.training.lora_rank
    return sorted({max(1, rank // 4), max(1, rank // 2), rank})


def arms_of(cfg: Any) -> list[Arm]:
    return arm_grid(list(cfg.policy.arm_sizes), arm_ranks(cfg))


def arm_units(arms: list[Arm], n_units: int) -> list[int]:
    """Units a device holds under each arm: its share of the model's units, to the nearest, at least one."""
    return [min(n_units, max(1, math.floor(arm.size * n_units + 0.5))) for arm in arms]


def admitted_arms(costs: UnitCosts, device: Device, arms: list[Arm], units: list[int]) -> list[int]:
    """The arms whose bound (the costliest units of that count, at that rank) fits the device's
    declared memory; every arm when it declares none (its ceiling then learns the limit)."""
    if device.memory_mb is None:
        return list(range(len(arms)))
    return [i for i, arm in enumerate(arms) if submodel_memory_mb(costs, units[i], arm.rank)[0] <= device.memory_mb]


class BanditPolicy(SubmodelPolicy):
    name = "bandit"
    config_class = BanditConfig
    summary = ("FedSpine: a per-device discounted UCB bandit over (submodel size, LoRA rank) arms, rewarded by "
               "its share of each round's change of the global model's loss")
    learns_memory = True
    defaults = {**SubmodelPolicy.defaults, "aggregation": "hetlora"}   # its arms have mixed ranks
    # losses: the server's evaluation loss before round 1 and after each round since ([] without evaluation)
    state_schema = {"schedule": SCHEDULE_STATE, "baseline": float, "losses": [float], "bandits": {str: BANDIT_STATE}}

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        ranks = arm_ranks(cfg)
        arms_of(cfg)
        from ..aggregations import get_aggregation

        if len(ranks) > 1 and not get_aggregation(cfg.training.aggregation).mixed_ranks:
            raise LLMPruneError(f"--policy bandit with ranks {ranks} needs an aggregation of mixed ranks",
                                "pass --aggregation hetlora (or flexlora), or a single --arm-ranks")
        if max(ranks) > cfg.training.lora_rank:
            raise LLMPruneError(f"--arm-ranks {','.join(map(str, ranks))} has a rank above --lora-rank "
                                f"{cfg.training.lora_rank}", f"use ranks of at most {cfg.training.lora_rank}, "
                                "or raise --lora-rank")

    def plan_devices(self, model, count: int) -> list[Assignment]:
        """The submodel plan of the devices some arm fits; one that no arm fits is an error, or with
        --skip-unfit left out (reported with the other refused devices)."""
        costs, devices = self.costs(model), fleet_devices(self.cfg)
        left_out = self.unfit_devices(costs, devices)
        # a device plays the arms' ranks, never more: the plan's rank is the largest arm's (a single
        # --arm-ranks below --lora-rank is then one rank, which any aggregation takes)
        fits = iter(assign_submodels(costs, [d for d in devices if d.name not in left_out],
                                     max(arm_ranks(self.cfg)), self.cfg.fleet.skip_unfit))
        plans = [Assignment(d.name, d.memory_mb, d.speed, 0, 0, 0.0, 0, refused="no bandit arm fits its memory_mb")
                 if d.name in left_out else next(fits) for d in devices]
        return cycled(plans, count)

    def unfit_devices(self, costs: UnitCosts, devices: list[Device]) -> list[str]:
        arms = arms_of(self.cfg)
        units = arm_units(arms, len(costs.weights))
        left_out = []
        for dev in devices:
            if admitted_arms(costs, dev, arms, units):
                continue
            need = math.ceil(submodel_memory_mb(costs, units[0], arms[0].rank)[0])
            reason = (f"no bandit arm fits device '{dev.name}' ({dev.memory_mb:.0f} MB): the smallest, "
                      f"{arms[0].label()}, needs about {need} MB")
            if not self.cfg.fleet.skip_unfit:
                raise LLMPruneError(reason, f"add a smaller --arm-sizes, raise its memory_mb to {need}, "
                                            "or pass --skip-unfit")
            left_out.append(dev.name)
        return left_out

    def adapter_ranks(self, assignments: list[Assignment]) -> set[int]:
        return {a.rank for a in assignments} | set(arm_ranks(self.cfg))   # any arm's rank on any device

    def group_count(self, run) -> int:
        return min(arm_units(arms_of(self.cfg), len(self.costs(run.model).weights)))

    def start(self, run) -> None:
        super().start(run)
        self.arms = arms_of(self.cfg)
        self.arm_units = [max(u, len(self.schedule.groups)) for u in arm_units(self.arms, len(self.unit_costs.weights))]
        self.bandits = {}
        for pid, a in run.plan.clients.values():
            dev = self.devices[a.device]
            allowed = admitted_arms(self.unit_costs, dev, self.arms, self.arm_units)
            self.bandits[str(pid)] = DeviceBandit(
                self.arms, allowed, declared=dev.memory_mb is not None, exploration=self.config.exploration,
                discount=self.config.discount, prior=holdings_prior(self.arms, allowed, self.arm_units),
                prior_weight=self.config.prior_weight, unknown_start=self.config.unknown_start)
        self.baseline = 0.0
        self.losses: list[float] = []
        self.arm_played: dict[int, int] = {}
        self.explored: set[int] = set()
        self.reports: dict[int, dict] = {}
        self.resting: set[int] = set()

    def begin_round(self, run, server_round: int) -> dict:
        """The global model's loss before the first round (the reward's starting point); a device
        whose every playable arm is backed off rests this round (the round's row names it)."""
        if not self.losses and run.windows is not None:
            self.losses.append(math.log(run.evaluate(run.state.arrays, run.state.rows)))
        devices = {pid: a.device for pid, a in run.plan.clients.values()}
        self.resting = {int(k) for k, b in self.bandits.items() if b.choose(server_round) is None}
        if not self.resting:
            return {}
        names = sorted(devices[pid] for pid in self.resting)
        log.info("round %d: %s rest(s): every arm it may play is backed off after failing", server_round,
                 ", ".join(names))
        return {"resting": names}

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        playing = {self.run.plan.clients[node][0] for node in nodes} - self.resting
        arms = self.round_arms(server_round, sorted(playing))
        out = {}
        for node in nodes:
            pid, plan = self.run.plan.clients[node]
            if pid in self.resting:
                continue
            arm = arms[pid]
            out[node] = draw_submodel(self.schedule, self.unit_costs, plan, server_round, pid, self.arm_units[arm],
                                      self.arms[arm].rank, self.cfg.seed)
            self.last[pid], self.arm_played[pid] = out[node], arm
        return out

    def round_arms(self, server_round: int, pids: list[int]) -> dict[int, int]:
        """Each playing device's arm: its UCB choice for the round's explorers (`bandit.explorers`:
        a few devices a round, in turn), its greedy (best mean) arm for the others."""
        ucb = {pid: self.bandits[str(pid)].choose(server_round) for pid in pids}
        greedy = {pid: self.bandits[str(pid)].greedy(server_round) for pid in pids}
        chosen = explorers({str(pid): ucb[pid] != greedy[pid] for pid in pids}, self.config.explore_share, server_round)
        self.explored = {int(key) for key in chosen}
        return {pid: ucb[pid] if str(pid) in chosen else greedy[pid] for pid in pids}

    def observe(self, server_round: int, outcome: RoundOutcome) -> None:
        results: dict[str, dict] = {}
        holdings: dict[str, float] = {}
        held: set[int] = set()
        for reply in outcome.replies:
            pid = reply.partition_id
            if pid in self.last:
                results[str(pid)] = {"seconds": reply.seconds}
                holdings[str(pid)] = reply.num_examples * max(1, outcome.holdings.get(pid, 0))
                held.update(self.last[pid].device_model.held().units(self.granularity))
        results.update({str(pid): {"failed": why} for pid, why in outcome.failures.items() if pid in self.last})
        gain = self.global_gain(outcome)
        parts = round_rewards(results, holdings, gain, self.baseline, self.config.straggler_weight,
                              left_out=self.left_out([int(k) for k, r in results.items() if "failed" not in r], outcome))
        if math.isfinite(gain):
            self.baseline = next_baseline(self.baseline, gain, self.config.baseline_decay)
        self.reports = {}
        for key, part in parts.items():
            arm = self.arm_played[int(key)]
            self.bandits[key].update(arm, part.reward, server_round, part.failed)
            self.reports[int(key)] = {"arm": self.arms[arm].label(), "explored": int(key) in self.explored,
                                      "reward": part.to_dict()}
        self.schedule.record(held)

    def left_out(self, returned: list[int], outcome: RoundOutcome) -> dict[str, float]:
        """Per returned device, the server's loss (ln perplexity on its first --bandit-credit-windows
        windows, default all) with the device's update left out of the round's aggregate, less the loss with every
        update: what the device's update did to the global model. {} where not measured (credit by
        holdings, no server text, SecAgg+ or central DP, a round not applied)."""
        if self.config.credit != "leave-one-out" or outcome.without is None or self.run.windows is None:
            return {}
        rows, k = self.run.state.rows, self.config.credit_windows
        every = math.log(self.run.evaluate(outcome.without(None), rows, k))
        return {str(pid): math.log(self.run.evaluate(outcome.without(pid), rows, k)) - every for pid in returned}

    def global_gain(self, outcome: RoundOutcome) -> float:
        """The round's change of the global model's loss (nats, + = better): the server's evaluation
        before and after it; without server evaluation (a fleet given no --eval-data) the mean of
        the devices' own loss drops, weighted by examples, the only measure there is."""
        if outcome.perplexity is not None and self.losses:
            after = math.log(outcome.perplexity) if outcome.perplexity > 0 else float("nan")
            gain = self.losses[-1] - after
            self.losses.append(after if math.isfinite(after) else self.losses[-1])
            return gain
        drops = [(r.num_examples, r.loss_first - r.loss_last) for r in outcome.replies
                 if r.partition_id in self.last and r.loss_first is not None and r.loss_last is not None]
        if not drops:
            return 0.0
        return sum(n * d for n, d in drops) / sum(n for n, _ in drops)

    def client_report(self, partition_id: int) -> dict:
        return self.reports.get(partition_id, {})

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "baseline": self.baseline, "losses": list(self.losses),
                "bandits": {k: b.state_dict() for k, b in self.bandits.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.schedule.load_state_dict(state["schedule"])
            self.baseline = float(state["baseline"])
            self.losses = [float(v) for v in state["losses"]]
            for key, saved in state["bandits"].items():
                self.bandits[key].load_state_dict(saved)

    def state_problem(self, state: dict, model) -> str | None:
        """Beyond the shape: the unit schedule fits the model, one bandit per client, each over
        this run's arm grid with one entry per arm."""
        problem = super().state_problem(state, model)      # the shape and the unit schedule
        if problem:
            return problem
        grid = [[arm.size, arm.rank] for arm in arms_of(self.cfg)]
        clients = {str(i) for i in range(self.cfg.fleet.clients)}
        if not set(state["bandits"]) <= clients:
            return f"'bandits' are for clients {sorted(state['bandits'])}, the run has {self.cfg.fleet.clients}"
        for key, saved in state["bandits"].items():
            if saved["arms"] != grid:
                return f"'bandits.{key}.arms' is not this run's arm grid {grid}"
            lengths = {k: len(saved[k]) for k in ("plays", "counts", "sums", "failures", "backoff_until")}
            if any(n != len(grid) for n in lengths.values()):
                return f"'bandits.{key}' does not hold one entry per arm ({lengths}, {len(grid)} arms)"
            if not saved["allowed"] or any(not 0 <= a < len(grid) for a in saved["allowed"]) \
                    or saved["ceiling"] not in saved["allowed"] or min(saved["plays"] + saved["failures"]) < 0:
                return f"'bandits.{key}' has arms, counts or a ceiling outside the grid"
        return None


POLICY = BanditPolicy
