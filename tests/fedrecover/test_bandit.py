"""The per-device bandit: arm grid and number parsing, the global-model credit on constructed round
results, priors, UCB arithmetic, the exploration schedule on a stationary and a drifting reward,
failure back-off, careful growth of devices of unknown memory, allowed arms, and an exact resume
through JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmprune.errors import LLMPruneError
from llmprune.fedrecover.bandit import (
    Arm,
    DeviceBandit,
    arm_grid,
    explorers,
    holdings_prior,
    next_baseline,
    parse_numbers,
    round_rewards,
)


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


def test_credit_is_the_holdings_share_of_the_global_gain_against_the_baseline():
    """Constructed round: four devices returned, one failed; the global loss fell 0.2 nats and
    recent rounds averaged 0.1, so the round counts twice as good as recent ones."""
    results = {"a": {"seconds": 2.0}, "b": {"seconds": 4.0}, "c": {"seconds": 6.0}, "e": {"seconds": 8.0},
               "f": {"failed": "oom"}}
    holdings = {"a": 40.0, "b": 30.0, "c": 20.0, "e": 10.0}            # examples x adapter values trained
    parts = round_rewards(results, holdings, gain=0.2, baseline=0.1)
    a, b, c, e, f = (parts[k] for k in "abcef")
    assert [p.share for p in (a, b, c, e)] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert sum(p.credit for p in (a, b, c, e)) == pytest.approx(0.2)  # the credits add up to the global gain
    assert a.credit == pytest.approx(0.08) and e.credit == pytest.approx(0.02)
    # n * share * gain / baseline = 4 * 0.4 * 2 = 3.2, clipped to 1; median seconds of [2, 4, 6, 8] = 5
    assert a.straggle == 0.0 and a.reward == 1.0
    assert b.reward == 1.0                                            # 4 * 0.3 * 2 = 2.4, clipped
    # the credit is clipped before the straggler term: a large share does not hide the wait
    assert c.straggle == pytest.approx(0.2) and c.reward == pytest.approx(0.9)      # clip(1.6) - 0.1
    assert e.straggle == pytest.approx(0.6) and e.reward == pytest.approx(0.8 - 0.3)
    assert (f.share, f.credit, f.seconds, f.failed, f.reward) == (None, None, None, "oom", -1.0)
    assert a.gain == 0.2 and a.baseline == 0.1 and a.failed == ""


def test_leave_one_out_blames_the_small_device_that_harmed_the_model_where_holdings_cannot():
    """What bench/adaptive.py measured: two devices on tiny submodels (a tenth of the holdings each)
    made the global model worse although the three on the whole model helped. Shared by holdings,
    the loss falls on the big devices; left out one at a time, the server sees who did it."""
    results = {k: {"seconds": 10.0} for k in ("big1", "big2", "big3", "tiny1", "tiny2")}
    holdings = {"big1": 8.0, "big2": 8.0, "big3": 8.0, "tiny1": 1.0, "tiny2": 1.0}
    # without a big device the loss would be 0.04 higher (it helped); without a tiny one 0.06 lower
    left_out = {"big1": 0.04, "big2": 0.04, "big3": 0.04, "tiny1": -0.06, "tiny2": -0.06}
    by_holdings = round_rewards(results, holdings, gain=-0.1, baseline=0.1)
    measured = round_rewards(results, holdings, gain=-0.1, baseline=0.1, left_out=left_out)
    assert by_holdings["big1"].reward == -1.0 and by_holdings["tiny1"].reward == pytest.approx(-5 / 26)
    assert measured["big1"].reward == 1.0 and measured["tiny1"].reward == -1.0     # 5 x 0.04 / 0.1 = 2, clipped
    assert measured["big1"].credit == 0.04 and measured["big1"].attribution == "leave-one-out"
    assert by_holdings["big1"].attribution == "holdings"
    # a device whose leave-one-out was not measured (e.g. it joined late) keeps the holdings credit
    mixed = round_rewards(results, holdings, gain=-0.1, baseline=0.1, left_out={"big1": 0.04})
    assert mixed["big2"].attribution == "holdings" and mixed["big1"].attribution == "leave-one-out"
    with pytest.raises(LLMPruneError, match="non-finite leave-one-out"):
        round_rewards(results, holdings, gain=-0.1, baseline=0.1, left_out={"big1": float("nan")})


def test_a_worse_global_model_is_blamed_by_share_and_the_baseline_follows_the_gains():
    results = {"a": {"seconds": 1.0}, "b": {"seconds": 3.0}, "t": {"failed": "timeout"}}
    parts = round_rewards(results, {"a": 3.0, "b": 1.0}, gain=-0.05, baseline=0.1, straggler_weight=0.1,
                          failure_penalty=0.7)
    # relative -0.5; a: 2 * 0.75 * -0.5 = -0.75; b: 2 * 0.25 * -0.5 - 0.1 * 0.5 (median of [1, 3] = 2)
    assert parts["a"].reward == pytest.approx(-0.75) and parts["b"].reward == pytest.approx(-0.25 - 0.05)
    assert parts["t"].reward == -0.7
    # the moving baseline: the first round's |gain| starts it, then an exponential mean of |gain|
    assert next_baseline(0.0, -0.3, 0.5) == 0.3
    assert next_baseline(0.1, -0.05, 0.5) == pytest.approx(0.075)
    assert next_baseline(0.1, 0.3, 1.0) == pytest.approx(0.3)


def test_a_round_as_good_as_the_recent_ones_is_worth_the_same_early_and_late():
    """Gains shrink as training converges; read against the moving baseline, an arm played late is
    not blamed for it: the same share of a round as good as the recent ones earns the same."""
    early = round_rewards({"a": {"seconds": 1.0}, "b": {"seconds": 1.0}}, {"a": 1.0, "b": 1.0}, gain=0.5,
                          baseline=0.5)
    late = round_rewards({"a": {"seconds": 1.0}, "b": {"seconds": 1.0}}, {"a": 1.0, "b": 1.0}, gain=0.01,
                         baseline=0.01)
    assert early["a"].reward == late["a"].reward == pytest.approx(1.0)
    assert early["a"].credit == pytest.approx(0.25) and late["a"].credit == pytest.approx(0.005)


def test_straggle_uses_the_median_not_the_mean():
    parts = round_rewards({"a": {"seconds": 1.0}, "b": {"seconds": 2.0}, "c": {"seconds": 9.0}},
                          {"a": 1.0, "b": 1.0, "c": 1.0}, gain=0.0, baseline=1.0)
    # median 2 (the mean would be 4): c straggles 9 / 2 - 1 = 3.5, reward 0 - 0.5 * 3.5 clipped at -1
    assert [parts[k].straggle for k in "abc"] == [0.0, 0.0, 3.5]
    assert parts["c"].reward == -1.0


def test_round_rewards_edge_cases():
    parts = round_rewards({"x": {"failed": "crash"}}, {}, gain=0.1, baseline=0.0)
    assert parts["x"].reward == -1.0  # nothing returned: no division by zero
    one = round_rewards({"x": {"seconds": 100.0}}, {"x": 5.0}, gain=0.3, baseline=0.0)["x"]
    # no baseline yet: the round counts as good as recent ones; a single device is its own median
    assert one.share == 1.0 and one.straggle == 0.0 and one.reward == 1.0
    assert round_rewards({"x": {"seconds": 1.0}}, {"x": 5.0}, gain=-0.3, baseline=0.0)["x"].reward == -1.0
    flat = round_rewards({"x": {"seconds": 1.0}}, {"x": 5.0}, gain=0.0, baseline=0.0)["x"]
    assert flat.reward == 0.0
    diverged = round_rewards({"x": {"seconds": 1.0}, "y": {"failed": "oom"}}, {"x": 1.0}, float("nan"), 1.0)
    assert diverged["x"].failed == "nonfinite" and diverged["x"].reward == -1.0 and diverged["y"].failed == "oom"
    for bad in ({"loss_first": 1.0}, {"seconds": 0.0}, {"failed": ""}):
        with pytest.raises(LLMPruneError, match="device x"):
            round_rewards({"x": bad}, {"x": 1.0}, 0.1, 1.0)
    with pytest.raises(LLMPruneError, match="no holdings"):
        round_rewards({"x": {"seconds": 1.0}}, {}, 0.1, 1.0)
    with pytest.raises(LLMPruneError, match="not positive"):
        round_rewards({"x": {"seconds": 1.0}}, {"x": 0.0}, 0.1, 1.0)
    with pytest.raises(LLMPruneError, match="baseline"):
        round_rewards({}, {}, 0.1, -1.0)


def test_reward_parts_to_dict():
    parts = round_rewards({"a": {"seconds": 3.0}, "f": {"failed": "oom"}}, {"a": 2.0}, gain=0.1234567,
                          baseline=0.2)
    assert parts["a"].to_dict() == {"gain": 0.123457, "baseline": 0.2, "share": 1.0, "credit": 0.123457,
                                    "attribution": "holdings", "seconds": 3.0, "straggle": 0.0, "failed": "", "reward": 0.617283}
    assert json.loads(json.dumps(parts["f"].to_dict()))["share"] is None


def test_the_prior_is_each_arms_holdings_against_the_largest_it_may_play():
    arms = arm_grid([0.25, 0.5, 1.0], [2, 4])
    units = [1, 1, 2, 2, 4, 4]
    assert holdings_prior(arms, [0, 1, 2, 3], units) == pytest.approx([0.25, 0.5, 0.5, 1.0, 0.0, 0.0])
    assert holdings_prior(arms, list(range(6)), units) == pytest.approx([1 / 8, 1 / 4, 1 / 4, 1 / 2, 1 / 2, 1.0])


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


def stationary(_t: int) -> list[float]:
    return [0.05, 0.1, 0.2, 0.3, 0.9, 0.6]      # arm 4 is best; the prior's favourite (arm 5) is second


def drifting(t: int) -> list[float]:
    return stationary(t) if t <= 15 else [0.05, 0.1, 0.9, 0.3, 0.2, 0.2]   # from round 16 arm 2 is best


def simulate(bandit: DeviceBandit, means, rounds: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    picks = []
    for t in range(1, rounds + 1):
        arm = bandit.choose(t)
        picks.append(arm)
        bandit.update(arm, float(np.clip(means(t)[arm] + rng.normal(0, 0.2), -1, 1)), t)
    return picks


def six_arms(**settings) -> DeviceBandit:
    arms = arm_grid([0.1, 0.3, 1.0], [4, 8])
    prior = holdings_prior(arms, list(range(6)), [2, 2, 5, 5, 18, 18])
    return DeviceBandit(arms, list(range(6)), declared=True, prior=prior, **settings)


def test_with_priors_the_bandit_starts_at_the_largest_arm_and_never_sweeps_every_arm():
    """Stationary reward, 8 rounds (bench/adaptive.py's length): UCB1 spends 6 of them playing each
    arm once; from priors the bandit starts where the memory estimate points and finds the best arm
    next to it, with less regret over 20 seeds."""
    def regret(settings: dict, seed: int) -> float:
        picks = simulate(six_arms(**settings), stationary, 8, seed)
        return sum(max(stationary(0)) - stationary(0)[a] for a in picks)

    ucb1 = dict(discount=1.0, prior_weight=0.0, exploration=0.5)
    ours = dict(discount=0.9, prior_weight=1.0, exploration=0.2)      # the policy's defaults
    assert simulate(six_arms(**ucb1), stationary, 6, 0) == [0, 1, 2, 3, 4, 5]
    picks = simulate(six_arms(**ours), stationary, 8, 0)
    assert picks[0] == 5 and len(set(picks)) < 6 and picks[-3:].count(4) >= 2
    assert np.mean([regret(ours, s) for s in range(20)]) < 0.5 * np.mean([regret(ucb1, s) for s in range(20)])


def test_a_discounted_bandit_follows_a_reward_that_drifts():
    """The best arm changes after round 15: with a discount the old rounds fade and the bandit moves
    to the new best; without one it keeps the old best longer (over 20 seeds, rounds 16-40)."""
    def moved(discount: float, seed: int) -> float:
        picks = simulate(six_arms(discount=discount, prior_weight=1.0, exploration=0.2), drifting, 40, seed)
        return picks[15:].count(2) / 25

    discounted = np.mean([moved(0.9, s) for s in range(20)])
    assert discounted > np.mean([moved(1.0, s) for s in range(20)]) + 0.1 and discounted > 0.4


def test_priors_and_discount_survive_json_and_bad_settings_are_one_line():
    bandit = six_arms(discount=0.9, prior_weight=1.0, exploration=0.2)
    simulate(bandit, stationary, 5, 3)
    again = six_arms(discount=0.9, prior_weight=1.0, exploration=0.2)
    again.load_state_dict(json.loads(json.dumps(bandit.state_dict())))
    assert again.ucb() == bandit.ucb() and simulate(again, stationary, 4, 9) == simulate(bandit, stationary, 4, 9)
    for settings, words in ((dict(discount=0.0), "discount"), (dict(discount=1.5), "discount"),
                            (dict(prior_weight=-1.0), "prior weight"), (dict(prior=[0.0]), "prior has 1")):
        with pytest.raises(LLMPruneError, match=words) as err:
            DeviceBandit(grid3(), [0, 1, 2], declared=True, **settings)
        assert "\n" not in str(err.value)


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


def test_undeclared_starting_largest_drops_a_whole_size_after_out_of_memory():
    # sizes 0.25 / 0.5 / 1 at ranks 2 and 4: a failure at 1x4 skips 1x2 (as big, it would fail too)
    arms = arm_grid([0.25, 0.5, 1.0], [2, 4])
    bandit = DeviceBandit(arms, list(range(6)), declared=False, backoff_rounds=2, unknown_start="largest",
                          prior=[1 / 8, 1 / 4, 1 / 4, 1 / 2, 1 / 2, 1.0], prior_weight=1.0, exploration=0.0)
    assert bandit.ceiling == 5 and bandit.choose(1) == 5      # where the plan starts it: all fits
    bandit.update(5, -1.0, 1, failed="oom")
    assert bandit.ceiling == 3 and bandit.candidates(2) == [0, 1, 2, 3]   # the largest arm of size 0.5
    assert bandit.state_dict()["backoff_until"] == [0, 0, 0, 0, 4, 4]     # 1x2 waits with 1x4
    bandit.update(3, 0.8, 2)                                  # a success grows it one arm (still backed off)
    assert bandit.ceiling == 4 and bandit.candidates(3) == [0, 1, 2, 3] and bandit.candidates(4) == [0, 1, 2, 3, 4]


def test_unknown_start_is_checked():
    with pytest.raises(LLMPruneError, match="unknown_start"):
        DeviceBandit(grid3(), [0, 1], declared=False, unknown_start="middle")


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


def test_an_arm_the_budget_does_not_admit_is_never_played_however_it_would_pay():
    """The memory estimate admits arms 0-3 of six; arms 4 and 5 would earn the most, yet over 200
    rounds of noisy rewards, with priors and discounting, neither is ever chosen."""
    arms = arm_grid([0.1, 0.3, 1.0], [4, 8])
    allowed = [0, 1, 2, 3]
    bandit = DeviceBandit(arms, allowed, declared=True, exploration=1.0, discount=0.9, prior_weight=1.0,
                          prior=holdings_prior(arms, allowed, [2, 2, 5, 5, 18, 18]))
    rng = np.random.default_rng(7)
    chosen = []
    for rnd in range(1, 201):
        arm = bandit.choose(rnd)
        chosen.append(arm)
        if arm is not None:          # None: every arm it may play is backed off, the device rests
            bandit.update(arm, float(rng.uniform(-1, 1)), rnd, failed="oom" if rng.uniform() < 0.05 else "")
    assert set(chosen) - {None} == {0, 1, 2, 3} and bandit.plays[4] == bandit.plays[5] == 0
    assert bandit.counts[4] == bandit.counts[5] == 0.0


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


# ---------------------------------------------------------------- staggered exploration


def test_a_few_devices_explore_a_round_in_turn():
    everyone = {str(k): True for k in range(6)}
    # a quarter of 6 devices: one a round, moving one device each round (ids in numeric order)
    assert [explorers(everyone, 0.25, r) for r in (1, 2, 3, 7)] == [{"0"}, {"1"}, {"2"}, {"0"}]
    assert explorers(everyone, 0.5, 5) == {"4", "5", "0"}
    # only those that want to explore are counted; the turn passes to the next one that does
    assert explorers({**{str(k): False for k in range(6)}, "3": True, "5": True}, 0.25, 1) == {"3"}
    assert explorers({"2": True, "10": True, "9": False}, 1.0, 1) == {"2", "10"}
    assert explorers({}, 0.25, 1) == set() and explorers({"0": False}, 1.0, 1) == set()
    with pytest.raises(LLMPruneError, match="explorer share 0"):
        explorers(everyone, 0.0, 1)


def test_greedy_is_the_best_mean_and_the_cheaper_on_a_tie():
    arms = arm_grid([0.25, 0.5, 1.0], [4])
    bandit = DeviceBandit(arms, [0, 1, 2], declared=True, prior=[0.25, 0.5, 1.0], prior_weight=1.0, exploration=1.0)
    assert bandit.greedy(1) == 2                       # the prior: the largest holds most
    bandit.update(2, -1.0, 1)                          # a bad round on it: mean (1 - 1) / 2 = 0
    assert bandit.greedy(2) == 1
    bandit.update(1, 0.4, 2)                           # means 0.25 (1 play), 0.45 (2), 0 (2)
    assert bandit.greedy(3) == 1 and bandit.choose(3) == 0   # UCB explores the least-played; greedy does not
    tie = DeviceBandit(arms, [0, 1, 2], declared=True, prior=[0.5, 0.5, 0.5], prior_weight=1.0)
    assert tie.greedy(1) == 0
    rest = DeviceBandit(arms, [1], declared=True)
    rest.update(1, -1.0, 1, failed="oom")
    assert rest.greedy(2) is None and rest.choose(2) is None
