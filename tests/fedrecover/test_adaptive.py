"""Adaptive fleets end to end on tiny models: the bandit policy (arms, rewards, failures, state in
the round checkpoint), DevFT stages (fused layers, LoRA handed to group members) and prune-tune
(the global model re-pruned between rounds), each in Flower's simulation; and their bad inputs."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import RecoverConfig
from llmprune.fedrecover.fleet import Device, submodel_memory_mb, unit_costs
from llmprune.fedrecover.policies.bandit import admitted_arms, arm_units

from .conftest import assert_resumed_equal, copy_run, cut_back_to

LEAN = dict(client_dtype="bfloat16", client_embedding="int8")


@pytest.fixture(scope="module")
def costs(pruned_ckpt):
    from llmprune.fedrecover.planning import meta_model

    cfg = RecoverConfig.of(fleet="x.toml", policy="bandit", aggregation="hetlora", batch_size=2,
                           seq_len=32, lora_rank=4, **LEAN)
    return unit_costs(meta_model(str(pruned_ckpt)), cfg)


def write_fleet(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"devices": rows}))
    return str(path)


# ---------------------------------------------------------------- arms a declared budget admits
def test_a_declared_budget_admits_only_the_arms_that_fit(costs):
    from llmprune.fedrecover.bandit import arm_grid

    arms = arm_grid([0.34, 0.67, 1.0], [1, 4])
    units = arm_units(arms, len(costs.weights))
    assert [(a.size, a.rank) for a in arms] == [(0.34, 1), (0.34, 4), (0.67, 1), (0.67, 4), (1.0, 1), (1.0, 4)]
    assert units == [1, 1, 2, 2, 3, 3]
    just = submodel_memory_mb(costs, units[1], arms[1].rank)[0] + 0.01     # fits arm 1, not the costlier ones
    allowed = admitted_arms(costs, Device("d", just), arms, units)
    assert 0 in allowed and 1 in allowed and all(
        submodel_memory_mb(costs, units[i], arms[i].rank)[0] <= just for i in allowed)
    assert admitted_arms(costs, Device("u", None), arms, units) == list(range(len(arms)))


def test_no_arm_fitting_a_declared_budget_is_one_line(costs, tmp_path, pruned_ckpt):
    from llmprune.fedrecover.planning import meta_model
    from llmprune.fedrecover.policies.bandit import BanditPolicy

    fleet = write_fleet(tmp_path, [{"name": "big", "memory_mb": 1e6}, {"name": "tiny", "memory_mb": 10}])
    settings = dict(fleet=fleet, policy="bandit", aggregation="hetlora", batch_size=2, seq_len=32, lora_rank=4,
                    clients=2, **LEAN)
    with pytest.raises(LLMPruneError) as err:
        BanditPolicy(RecoverConfig.of(**settings)).plan_devices(meta_model(str(pruned_ckpt)), 2)
    assert "no bandit arm fits device 'tiny' (10 MB)" in str(err.value) and "\n" not in str(err.value)
    skipped = BanditPolicy(RecoverConfig.of(**settings, skip_unfit=True)).plan_devices(meta_model(str(pruned_ckpt)), 2)
    assert [p.refused != "" for p in skipped] == [False, True]


@pytest.mark.parametrize("kwargs, message", [
    ({"arm_sizes": ""}, "arm grid is empty"),
    ({"arm_sizes": "0.5,1.5"}, "--arm-sizes"),
    ({"arm_ranks": "2,16"}, "a rank above --lora-rank 8"),
    ({"arm_ranks": "2,4", "aggregation": "fedavg"}, "needs an aggregation of mixed ranks"),
    ({"fleet": None}, "--policy bandit needs --fleet"),
    ({"bandit_discount": 0.0}, "--bandit-discount.*must be in \\(0, 1\\]"),
    ({"bandit_discount": 1.5}, "--bandit-discount"),
    ({"bandit_prior_weight": -1.0}, "--bandit-prior-weight"),
    ({"bandit_baseline_decay": float("nan")}, "--bandit-baseline-decay"),
    ({"bandit_credit": "shapley"}, "--bandit-credit"),
    ({"bandit_credit_windows": 0}, "--bandit-credit-windows"),
    ({"bandit_unknown_start": "middle"}, "--bandit-unknown-start"),
    ({"bandit_explore_share": 0.0}, "--bandit-explore-share"),
    ({"bandit_explore_share": 1.5}, "--bandit-explore-share"),
])
def test_bad_bandit_options(kwargs, message):
    base = dict(fleet="f.toml", policy="bandit", aggregation="hetlora")
    with pytest.raises(LLMPruneError, match=message.replace("+", r"\+")):
        RecoverConfig.of(**{**base, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"prune_every": 2}, "it belongs to --policy prune-tune"),
    ({"policy": "prune-tune", "target_ratio": 0.3, "devft_stages": "1,2"}, "it belongs to --policy devft"),
    ({"policy": "devft", "devft_stages": "grow:1,2"}, "is not a layer count"),
])
def test_bad_adaptive_options(kwargs, message):
    with pytest.raises(LLMPruneError, match=message):
        RecoverConfig.of(**kwargs)


# ---------------------------------------------------------------- the bandit in a simulation
# credit by leave-one-out (the default is holdings, which the SecAgg+ run below takes): both paths run
BANDIT = dict(clients=3, rounds=2, aggregation="hetlora", policy="bandit", arm_sizes="0.34,1",
              arm_ranks="1,4", emulate_speed=True, bandit_credit="leave-one-out", **LEAN)


@pytest.fixture(scope="module")
def bandit_run(pruned_ckpt, text_file, tmp_path_factory):
    from .conftest import run_recover

    tmp = tmp_path_factory.mktemp("bandit")
    # big: declared, everything fits; slow: half speed; ghost: undeclared, and its true limit is below any model
    fleet = write_fleet(tmp, [{"name": "big", "memory_mb": 1e6}, {"name": "slow", "memory_mb": 1e6, "speed": 0.5},
                              {"name": "ghost", "oom_mb": 1}])
    records = RecordsAbove(logging.WARNING)
    logging.getLogger().addHandler(records)
    try:
        run = run_recover(pruned_ckpt, [text_file], tmp / "recovered", fleet=fleet, **BANDIT)
    finally:
        logging.getLogger().removeHandler(records)
    run.warnings = records.lines
    return run, fleet, tmp


class RecordsAbove(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def test_the_bandit_plays_arms_learns_rewards_and_backs_off_a_failing_device(bandit_run):
    run, _, _ = bandit_run
    rounds = run.metrics["rounds"]
    for row in rounds:
        by_device = {c["device"]: c for c in row["clients"]}
        assert set(by_device) == {"big", "slow"}, row
    # the ghost (undeclared) starts where the plan would put it, on the largest arm, and runs out of memory;
    # it drops a whole size (1x1 would fail as 1x4 did) and fails again on the smaller size in round 2 ...
    assert [[(f["device"], f["failed"], f["arm"], f["reward"]["reward"]) for f in row["failures"]] for row in rounds] \
        == [[("ghost", "oom", "1x4", -1.0)], [("ghost", "oom", "0.34x4", -1.0)]]
    # ... after which every arm it may play is backed off: it rests (round 3, in the resume test below)
    assert not any("resting" in row for row in rounds)
    # and the server heard why in one line each, not a traceback
    failed = [line for line in run.warnings if "failed" in line]
    assert failed == [f"llmprune.fedrecover.transport: round {r}: client 2 failed: MemoryError: out of memory: "
                      f"training needed {line.split('needed ')[1].split(' MB')[0]} MB at step 1, the device has 1 MB"
                      for r, line in zip((1, 2), failed)]
    assert not any("Traceback" in line or line.startswith("flwr") for line in run.warnings), run.warnings
    # the reward reads the global model: the server's loss (ln perplexity) before and after each round
    from llmprune.fedrecover import state_dir_for

    saved = json.loads((state_dir_for(run.out) / "state.json").read_text())["policy"]
    losses = [math.log(row["eval_perplexity"]) for row in rounds]
    before = [saved["losses"][0], *losses[:-1]]
    assert saved["losses"] == pytest.approx([before[0], *losses], abs=1e-12)
    for row, was, now in zip(rounds, before, losses):
        shares = [c["reward"]["share"] for c in row["clients"]]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5) and all(0 < x < 1 for x in shares)
        for c in row["clients"]:
            reward = c["reward"]
            assert c["arm"] in {"0.34x1", "0.34x4", "1x1", "1x4"} and reward["failed"] == ""
            assert reward["gain"] == pytest.approx(was - now, abs=1e-5)
            # credit by leave-one-out (as this run asks): what the server's loss would have been without it
            assert reward["attribution"] == "leave-one-out" and math.isfinite(reward["credit"])
            assert -1.0 <= reward["reward"] <= 1.0
        assert row["policy_seconds"] > 0      # the server's leave-one-out evaluations are timed
    assert rounds[1]["clients"][0]["reward"]["baseline"] == pytest.approx(abs(before[0] - losses[0]), abs=1e-5)
    # from priors, a declared device starts at the largest arm its memory admits, not the cheapest
    assert [c["arm"] for c in rounds[0]["clients"]] == ["1x4", "1x4"]
    # a quarter of 3 devices, at least one: no round has two devices away from their best-known arm
    assert all(sum(c["explored"] for c in row["clients"] + row["failures"]) <= 1 for row in rounds)


def test_a_device_missing_from_a_secagg_sum_is_a_failure_of_the_arm_it_played(pruned_ckpt, text_file, tmp_path):
    """SecAgg+ shows the server only the sum: a device whose share is missing still reaches the bandit
    as a failure of the arm it played (reward -1), as a plain round's crash does; the others' rewards
    come from the losses their masked replies carry."""
    from .conftest import run_recover

    fleet = write_fleet(tmp_path, [{"name": name, "memory_mb": 1e6} for name in ("a", "b", "c")])
    run = run_recover(pruned_ckpt, [text_file], tmp_path / "out", fleet=fleet, secagg=True, inject_faults="crash:2",
                      **{**BANDIT, "rounds": 1})
    row = run.metrics["rounds"][0]
    (failure,) = row["failures"]
    assert failure["partition-id"] == 2 and failure["failed"] == "dropped"
    assert failure["arm"] and failure["reward"]["reward"] == -1.0 and failure["reward"]["failed"] == "dropped"
    assert len(row["clients"]) == 2
    for c in row["clients"]:        # the two that returned share the global model's gain by holdings: the
        # server sees only the sum, so it cannot leave one update out
        assert c["reward"]["failed"] == "" and c["reward"]["share"] == pytest.approx(0.5, abs=0.1)
        assert c["reward"]["attribution"] == "holdings"


def test_an_emulated_device_sleeps_for_its_speed_and_fails_past_its_true_memory():
    import time

    from llmprune.fedrecover.device import EMULATED_RUNTIME_MB, DeviceEmulation
    from llmprune.memory import reset_peak_rss, window_peak_rss_mb

    half = DeviceEmulation(speed=0.5)
    start = time.perf_counter()
    half.after_step(0, 0.2)                     # a 0.2 s step on a half-speed device takes 0.2 s more
    assert 0.19 <= time.perf_counter() - start < 1.0
    reset_peak_rss()
    used = window_peak_rss_mb() + EMULATED_RUNTIME_MB
    DeviceEmulation(oom_mb=used + 10_000).after_step(0, 0.0)      # within its memory: nothing happens
    with pytest.raises(MemoryError, match="out of memory: training needed .* MB at step 3, the device has 5 MB"):
        DeviceEmulation(oom_mb=5).after_step(2, 0.0)


def test_the_bandit_state_is_saved_with_the_round_and_resume_continues_it(bandit_run, pruned_ckpt, text_file,
                                                                          tmp_path):
    """The 2-round run's saved bandits, continued by --resume for a third round (on a copy)."""
    from llmprune.fedrecover import state_dir_for

    from .conftest import run_recover

    ref, fleet, _ = bandit_run
    two = json.loads((state_dir_for(ref.out) / "state.json").read_text())
    assert two["policy"]["baseline"] > 0 and len(two["policy"]["losses"]) == 3
    assert set(two["policy"]["bandits"]) == {"0", "1", "2"}
    # 2 rounds, every device sampled and played (the ghost's two plays both failed)
    assert {k: sum(b["plays"]) for k, b in two["policy"]["bandits"].items()} == {"0": 2, "1": 2, "2": 2}
    out = tmp_path / "recovered"
    copy_run(ref, out)
    with pytest.raises(LLMPruneError, match=r"holds the model of the run being resumed.* pass --resume --overwrite"):
        run_recover(pruned_ckpt, [text_file], out, fleet=fleet, **{**BANDIT, "rounds": 3}, resume=True)
    got = run_recover(pruned_ckpt, [text_file], out, fleet=fleet, **{**BANDIT, "rounds": 3}, resume=True,
                      overwrite=True)
    three = json.loads((state_dir_for(out) / "state.json").read_text())
    assert len(got.metrics["rounds"]) == 3
    # round 3 continued the saved bandits: each device has one more play than after round 2, not one in total,
    # and the ghost rests: every arm it may play is backed off (0.34 until round 5, 1 until round 4)
    for key, bandit in two["policy"]["bandits"].items():
        assert sum(three["policy"]["bandits"][key]["plays"]) == sum(bandit["plays"]) + (key != "2")
    assert got.metrics["rounds"][2]["resting"] == ["ghost"]
    # the rounds before the resume are kept as they were
    assert got.metrics["rounds"][:2] == two["rounds"]


def corrupt_policy_state(out, change) -> None:
    """Edit the policy state the last round file carries (the one --resume reads)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from llmprune.fedrecover import state_dir_for
    from llmprune.fedrecover.state import POLICY_KEY

    folder = state_dir_for(out)
    path = folder / f"round-{json.loads((folder / 'state.json').read_text())['round']:03d}.safetensors"
    with safe_open(str(path), "np") as f:
        policy = json.loads(f.metadata()[POLICY_KEY])
    change(policy)
    save_file(load_file(str(path)), str(path), metadata={POLICY_KEY: json.dumps(policy)})


def _set(path: str, value):
    def change(policy: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            policy = policy[key]
        policy[last] = value
    return change


@pytest.mark.parametrize("change, named", [
    (_set("bandits.0.plays", "many"), "'bandits.0.plays' is not a list"),
    (_set("bandits.1.sums", [0.1, float("nan")]), "'bandits.1.sums[1]' is a number, not a finite number"),
    (_set("bandits.0.arms", [[0.5, 1], [1, 4]]), "'bandits.0.arms' is not this run's arm grid"),
    (_set("bandits.2.ceiling", 9), "'bandits.2' has arms, counts or a ceiling outside the grid"),
    (_set("bandits.0.plays", [1]), "'bandits.0' does not hold one entry per arm"),
    (lambda policy: policy["bandits"].update({"7": policy["bandits"]["0"]}), "'bandits' are for clients"),
    (_set("schedule.staleness", [0, -1, 0]), "'schedule' is inconsistent"),
    (_set("schedule.importance", [0.1]), "'schedule' is for 1 units"),
    (lambda policy: policy.pop("baseline"), "has no 'baseline'"),
    (_set("losses", [1.0, None]), "'losses[1]' is null, not a finite number"),
    (lambda policy: policy.clear(), "the saved bandit state: is missing"),
])
def test_a_corrupted_bandit_state_is_refused_before_anything_starts(bandit_run, pruned_ckpt, text_file, tmp_path,
                                                                    change, named):
    from .conftest import run_recover

    ref, fleet, _ = bandit_run
    out = tmp_path / "recovered"
    copy_run(ref, out)
    corrupt_policy_state(out, change)
    with pytest.raises(LLMPruneError) as err:
        run_recover(pruned_ckpt, [text_file], out, fleet=fleet, **{**BANDIT, "rounds": 3}, resume=True,
                    overwrite=True)
    message = str(err.value)
    assert "is unreadable (the saved bandit state: " in message and named in message, message
    assert "--overwrite" in message and "\n" not in message
    assert (out / "adapter_model.safetensors").exists() or any(out.iterdir())   # nothing replaced


# ---------------------------------------------------------------- DevFT in a simulation
# DevFT as published (copy hand-over) at the old damping: the run pinned before the reshaping; the
# defaults (beta 1, split hand-over) are tested on their own in test_devft.py
DEVFT = dict(clients=2, rounds=3, policy="devft", devft_stages="1,2,all", devft_beta=0.2, devft_handover="copy",
             aggregation="hetlora", **LEAN)


@pytest.fixture(scope="module")
def devft_run(pruned_ckpt, text_file, tmp_path_factory):
    from .conftest import run_recover

    return run_recover(pruned_ckpt, [text_file], tmp_path_factory.mktemp("devft") / "out", **DEVFT)


def test_devft_stages_grow_and_hand_the_lora_to_group_members(devft_run):
    from safetensors.numpy import load_file

    from llmprune.fedrecover import state_dir_for
    from llmprune.fedrecover.devft import Stage

    run = devft_run
    m = run.metrics
    stages = [Stage.from_json(json.dumps(s)) for s in m["submodels"]["stages"]]
    assert [len(s.anchors) for s in stages] == [1, 2, 3]
    held = [sorted({tuple(c["submodel"]["layers"]) for c in r["clients"]}) for r in m["rounds"]]
    assert held == [[stages[0].anchors], [stages[1].anchors], [(0, 1, 2)]]
    up = [r["bytes_up"] for r in m["rounds"]]
    assert up[0] < up[1] < up[2]      # a stage uploads only its anchors' LoRA
    state = state_dir_for(run.out)
    r1, r2 = (load_file(str(state / f"round-00{i}.safetensors")) for i in (1, 2))
    a0 = stages[0].anchors[0]
    # round 2 started from round 1's anchor spread over every layer; a layer that is no stage-2 anchor kept that copy
    for layer in set(range(3)) - set(stages[1].anchors):
        for key in (k for k in r1 if k.startswith(f"{a0}.")):
            assert np.array_equal(r2[f"{layer}.{key.split('.', 1)[1]}"], r1[key])
    assert all(isinstance(r["eval_perplexity"], float) for r in m["rounds"])


@pytest.mark.parametrize("change, named", [
    (_set("stages", ["not a stage"]), "'stages[0]' is not a stage description"),
    (_set("stages", "1,2,all"), "'stages' is not a list"),
])
def test_a_corrupted_devft_state_is_refused_before_anything_starts(devft_run, pruned_ckpt, text_file, tmp_path,
                                                                   change, named):
    from .conftest import run_recover

    out = tmp_path / "out"
    copy_run(devft_run, out)
    corrupt_policy_state(out, change)
    with pytest.raises(LLMPruneError, match="the saved devft state: ") as err:
        run_recover(pruned_ckpt, [text_file], out, **DEVFT, resume=True, overwrite=True)
    assert named in str(err.value)


def test_devft_resumes_across_a_stage_change_exactly(devft_run, pruned_ckpt, text_file, tmp_path):
    import shutil

    from .conftest import run_recover

    out = tmp_path / "out"
    copy_run(devft_run, out)
    cut_back_to(out, 1)        # interrupted after stage 1: round 2 starts the next stage from the saved state
    got = run_recover(pruned_ckpt, [text_file], out, **DEVFT, resume=True)
    assert_resumed_equal(devft_run, got)
    shutil.rmtree(out)
    with pytest.raises(LLMPruneError, match=r"settings differ from the saved run \(--rounds\)"):
        run_recover(pruned_ckpt, [text_file], out, **{**DEVFT, "rounds": 4}, resume=True)


# ---------------------------------------------------------------- prune-tune in a simulation
@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    from llmprune.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("dense") / "tiny", "llama")


@pytest.fixture(scope="module")
def prune_tune_run(dense_ckpt, text_file, tmp_path_factory):
    from .conftest import run_recover

    return run_recover(dense_ckpt, [text_file], tmp_path_factory.mktemp("prune-tune") / "out",
                       **prune_tune_settings(text_file))


def prune_tune_settings(text_file) -> dict:
    return dict(clients=2, rounds=2, policy="prune-tune", target_ratio=0.3, prune_every=1, eval_data=str(text_file))


def test_prune_tune_reprunes_between_rounds_and_ends_at_the_target(prune_tune_run, dense_ckpt):
    import llmprune
    from llmprune.fedrecover import state_dir_for
    from llmprune.fedrecover.prune_tune import current_ratio

    run = prune_tune_run
    steps = run.metrics["prune_tune"]["steps"]
    assert [s["before_round"] for s in steps] == [1, 2]
    assert [s["ratio_target"] for s in steps] == pytest.approx([0.15, 0.3])
    assert steps[-1]["ratio_achieved"] == pytest.approx(0.3, abs=0.02)
    assert [bool(r.get("prune")) for r in run.metrics["rounds"]] == [True, True]
    assert (state_dir_for(run.out) / "pruned-r002" / "config.json").is_file()
    model, _ = llmprune.load(str(run.out))
    dense, _ = llmprune.load(str(dense_ckpt))
    assert current_ratio(model, run.metrics["prune_tune"]["dense_decoder_params"]) == pytest.approx(
        steps[-1]["ratio_achieved"], abs=1e-9)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())


def test_prune_tune_resumes_on_the_repruned_checkpoint(prune_tune_run, dense_ckpt, text_file, tmp_path):
    from .conftest import run_recover

    out = tmp_path / "out"
    copy_run(prune_tune_run, out)
    cut_back_to(out, 1)        # the step before round 2 is redone from the round-1 state and pruned-r001
    got = run_recover(dense_ckpt, [text_file], out, **prune_tune_settings(text_file), resume=True)
    assert_resumed_equal(prune_tune_run, got)


def test_a_target_below_the_checkpoint_ratio_is_refused_before_anything_starts(pruned_ckpt, text_file, tmp_path):
    from .conftest import run_recover

    with pytest.raises(LLMPruneError, match="below the checkpoint's ratio"):
        run_recover(pruned_ckpt, [text_file], tmp_path / "out", policy="prune-tune", target_ratio=0.05,
                    eval_data=str(text_file))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.rounds").exists()


@pytest.mark.parametrize("schedule, message", [("2,1", "does not grow"), ("1,5", "exceeds")])
def test_a_schedule_that_does_not_fit_the_model_is_refused_before_anything_starts(pruned_ckpt, text_file, tmp_path,
                                                                                  schedule, message):
    from .conftest import run_recover

    with pytest.raises(LLMPruneError, match=message):
        run_recover(pruned_ckpt, [text_file], tmp_path / "out", rounds=3, policy="devft", devft_stages=schedule)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.rounds").exists()


def test_devft_gives_what_it_gave_before_the_reshaping(devft_run):
    from .conftest import assert_pinned

    assert_pinned(devft_run, "devft")


def test_prune_tune_gives_what_it_gave_before_the_reshaping(prune_tune_run):
    from .conftest import assert_pinned

    assert_pinned(prune_tune_run, "prune_tune")


def test_a_bandit_of_one_rank_below_lora_rank_runs_under_fedavg(tmp_path, pruned_ckpt):
    """Its devices play only that rank, so the plan is of one rank, which fedavg takes."""
    from llmprune.fedrecover.preflight import check_plan

    fleet = write_fleet(tmp_path, [{"name": "big", "memory_mb": 1e6}, {"name": "small", "memory_mb": 1e6}])
    cfg = RecoverConfig.of(fleet=fleet, policy="bandit", aggregation="fedavg", arm_ranks="2", lora_rank=4,
                           batch_size=2, seq_len=32, clients=2, **LEAN)
    assert {p["rank"] for p in check_plan(str(pruned_ckpt), cfg)} == {2}
