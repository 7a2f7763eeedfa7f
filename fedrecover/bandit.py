"""The per-device UCB bandit of FedSpine (arXiv 2501.02438): each federated round it picks, for one
device, an arm = (submodel size, LoRA rank), and learns from the round's reward which arm trains
that device best for the time it takes.

- `arm_grid` builds the arms (every size x rank), sorted by cost so "cheaper" is "lower index";
- `round_rewards` turns one round's outcomes into rewards: loss gain per second, normalized by the
  largest rate seen so far, minus a penalty for being slower than the round's median device; a
  device that failed (out of memory, timeout, crash) gets a fixed penalty;
- `DeviceBandit` is UCB1 over the arms one device may play, with two safety rails: after a
  failure the arm and every costlier one are backed off for a number of rounds that doubles with
  each failure of that arm, and a device whose memory is unknown starts from its smallest arm and
  grows one arm per success.

Everything is deterministic (ties go to the cheaper arm) and the state survives a JSON round trip
exactly, so a resumed run chooses what the uninterrupted one would have."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmprune.errors import LLMPruneError

log = logging.getLogger(__name__)

# The smallest reward scale: a first round with no gain anywhere must not divide by zero.
SCALE_EPS = 1e-12
GRID_FIX = "pass e.g. --arm-sizes 0.25,0.5,1 --arm-ranks 2,4,8"


@dataclass(frozen=True)
class Arm:
    """One choice for a device: the share of the model's units it holds and its LoRA rank."""

    size: float  # share of the model's units the device holds, in (0, 1]
    rank: int    # LoRA rank

    def label(self) -> str:
        """Short name for logs and reports, e.g. "0.5x4"."""
        return f"{self.size:g}x{self.rank}"


def parse_numbers(text: str, kind: type, flag: str) -> list:
    """"0.25,0.5,1" -> [0.25, 0.5, 1.0] (kind float) or "2,4,8" -> [2, 4, 8] (kind int). Blank text
    gives [] so that `arm_grid` reports the empty grid in its own words."""
    if kind not in (int, float):
        raise TypeError(f"parse_numbers: kind must be int or float, not {kind!r}")
    if not text.strip():
        return []
    out = []
    for token in text.split(","):
        try:
            value = kind(token.strip())
        except ValueError:
            raise LLMPruneError(f"{flag} '{text}' has a bad value '{token.strip()}' (expected {kind.__name__}s)",
                                f"pass comma-separated {kind.__name__}s, e.g. {flag} {_example(kind)}") from None
        if kind is float and not math.isfinite(value):
            raise LLMPruneError(f"{flag} '{text}' has a non-finite value '{token.strip()}'",
                                f"pass finite numbers, e.g. {flag} {_example(kind)}")
        out.append(value)
    return out


def _example(kind: type) -> str:
    return "0.25,0.5,1" if kind is float else "2,4,8"


def arm_grid(sizes: Sequence[float], ranks: Sequence[int]) -> list[Arm]:
    """Every (size, rank) pair, sorted by cost (size, then rank) so that an arm's index orders it:
    the back-off of costlier arms and the careful growth of unknown devices rely on it."""
    if not len(sizes) or not len(ranks):
        empty = "--arm-sizes" if not len(sizes) else "--arm-ranks"
        raise LLMPruneError(f"the bandit's arm grid is empty (no {empty})", GRID_FIX)
    for size in sizes:
        ok = isinstance(size, numbers.Real) and not isinstance(size, bool) and math.isfinite(size)
        if not ok or not 0 < size <= 1:
            raise LLMPruneError(f"--arm-sizes has {size!r}, outside (0, 1]", GRID_FIX)
    for rank in ranks:
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
            raise LLMPruneError(f"--arm-ranks has {rank!r}, not an integer >= 1", GRID_FIX)
    for flag, values in (("--arm-sizes", [float(s) for s in sizes]), ("--arm-ranks", [int(r) for r in ranks])):
        if len(set(values)) != len(values):
            dup = sorted({v for v in values if values.count(v) > 1})
            raise LLMPruneError(f"{flag} repeats {', '.join(f'{v:g}' for v in dup)}", "list each value once")
    return [Arm(float(s), int(r)) for s in sorted(sizes) for r in sorted(ranks)]


@dataclass
class RewardParts:
    """How one device's reward for one round came about (metrics.json records it per device)."""

    gain: float | None        # loss_first - loss_last within the round (None when failed)
    seconds: float | None     # the device's round time
    rate: float | None        # gain / seconds
    normalized: float | None  # rate / scale
    straggle: float           # max(0, seconds / median seconds of the round's returned devices - 1)
    failed: str               # "" or why: "oom", "timeout", "crash", "nonfinite"
    reward: float             # normalized - straggler_weight * straggle in [-1, 1]; failed -> -penalty

    def to_dict(self) -> dict:
        """JSON-able, floats rounded to 6 digits (a report, not a state: nothing is restored from it)."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(float(x), 6)
        return {"gain": r(self.gain), "seconds": r(self.seconds), "rate": r(self.rate),
                "normalized": r(self.normalized), "straggle": r(self.straggle), "failed": self.failed,
                "reward": r(self.reward)}


def _outcome(key: str, result: dict) -> tuple[float | None, float | None, str]:
    """(gain, seconds, failed) of one device's result; a malformed result is the caller's bug."""
    if "failed" in result:
        if not isinstance(result["failed"], str) or not result["failed"]:
            raise LLMPruneError(f"device {key}: 'failed' must be a non-empty reason, got {result['failed']!r}",
                                "pass e.g. {'failed': 'oom'}")
        return None, None, result["failed"]
    missing = [k for k in ("loss_first", "loss_last", "seconds") if k not in result]
    if missing:
        raise LLMPruneError(f"device {key}'s round result lacks {', '.join(missing)}",
                            "pass loss_first, loss_last and seconds, or failed")
    seconds = float(result["seconds"])
    if not math.isfinite(seconds) or seconds <= 0:
        raise LLMPruneError(f"device {key}'s round took {seconds!r} seconds", "pass a positive round time")
    gain = float(result["loss_first"]) - float(result["loss_last"])
    if not math.isfinite(gain):  # a diverged device: no usable rate, treated as a failure
        return None, seconds, "nonfinite"
    return gain, seconds, ""


def round_rewards(results: dict[str, dict], scale: float, straggler_weight: float = 0.5,
                  failure_penalty: float = 1.0) -> tuple[dict[str, RewardParts], float]:
    """Every device's reward for one round and the updated scale. The rate (loss gain per second)
    is what a device contributes per unit of wall time; dividing by the largest |rate| seen so far
    (updated with this round first) keeps rewards in [-1, 1] whatever the loss's units, and the
    straggle term penalizes devices that hold the round up for everyone."""
    if not math.isfinite(scale) or scale < 0:
        raise LLMPruneError(f"the bandit's reward scale is {scale!r}", "pass the scale round_rewards returned (>= 0)")
    if not straggler_weight >= 0 or not failure_penalty >= 0:
        raise LLMPruneError(f"straggler weight {straggler_weight!r} and failure penalty {failure_penalty!r} "
                            "must be >= 0", "pass non-negative numbers")
    outcomes = {key: _outcome(key, result) for key, result in results.items()}
    rates = {key: gain / sec for key, (gain, sec, failed) in outcomes.items() if not failed}
    scale = max([scale, SCALE_EPS] + [abs(rate) for rate in rates.values()])
    # The median over returned devices only: a failed device's time says nothing about speed.
    median = float(np.median([outcomes[key][1] for key in rates])) if rates else 0.0
    parts = {}
    for key, (gain, seconds, failed) in outcomes.items():
        if failed:
            parts[key] = RewardParts(gain, seconds, None, None, 0.0, failed, -float(failure_penalty))
            continue
        normalized = rates[key] / scale
        straggle = max(0.0, seconds / median - 1.0)
        reward = min(1.0, max(-1.0, normalized - straggler_weight * straggle))
        parts[key] = RewardParts(gain, seconds, rates[key], normalized, straggle, "", reward)
    return parts, scale


class DeviceBandit:
    """UCB1 over the arms one device may play."""

    def __init__(self, arms: list[Arm], allowed: list[int], declared: bool, exploration: float = 0.5,
                 backoff_rounds: int = 2, max_backoff: int = 16):
        """`arms` is the whole grid (sorted by cost), `allowed` the indices this device may ever
        play. `declared=False` (unknown memory): play only up to a ceiling that starts at the
        smallest allowed arm and moves up one allowed arm per success of the ceiling arm."""
        if not arms:
            raise LLMPruneError("the bandit's arm grid is empty", GRID_FIX)
        if not allowed:
            raise LLMPruneError("no arm of the bandit's grid fits this device",
                                "declare more memory or add smaller --arm-sizes / --arm-ranks")
        bad = [a for a in allowed if not isinstance(a, numbers.Integral) or not 0 <= a < len(arms)]
        if bad or len(set(allowed)) != len(allowed):
            raise LLMPruneError(f"allowed arms {list(allowed)} are not distinct indices of the {len(arms)} arms",
                                "pass each allowed arm index once")
        if not (math.isfinite(exploration) and exploration >= 0) or backoff_rounds < 0 or max_backoff < 0:
            raise LLMPruneError(f"bandit settings exploration={exploration!r}, backoff_rounds={backoff_rounds!r}, "
                                f"max_backoff={max_backoff!r}", "pass non-negative values")
        self.arms = list(arms)
        self.allowed = sorted(int(a) for a in allowed)
        self.declared = bool(declared)
        self.exploration = float(exploration)
        self.backoff_rounds = int(backoff_rounds)
        self.max_backoff = int(max_backoff)
        n = len(self.arms)
        self.plays = [0] * n
        self.sums = [0.0] * n
        self.failures = [0] * n
        self.backoff_until = [0] * n  # arm a is not playable in rounds < backoff_until[a]
        # A declared device may play every allowed arm: its ceiling is the costliest one.
        self.ceiling = self.allowed[-1] if self.declared else self.allowed[0]

    def candidates(self, server_round: int) -> list[int]:
        """The arms playable this round, cheapest first: allowed, under the ceiling, not backed off."""
        return [a for a in self.allowed if a <= self.ceiling and server_round >= self.backoff_until[a]]

    def choose(self, server_round: int) -> int | None:
        """The arm to play this round, or None when every arm it may play is backed off (the
        device rests: replaying an arm that just failed would only fail again). Does not change
        the bandit: call `update` with the outcome."""
        candidates = self.candidates(server_round)
        if not candidates:
            return None
        unplayed = [a for a in candidates if self.plays[a] == 0]
        if unplayed:  # UCB needs one play of each arm; the cheapest first is the safest
            return unplayed[0]
        values = self.ucb()
        best = candidates[0]
        for a in candidates[1:]:
            if values[a] > values[best]:  # strict: ties keep the cheaper arm
                best = a
        return best

    def update(self, arm: int, reward: float, server_round: int, failed: str = "") -> None:
        """Record one play. A failure backs off the arm and every costlier arm (a device that ran out
        of memory on an arm will on a bigger one too) and lowers an unknown device's ceiling; a
        success of the ceiling arm raises it by one allowed arm."""
        if arm not in self.allowed:
            raise LLMPruneError(f"arm {arm} is not allowed for this device (allowed: {self.allowed})",
                                "update with the arm choose() returned")
        if not math.isfinite(reward):
            raise LLMPruneError(f"the bandit got a non-finite reward {reward!r} for arm {arm}",
                                "pass the reward round_rewards computed")
        self.plays[arm] += 1
        self.sums[arm] += float(reward)
        if failed:
            self._fail(arm, server_round, failed)
        elif not self.declared and arm == self.ceiling:
            higher = [a for a in self.allowed if a > arm]
            if higher:
                self.ceiling = higher[0]

    def _fail(self, arm: int, server_round: int, why: str) -> None:
        """Back off `arm` and costlier arms for backoff_rounds * 2**(failures - 1) rounds (at most
        max_backoff) after this one; an unknown device's ceiling drops below the failed arm."""
        self.failures[arm] += 1
        length = min(self.max_backoff, self.backoff_rounds * 2 ** (self.failures[arm] - 1))
        until = server_round + 1 + length
        for a in range(arm, len(self.arms)):
            self.backoff_until[a] = max(self.backoff_until[a], until)
        if not self.declared:
            lower = [a for a in self.allowed if a < arm]
            self.ceiling = min(self.ceiling, lower[-1] if lower else self.allowed[0])
        log.debug("arm %s failed (%s) in round %d: it and costlier arms wait until round %d",
                  self.arms[arm].label(), why, server_round, until)

    def ucb(self) -> dict[int, float]:
        """UCB_a = mean_a + exploration * sqrt(2 ln t / n_a) of every played allowed arm, t the
        device's total plays (failures included: a failure is information too)."""
        total = sum(self.plays)
        return {a: self.sums[a] / self.plays[a] + self.exploration * math.sqrt(2 * math.log(total) / self.plays[a])
                for a in self.allowed if self.plays[a]}

    def state_dict(self) -> dict:
        """JSON-able state (str keys, lists, floats, ints); floats are not rounded, so JSON restores
        them exactly. The arms and allowed set are kept to refuse a state from another grid."""
        return {"arms": [[arm.size, arm.rank] for arm in self.arms], "allowed": list(self.allowed),
                "declared": int(self.declared), "plays": list(self.plays), "sums": list(self.sums),
                "failures": list(self.failures), "backoff_until": list(self.backoff_until),
                "ceiling": self.ceiling}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output exactly. The settings (exploration, back-off) stay the
        constructor's; the grid, allowed set and declared flag must match it."""
        arms = [[arm.size, arm.rank] for arm in self.arms]
        if state.get("arms") != arms or state.get("allowed") != self.allowed \
                or bool(state.get("declared")) != self.declared:
            raise LLMPruneError("the saved bandit state is for another arm grid or device",
                                "resume with the same --arm-sizes, --arm-ranks and device memory, or start a new run")
        n = len(self.arms)
        for key in ("plays", "sums", "failures", "backoff_until"):
            if len(state.get(key, [])) != n:
                raise LLMPruneError(f"the saved bandit state has a bad '{key}'", "start a new run")
        self.plays = [int(v) for v in state["plays"]]
        self.sums = [float(v) for v in state["sums"]]
        self.failures = [int(v) for v in state["failures"]]
        self.backoff_until = [int(v) for v in state["backoff_until"]]
        self.ceiling = int(state["ceiling"])
