"""The per-device UCB bandit: arm grid and number parsing, round rewards on hand-made results, UCB
arithmetic, unplayed-first, failure back-off, careful growth of devices of unknown memory, allowed
arms, and an exact resume through JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmprune.errors import LLMPruneError
from llmprune.fedrecover.bandit import SCALE_EPS, Arm, DeviceBandit, arm_grid, parse_numbers, round_rewards


def grid3() -> list[Arm]:
    return arm_grid([0.25, 0.5, 1.0], [4])


# ---------------------------------------------------------------- arm grid and parsing


def test_arm_grid_sorted_by_size_then_rank():
    arms = arm_grid([1, 0.25, 0.5], [8, 2])
    assert [a.label() for a in arms] == ["0.25x2", "0.25x8", "0.5x2", "0.5x8", "1x2", "1x8"]
    assert arms[4] == Arm(1.0, 2) and isinstance(arms[4].size, float) and isinstance(arms[4].rank, int)


@pytest.mark.parametrize("sizes, ranks, words", [
    ([], [2], "empty"), ([0.5], [], "empty"),
    ([0.0], [2], "outside (0, 1]"), ([1.5], [2], "outside (0, 1]"), ([-0.5], [2], "outside (0, 1]"),
    ([float("nan")], [2], "outside (0, 1]"),
    ([0.5], [0], "integer >= 1"), ([0.5], [2.5], "integer >= 1"), ([0.5], [True], "integer >= 1"),
    ([0.5, 0.5], [2], "repeats 0.5"), ([0.5], [2, 4, 2], "repeats 2"),
])
def test_arm_grid_bad_input(sizes, ranks, words):
    with pytest.raises(LLMPruneError, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        arm_grid(sizes, ranks)
    assert info.value.fix  # every message says how to fix it


def test_parse_numbers():
    assert parse_numbers("0.25, 0.5,1", float, "--arm-sizes") == [0.25, 0.5, 1.0]
    assert all(type(v) is float for v in parse_numbers("0.25,1", float, "--arm-sizes"))
    assert parse_numbers("2,4,8", int, "--arm-ranks") == [2, 4, 8]
    assert parse_numbers("  ", int, "--arm-ranks") == []  # arm_grid then reports the empty grid
    for text, kind in (("2,x", int), ("2.5", int), ("0.5,,1", float), ("nan", float), ("1,inf", float)):
        with pytest.raises(LLMPruneError, match="--flag"):
            parse_numbers(text, kind, "--flag")


# ---------------------------------------------------------------- rewards


def test_round_rewards_arithmetic():
    results = {
        "a": {"loss_first": 3.0, "loss_last": 2.0, "seconds": 2.0},   # rate 0.5, the fastest
        "b": {"loss_first": 2.5, "loss_last": 2.3, "seconds": 4.0},   # rate 0.05
        "c": {"loss_first": 3.0, "loss_last": 6.0, "seconds": 6.0},   # rate -0.5, slow: clipped at -1
        "e": {"loss_first": 2.0, "loss_last": 1.6, "seconds": 8.0},   # rate 0.05, slowest
        "f": {"failed": "oom"},
    }
    parts, scale = round_rewards(results, scale=0.25)
    assert scale == 0.5  # max(0.25, max |rate| = 0.5), updated before normalizing
    # median of the returned devices' seconds [2, 4, 6, 8] = 5 (f's absence leaves it there)
    a, b, c, e, f = (parts[k] for k in "abcef")
    assert (a.gain, a.rate, a.normalized, a.straggle, a.reward) == (1.0, 0.5, 1.0, 0.0, 1.0)
    assert b.gain == pytest.approx(0.2) and b.rate == pytest.approx(0.05)
    assert b.normalized == pytest.approx(0.1) and b.straggle == 0.0 and b.reward == pytest.approx(0.1)
    assert c.gain == -3.0 and c.normalized == -1.0 and c.straggle == pytest.approx(0.2)
    assert c.reward == -1.0  # -1 - 0.5 * 0.2 = -1.1, clipped
    assert e.straggle == pytest.approx(0.6) and e.reward == pytest.approx(0.1 - 0.3)
    assert (f.gain, f.seconds, f.rate, f.normalized, f.straggle, f.failed, f.reward) == \
        (None, None, None, None, 0.0, "oom", -1.0)
    assert a.failed == ""


def test_round_rewards_scale_weights_and_penalty():
    results = {"a": {"loss_first": 2.0, "loss_last": 1.0, "seconds": 1.0},
               "b": {"loss_first": 2.0, "loss_last": 1.5, "seconds": 3.0},
               "t": {"failed": "timeout"}}
    parts, scale = round_rewards(results, scale=4.0, straggler_weight=0.1, failure_penalty=0.7)
    assert scale == 4.0  # a bigger past rate keeps the scale
    assert parts["a"].normalized == 0.25 and parts["a"].straggle == 0.0   # median of [1, 3] = 2
    assert parts["b"].straggle == pytest.approx(0.5)
    assert parts["b"].reward == pytest.approx(0.5 / 3 / 4 - 0.1 * 0.5)
    assert parts["t"].reward == -0.7


def test_straggle_uses_the_median_not_the_mean():
    same = {"loss_first": 1.0, "loss_last": 1.0}
    parts, _ = round_rewards({"a": {**same, "seconds": 1.0}, "b": {**same, "seconds": 2.0},
                              "c": {**same, "seconds": 9.0}}, scale=1.0)
    # median 2 (the mean would be 4): c straggles 9 / 2 - 1 = 3.5, reward 0 - 0.5 * 3.5 clipped at -1
    assert [parts[k].straggle for k in "abc"] == [0.0, 0.0, 3.5]
    assert parts["c"].reward == -1.0


def test_round_rewards_edge_cases():
    parts, scale = round_rewards({"x": {"failed": "crash"}}, scale=0.0)
    assert scale == SCALE_EPS and parts["x"].reward == -1.0  # nothing returned: no division by zero
    parts, scale = round_rewards({"x": {"loss_first": 1.0, "loss_last": 1.0, "seconds": 9.0}}, scale=0.0)
    assert scale == SCALE_EPS and parts["x"].normalized == 0.0 and parts["x"].reward == 0.0
    one = round_rewards({"x": {"loss_first": 2.0, "loss_last": 1.0, "seconds": 100.0}}, scale=0.0)[0]["x"]
    assert one.straggle == 0.0 and one.reward == 1.0  # a single returned device is its own median
    diverged = round_rewards({"x": {"loss_first": 2.0, "loss_last": float("nan"), "seconds": 1.0}}, 1.0)
    assert diverged[0]["x"].failed == "nonfinite" and diverged[0]["x"].reward == -1.0 and diverged[1] == 1.0
    for bad in ({"loss_first": 1.0, "seconds": 1.0}, {"loss_first": 1.0, "loss_last": 1.0, "seconds": 0.0},
                {"failed": ""}):
        with pytest.raises(LLMPruneError, match="device x"):
            round_rewards({"x": bad}, 1.0)
    with pytest.raises(LLMPruneError):
        round_rewards({}, -1.0)


def test_reward_parts_to_dict():
    parts, _ = round_rewards({"a": {"loss_first": 1.0, "loss_last": 0.0, "seconds": 3.0},
                              "f": {"failed": "oom"}}, scale=1.0)
    d = parts["a"].to_dict()
    assert d == {"gain": 1.0, "seconds": 3.0, "rate": 0.333333, "normalized": 0.333333, "straggle": 0.0,
                 "failed": "", "reward": 0.333333}
    assert json.loads(json.dumps(parts["f"].to_dict()))["gain"] is None


# ---------------------------------------------------------------- UCB


def test_unplayed_arms_first_cheapest_first():
    bandit = DeviceBandit(grid3(), [0, 1, 2], declared=True)
    chosen = []
    for rnd in (1, 2, 3):
        arm = bandit.choose(rnd)
        chosen.append(arm)
        bandit.update(arm, 1.0 if arm == 0 else -1.0, rnd)  # arm 0 is best, yet 1 and 2 get their play
    assert chosen == [0, 1, 2]
    assert bandit.choose(4) == 0


def test_ucb_arithmetic_three_arms():
    bandit = DeviceBandit(grid3(), [0, 1, 2], declared=True, exploration=0.5)
    for rnd, reward in zip((1, 2, 3), (0.2, 0.5, 0.1)):
        bandit.update(bandit.choose(rnd), reward, rnd)
    # t = 3, n_a = 1: bonus 0.5 * sqrt(2 ln 3) = 0.7411519036837557
    assert bandit.ucb() == pytest.approx({0: 0.9411519036837557, 1: 1.2411519036837557, 2: 0.8411519036837556},
                                         abs=1e-15)
    assert bandit.choose(4) == 1
    bandit.update(1, 0.3, 4)
    # t = 4: arm 1 mean 0.4, n = 2: 0.4 + 0.5 sqrt(ln 4) = 0.988705; arms 0, 2: mean + 0.5 sqrt(2 ln 4)
    ucb = bandit.ucb()
    assert ucb == pytest.approx({0: 1.0325546111576978, 1: 0.9887050112577374, 2: 0.9325546111576977}, abs=1e-15)
    assert ucb[0] == 0.2 + 0.5 * math.sqrt(2 * math.log(4) / 1)
    assert bandit.choose(5) == 0


def test_ucb_ties_go_to_the_cheaper_arm():
    bandit = DeviceBandit(grid3(), [0, 1, 2], declared=True)
    for rnd in (1, 2, 3):
        bandit.update(bandit.choose(rnd), 0.5, rnd)
    assert len(set(bandit.ucb().values())) == 1 and bandit.choose(4) == 0
    bandit = DeviceBandit(grid3(), [0, 1, 2], declared=True)
    for rnd, reward in zip((1, 2, 3), (0.1, 0.5, 0.5)):
        bandit.update(bandit.choose(rnd), reward, rnd)
    assert bandit.choose(4) == 1


# ---------------------------------------------------------------- back-off


def test_backoff_after_oom_then_doubles():
    # exploration 0: the choice is the best mean, so what back-off hides is plain to see
    bandit = DeviceBandit(grid3(), [0, 1, 2], declared=True, exploration=0.0, backoff_rounds=2, max_backoff=16)
    for rnd, reward in zip((1, 2, 3), (0.1, 0.9, 0.5)):
        bandit.update(bandit.choose(rnd), reward, rnd)
    assert bandit.choose(4) == 1
    bandit.update(1, -1.0, 4, failed="oom")  # arm 1 mean (0.9 - 1) / 2 = -0.05
    assert bandit.state_dict()["backoff_until"] == [0, 7, 7]  # 4 + 1 + 2
    # arm 1 and the costlier arm 2 (mean 0.5 > arm 0's 0.1) sit out rounds 5 and 6
    assert bandit.choose(5) == 0 and bandit.choose(6) == 0
    assert bandit.candidates(6) == [0] and bandit.candidates(7) == [0, 1, 2]
    assert bandit.choose(7) == 2
    bandit.update(1, -1.0, 7, failed="oom")  # second failure of arm 1: 2 * 2 = 4 rounds
    assert bandit.state_dict()["backoff_until"] == [0, 12, 12]
    assert [bandit.choose(r) for r in (8, 9, 10, 11)] == [0, 0, 0, 0]
    assert bandit.choose(12) == 2


def test_backoff_is_capped_and_cheaper_arms_untouched():
    bandit = DeviceBandit(grid3(), [0, 1, 2], declared=True, backoff_rounds=2, max_backoff=5)
    for rnd in (1, 2, 3):
        bandit.update(1, -1.0, rnd, failed="oom")  # back-offs 2, 4, min(5, 8) = 5
    assert bandit.state_dict()["backoff_until"] == [0, 9, 9]
    assert bandit.state_dict()["failures"] == [0, 3, 0]


def test_a_device_whose_arms_are_all_backed_off_rests_until_the_back_off_ends():
    bandit = DeviceBandit(grid3(), [1, 2], declared=True, backoff_rounds=3)
    bandit.update(1, -1.0, 1, failed="oom")
    assert bandit.candidates(2) == [] and [bandit.choose(r) for r in (2, 3, 4)] == [None, None, None]
    assert bandit.choose(5) == 2  # 1 + 1 + 3: both back, 2 is unplayed


# ---------------------------------------------------------------- unknown memory, allowed arms


def test_undeclared_grows_one_arm_per_success_and_drops_after_failure():
    arms = arm_grid([0.25, 0.5, 0.75, 1.0], [4])
    bandit = DeviceBandit(arms, [0, 1, 3], declared=False, backoff_rounds=2)
    assert bandit.choose(1) == 0 and bandit.candidates(1) == [0]
    bandit.update(0, 0.1, 1)
    assert bandit.ceiling == 1 and bandit.choose(2) == 1
    bandit.update(0, 0.1, 2)  # a success of a non-ceiling arm does not move the ceiling
    assert bandit.ceiling == 1
    bandit.update(1, 0.2, 2)
    assert bandit.ceiling == 3 and bandit.choose(3) == 3  # arm 2 is not allowed: skipped
    bandit.update(3, -1.0, 3, failed="oom")
    assert bandit.ceiling == 1  # the largest allowed arm below 3
    assert bandit.candidates(4) == [0, 1]
    bandit.update(1, 0.2, 4)  # ceiling success: back up to 3, still backed off until 3 + 1 + 2
    assert bandit.ceiling == 3 and bandit.candidates(5) == [0, 1] and bandit.candidates(6) == [0, 1, 3]
    bandit.update(0, -1.0, 6, failed="oom")  # never below the smallest allowed arm
    assert bandit.ceiling == 0 and bandit.choose(7) is None  # everything backed off: the device rests
    assert bandit.choose(9) == 0                              # 6 + 1 + 2: the smallest is back


def test_undeclared_starts_at_smallest_allowed():
    bandit = DeviceBandit(grid3(), [1, 2], declared=False)
    assert bandit.choose(1) == 1 and bandit.candidates(1) == [1]
    bandit.update(1, 0.5, 1)
    bandit.update(1, 0.5, 2)  # ceiling now 2 (the last allowed); another success keeps it there
    bandit.update(2, 0.5, 3)
    assert bandit.ceiling == 2


def test_allowed_restricts():
    arms = arm_grid([0.25, 0.5, 1.0], [2, 4])
    bandit = DeviceBandit(arms, [4, 0, 2], declared=True, exploration=1.0)
    rng = np.random.default_rng(0)
    chosen = set()
    for rnd in range(1, 60):
        arm = bandit.choose(rnd)
        chosen.add(arm)
        bandit.update(arm, float(rng.uniform(-1, 1)), rnd)
    assert chosen == {0, 2, 4}
    assert set(bandit.ucb()) == {0, 2, 4}
    with pytest.raises(LLMPruneError, match="not allowed"):
        bandit.update(1, 0.0, 60)


@pytest.mark.parametrize("allowed", [[], [3], [0, 0], [-1]])
def test_bad_allowed(allowed):
    with pytest.raises(LLMPruneError):
        DeviceBandit(grid3(), allowed, declared=True)


def test_bad_reward_and_settings():
    with pytest.raises(LLMPruneError):
        DeviceBandit(grid3(), [0], declared=True, exploration=-0.1)
    with pytest.raises(LLMPruneError, match="non-finite"):
        DeviceBandit(grid3(), [0], declared=True).update(0, float("nan"), 1)


# ---------------------------------------------------------------- resume


def only_str_keys(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and only_str_keys(v) for k, v in value.items())
    if isinstance(value, list):
        return all(only_str_keys(v) for v in value)
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def play(bandit: DeviceBandit, rounds: range, draws: np.ndarray) -> list[int]:
    """Play `rounds` with pre-drawn rewards (and failures) per round and arm: the same sequence
    whatever was chosen, so two bandits see the same world."""
    chosen = []
    for rnd in rounds:
        arm = bandit.choose(rnd)
        chosen.append(arm)
        if arm is None:           # every playable arm backed off: the device rests this round
            continue
        reward, fail = draws[rnd - 1, arm]
        failed = "oom" if fail < 0.15 else ""
        bandit.update(arm, -1.0 if failed else float(reward), rnd, failed=failed)
    return chosen


@pytest.mark.parametrize("declared", [True, False])
def test_state_round_trip_through_json(declared):
    arms = arm_grid([0.25, 0.5, 0.75, 1.0], [2, 4])
    allowed = [0, 1, 2, 3, 5, 6, 7]
    rng = np.random.default_rng(1234)
    draws = np.stack([rng.uniform(-1, 1, size=(40, len(arms))), rng.uniform(0, 1, size=(40, len(arms)))], axis=-1)
    make = lambda: DeviceBandit(arms, allowed, declared=declared, exploration=0.5)  # noqa: E731
    straight = make()
    expected = play(straight, range(1, 41), draws)
    first = make()
    assert play(first, range(1, 21), draws) == expected[:20]
    state = first.state_dict()
    assert only_str_keys(state)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.state_dict() == state and resumed.ucb() == first.ucb()  # exact, not approximate
    assert play(resumed, range(21, 41), draws) == expected[20:]
    assert resumed.state_dict() == straight.state_dict()
    assert len(set(expected)) > 2 and sum(straight.failures) > 0  # the sequence exercises the bandit


def test_load_refuses_another_grid():
    state = DeviceBandit(grid3(), [0, 1, 2], declared=True).state_dict()
    with pytest.raises(LLMPruneError, match="another arm grid"):
        DeviceBandit(arm_grid([0.25, 0.5, 1.0], [8]), [0, 1, 2], declared=True).load_state_dict(state)
    with pytest.raises(LLMPruneError, match="another arm grid"):
        DeviceBandit(grid3(), [0, 1], declared=True).load_state_dict(state)
