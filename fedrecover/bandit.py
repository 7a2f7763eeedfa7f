"""The per-device bandit of FedSpine (arXiv 2501.02438): each federated round it picks, for one
device, an arm = (submodel size, LoRA rank), and learns from the round's reward which arm helps
the global model most for the time it takes.

- `arm_grid` builds the arms (every size x rank), sorted by cost so "cheaper" is "lower index";
- `round_rewards` turns one round into rewards. The credit is measured on the GLOBAL model: the
  change of the server's evaluation loss over the round shared by holdings (examples x adapter
  values trained), or, where asked and the server can aggregate without one device (not under
  SecAgg+ or central DP), what the loss would have been without the device's update
  (leave-one-out); either is read
  against a moving baseline (the mean size of recent rounds' changes), so a later round's smaller
  gains are not blamed on the arms played then. A device slower than the round's median pays a
  straggler penalty; one that failed (out of memory, timeout, crash, dropped from a SecAgg+ sum) a
  fixed penalty.
- `DeviceBandit` is a discounted UCB over the arms one device may play, started from priors (what
  the memory estimate says an arm holds) instead of playing every arm once; `explorers` lets
  only a few devices a round leave their best-known arm (in turn), with two safety
  rails: after a failure the arm and every costlier one are backed off for a number of rounds that
  doubles with each failure of that arm, and a device whose memory is unknown starts where the
  fleet plan starts it (its largest arm, as if all fits; or, asked, its smallest), drops below the
  failed arm's size after a failure and grows back one arm per success. Arms no declared budget
  admits are never offered.

Why the global model and not the device's own loss: a small submodel's LoRA learns to make up for
the layers it lacks and lowers its own loss fastest per second, yet does not carry over to the
whole model (bench/adaptive.py measured a bandit rewarded that way drifting to the smallest arms
while the global perplexity rose).

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

# Below this a moving baseline counts as "none yet": a first round, or rounds that changed nothing.
BASELINE_EPS = 1e-9
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


# --- the reward ------------------------------------------------------------------------------------

@dataclass
class RewardParts:
    """How one device's reward for one round came about (metrics.json records it per device)."""

    gain: float | None        # the global model's loss change over the round (nats; + = better), None if unmeasured
    baseline: float           # the moving baseline the gain is read against (0: none yet)
    share: float | None       # the device's share of the round's holdings (None when it failed)
    credit: float | None      # the device's part of the global change (nats): leave-one-out, else share * gain
    attribution: str          # "leave-one-out" or "holdings": how the credit was measured
    seconds: float | None     # the device's round time
    straggle: float           # max(0, seconds / median seconds of the round's returned devices - 1)
    failed: str               # "" or why: "oom", "timeout", "crash", "dropped", "nonfinite"
    reward: float             # clip(clip(n * share * gain / baseline) - straggler_weight * straggle); failed -> -penalty

    def to_dict(self) -> dict:
        """JSON-able, floats rounded to 6 digits (a report, not a state: nothing is restored from it)."""
        def r(x: float | None) -> float | None:
            return None if x is None else round(float(x), 6)
        return {"gain": r(self.gain), "baseline": r(self.baseline), "share": r(self.share), "credit": r(self.credit),
                "attribution": self.attribution, "seconds": r(self.seconds), "straggle": r(self.straggle), "failed": self.failed,
                "reward": r(self.reward)}


def _seconds(key: str, result: dict) -> tuple[float | None, str]:
    """(seconds, failed) of one device's result; a malformed result is the caller's bug."""
    if "failed" in result:
        if not isinstance(result["failed"], str) or not result["failed"]:
            raise LLMPruneError(f"device {key}: 'failed' must be a non-empty reason, got {result['failed']!r}",
                                "pass e.g. {'failed': 'oom'}")
        return None, result["failed"]
    if "seconds" not in result:
        raise LLMPruneError(f"device {key}'s round result lacks seconds", "pass seconds, or failed")
    seconds = float(result["seconds"])
    if not math.isfinite(seconds) or seconds <= 0:
        raise LLMPruneError(f"device {key}'s round took {seconds!r} seconds", "pass a positive round time")
    return seconds, ""


def holdings_shares(holdings: dict[str, float]) -> dict[str, float]:
    """Each device's share of what the round aggregated: its holdings over the sum. The credit
    follows what a device put into the average (FedAvg weights examples; a submodel adds only the
    adapter values it holds), not a leave-one-out evaluation, which would cost the server one
    evaluation per device per round."""
    bad = {k: v for k, v in holdings.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise LLMPruneError(f"the bandit got holdings that are not positive: {bad}",
                            "pass each returned device's examples x adapter values trained")
    total = sum(holdings.values())
    return {key: value / total for key, value in holdings.items()}


def next_baseline(baseline: float, gain: float, decay: float) -> float:
    """The moving baseline after a round: an exponential mean of the rounds' |gain| (the first
    round's |gain| starts it)."""
    if baseline < BASELINE_EPS:
        return abs(gain)
    return (1.0 - decay) * baseline + decay * abs(gain)


def round_rewards(results: dict[str, dict], holdings: dict[str, float], gain: float, baseline: float,
                  straggler_weight: float = 0.5, failure_penalty: float = 1.0,
                  left_out: dict[str, float] | None = None) -> dict[str, RewardParts]:
    """Every device's reward for one round. `results`: per device {"seconds": s} or {"failed":
    why}; `holdings`: per returned device its examples x adapter values trained; `gain`: the global
    model's loss before the round minus after (nats); `baseline`: the moving baseline before this
    round (next_baseline); `left_out`, where measured: per returned device the server's loss with
    its update left out of the aggregate minus the loss with every update (+ = the device helped).

    A device's credit is what leaving it out costs the global model (else its holdings share of
    the gain, which is blind to a device that harms the model more than its share); its reward is that credit read against the
    baseline and scaled by the number of returned devices n, so a device holding an equal share of
    a round as good as recent ones earns 1, whatever the loss's units or the training's stage
    (clipped to [-1, 1]); less the straggler term, which charges a device for holding the round up
    for everyone."""
    if not math.isfinite(baseline) or baseline < 0:
        raise LLMPruneError(f"the bandit's moving baseline is {baseline!r}", "pass the baseline next_baseline returned")
    if not straggler_weight >= 0 or not failure_penalty >= 0:
        raise LLMPruneError(f"straggler weight {straggler_weight!r} and failure penalty {failure_penalty!r} "
                            "must be >= 0", "pass non-negative numbers")
    outcomes = {key: _seconds(key, result) for key, result in results.items()}
    returned = [key for key, (_, failed) in outcomes.items() if not failed]
    missing = [key for key in returned if key not in holdings]
    if missing:
        raise LLMPruneError(f"no holdings for returned device(s) {', '.join(missing)}",
                            "pass each returned device's examples x adapter values trained")
    shares = holdings_shares({key: float(holdings[key]) for key in returned}) if returned else {}
    diverged = not math.isfinite(gain)     # the global model diverged: every returned device shares the blame
    left_out = left_out or {}
    bad = {k: v for k, v in left_out.items() if not math.isfinite(v)}
    if bad:
        raise LLMPruneError(f"non-finite leave-one-out credits {bad}", "pass finite loss differences")
    # read against the baseline; before there is one, against this round's |gain| (a round then counts
    # as "as good as recent ones"), and where that is 0 too only the credit's sign counts
    scale = baseline if baseline >= BASELINE_EPS else (abs(gain) if not diverged and abs(gain) >= BASELINE_EPS else 0.0)
    median = float(np.median([outcomes[key][0] for key in returned])) if returned else 0.0
    parts = {}
    for key, (seconds, failed) in outcomes.items():
        if failed or diverged:
            parts[key] = RewardParts(None if diverged else gain, baseline, shares.get(key), None, "", seconds, 0.0,
                                     failed or "nonfinite", -float(failure_penalty))
            continue
        straggle = max(0.0, seconds / median - 1.0)
        measured = key in left_out
        credit = left_out[key] if measured else shares[key] * gain
        relative = len(returned) * credit / scale if scale else float(np.sign(credit))
        # the credit is clipped before the straggler term, so a large credit never hides the wait
        parts[key] = RewardParts(gain, baseline, shares[key], credit, "leave-one-out" if measured else "holdings",
                                 seconds, straggle, "", _clip(_clip(relative) - straggler_weight * straggle))
    return parts


def _clip(value: float) -> float:
    return min(1.0, max(-1.0, value))


def explorers(wishes: dict[str, bool], share: float, server_round: int) -> set[str]:
    """Which of the devices that would explore this round (`wishes[key]`: its UCB arm is not its
    greedy one) may: at most max(1, floor(share x devices)), taken in a rotation that moves one
    device each round (by the keys' order), so every device gets its turn.

    Why not every device at once: devices alike (same memory and speed, rewards from the same
    rounds) hold the same bandit state and want to explore in the same round; when they all move
    to smaller arms together the round is poor for the global model and its loss change, which is
    the reward, no longer says which arm did what (measured: bench/adaptive.py)."""
    if not 0 < share <= 1:
        raise LLMPruneError(f"the bandit's explorer share {share!r} is outside (0, 1]", "pass e.g. 0.25")
    keys = sorted(wishes, key=lambda k: (len(k), k))      # numeric order for the partition ids
    if not keys:
        return set()
    allowed = max(1, math.floor(share * len(keys)))
    start = (server_round - 1) % len(keys)
    turn = keys[start:] + keys[:start]
    return set([k for k in turn if wishes[k]][:allowed])


def holdings_prior(arms: list[Arm], allowed: list[int], units: list[int]) -> list[float]:
    """Each arm's prior mean reward, from what is known before playing: the adapter it would hold
    (units x rank) over that of the largest arm the device may play, i.e. its expected holdings
    share next to devices like it; arms it may not play get 0 (they are never offered)."""
    held = {a: units[a] * arms[a].rank for a in allowed}
    top = max(held.values())
    return [held[a] / top if a in held else 0.0 for a in range(len(arms))]


# --- the bandit ------------------------------------------------------------------------------------

class DeviceBandit:
    """Discounted UCB over the arms one device may play, from prior pseudo-plays.

    Each arm starts with `prior_weight` pseudo-plays of mean `prior[a]`; every update first scales
    all counts and sums by `discount` (so old rounds and the priors fade, and a reward that drifts
    is followed), then adds the play. The index is mean + exploration * sqrt(2 ln N / n_a), N the
    sum of the counts. With discount 1 and prior_weight 0 it is UCB1 (every arm played once first,
    cheapest first)."""

    def __init__(self, arms: list[Arm], allowed: list[int], declared: bool, exploration: float = 0.5,
                 backoff_rounds: int = 2, max_backoff: int = 16, discount: float = 1.0,
                 prior: Sequence[float] | None = None, prior_weight: float = 0.0, unknown_start: str = "smallest"):
        """`arms` is the whole grid (sorted by cost), `allowed` the indices this device may ever
        play. `declared=False` (unknown memory): play only up to a ceiling that starts at the
        `unknown_start` ("smallest" or "largest") allowed arm, drops below the failed arm's size
        after a failure and moves up one allowed arm per success of the ceiling arm."""
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
        if unknown_start not in ("smallest", "largest"):
            raise LLMPruneError(f"bandit unknown_start {unknown_start!r}", "pass 'smallest' or 'largest'")
        if not 0 < discount <= 1 or not (math.isfinite(prior_weight) and prior_weight >= 0):
            raise LLMPruneError(f"bandit discount {discount!r} (needs (0, 1]) or prior weight {prior_weight!r} "
                                "(needs >= 0)", "pass e.g. --bandit-discount 0.8 --bandit-prior-weight 1")
        prior = [0.0] * len(arms) if prior is None else [float(p) for p in prior]
        if len(prior) != len(arms) or not all(math.isfinite(p) for p in prior):
            raise LLMPruneError(f"the bandit's prior has {len(prior)} finite values for {len(arms)} arms",
                                "pass one finite prior mean per arm")
        self.arms = list(arms)
        self.allowed = sorted(int(a) for a in allowed)
        self.declared = bool(declared)
        self.exploration = float(exploration)
        self.backoff_rounds = int(backoff_rounds)
        self.max_backoff = int(max_backoff)
        self.discount = float(discount)
        n = len(self.arms)
        self.plays = [0] * n                      # real plays (failures included)
        self.counts = [0.0] * n                   # discounted plays, priors included
        self.sums = [0.0] * n                     # discounted reward sums, priors included
        for a in self.allowed:
            self.counts[a], self.sums[a] = float(prior_weight), float(prior_weight) * prior[a]
        self.failures = [0] * n
        self.backoff_until = [0] * n  # arm a is not playable in rounds < backoff_until[a]
        # A declared device may play every allowed arm: its ceiling is the costliest one.
        top = self.declared or unknown_start == "largest"
        self.ceiling = self.allowed[-1] if top else self.allowed[0]

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
        unknown = [a for a in candidates if self.counts[a] <= 0]
        if unknown:  # no prior and never played: UCB needs one play; the cheapest first is the safest
            return unknown[0]
        values = self.ucb()
        best = candidates[0]
        for a in candidates[1:]:
            if values[a] > values[best]:  # strict: ties keep the cheaper arm
                best = a
        return best

    def greedy(self, server_round: int) -> int | None:
        """The playable arm of the highest mean so far (priors included; ties keep the cheaper
        arm): what the device plays when it does not explore. None when the device rests."""
        candidates = self.candidates(server_round)
        if not candidates:
            return None
        known = [a for a in candidates if self.counts[a] > 0]
        if not known:
            return candidates[0]
        best = known[0]
        for a in known[1:]:
            if self.sums[a] / self.counts[a] > self.sums[best] / self.counts[best]:
                best = a
        return best

    def update(self, arm: int, reward: float, server_round: int, failed: str = "") -> None:
        """Record one play. A failure backs off the arm, its size's other ranks and every costlier
        arm (a device that ran out of memory on an arm will on a bigger one too) and lowers an
        unknown device's ceiling; a success of the ceiling arm raises it by one allowed arm."""
        if arm not in self.allowed:
            raise LLMPruneError(f"arm {arm} is not allowed for this device (allowed: {self.allowed})",
                                "update with the arm choose() returned")
        if not math.isfinite(reward):
            raise LLMPruneError(f"the bandit got a non-finite reward {reward!r} for arm {arm}",
                                "pass the reward round_rewards computed")
        if self.discount < 1:
            self.counts = [c * self.discount for c in self.counts]
            self.sums = [s * self.discount for s in self.sums]
        self.plays[arm] += 1
        self.counts[arm] += 1.0
        self.sums[arm] += float(reward)
        if failed:
            self._fail(arm, server_round, failed)
        elif not self.declared and arm == self.ceiling:
            higher = [a for a in self.allowed if a > arm]
            if higher:
                self.ceiling = higher[0]

    def _fail(self, arm: int, server_round: int, why: str) -> None:
        """Back off `arm`, the other ranks of its size and the costlier arms for backoff_rounds *
        2**(failures - 1) rounds (at most max_backoff) after this one; an unknown device's ceiling
        drops below the failed arm's size (a smaller rank of the same size holds nearly as much
        memory: it would fail again)."""
        self.failures[arm] += 1
        length = min(self.max_backoff, self.backoff_rounds * 2 ** (self.failures[arm] - 1))
        until = server_round + 1 + length
        size = self.arms[arm].size
        for a in range(min(i for i, x in enumerate(self.arms) if x.size == size), len(self.arms)):
            self.backoff_until[a] = max(self.backoff_until[a], until)
        if not self.declared:
            lower = [a for a in self.allowed if self.arms[a].size < self.arms[arm].size]
            self.ceiling = min(self.ceiling, lower[-1] if lower else self.allowed[0])
        log.debug("arm %s failed (%s) in round %d: it and costlier arms wait until round %d",
                  self.arms[arm].label(), why, server_round, until)

    def ucb(self) -> dict[int, float]:
        """UCB_a = mean_a + exploration * sqrt(2 ln N / n_a) of every allowed arm with a count, N the
        sum of the (discounted) counts, at least 1 (failures count: a failure is information too)."""
        total = max(1.0, sum(self.counts[a] for a in self.allowed))
        return {a: self.sums[a] / self.counts[a] + self.exploration * math.sqrt(2 * math.log(total) / self.counts[a])
                for a in self.allowed if self.counts[a] > 0}

    def state_dict(self) -> dict:
        """JSON-able state (str keys, lists, floats, ints); floats are not rounded, so JSON restores
        them exactly. The arms and allowed set are kept to refuse a state from another grid."""
        return {"arms": [[arm.size, arm.rank] for arm in self.arms], "allowed": list(self.allowed),
                "declared": int(self.declared), "plays": list(self.plays), "counts": list(self.counts),
                "sums": list(self.sums), "failures": list(self.failures), "backoff_until": list(self.backoff_until),
                "ceiling": self.ceiling}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output exactly. The settings (exploration, discount, back-off)
        stay the constructor's; the grid, allowed set and declared flag must match it."""
        arms = [[arm.size, arm.rank] for arm in self.arms]
        if state.get("arms") != arms or state.get("allowed") != self.allowed \
                or bool(state.get("declared")) != self.declared:
            raise LLMPruneError("the saved bandit state is for another arm grid or device",
                                "resume with the same --arm-sizes, --arm-ranks and device memory, or start a new run")
        n = len(self.arms)
        for key in ("plays", "counts", "sums", "failures", "backoff_until"):
            if len(state.get(key, [])) != n:
                raise LLMPruneError(f"the saved bandit state has a bad '{key}'", "start a new run")
        self.plays = [int(v) for v in state["plays"]]
        self.counts = [float(v) for v in state["counts"]]
        self.sums = [float(v) for v in state["sums"]]
        self.failures = [int(v) for v in state["failures"]]
        self.backoff_until = [int(v) for v in state["backoff_until"]]
        self.ceiling = int(state["ceiling"])
