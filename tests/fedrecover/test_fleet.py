"""Device fleets: TOML/JSON files, count expansion, the memory estimate, and the rank/depth each
device gets from its budget."""

from __future__ import annotations

import json
import re

import pytest

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.fedrecover import TARGET_MODULES, Device, assign_devices, load_fleet, training_memory_mb
from llmprune.fedrecover.fleet import candidate_ranks

BATCH, SEQ = 2, 32


@pytest.fixture(scope="module")
def model(pruned_ckpt):
    return llmprune.load_model(pruned_ckpt)


def estimate(model, rank, depth, batch=BATCH, seq=SEQ):
    return training_memory_mb(model, rank, depth, batch, seq, TARGET_MODULES)[0]


def test_toml_fleet_with_counts_speed_and_fixed_choices(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[[device]]\nname = "pixel"\nmemory_mb = 3000\nspeed = 0.5\ncount = 2\n\n'
                    '[[device]]\nname = "laptop"\nmemory_mb = 8000\nrank = 8\ndepth = 2\n\n'
                    '[[device]]\nmemory_mb = 500\n')
    devices = load_fleet(path)
    assert devices == [Device("pixel-1", 3000.0, 0.5), Device("pixel-2", 3000.0, 0.5),
                       Device("laptop", 8000.0, 1.0, 8, 2), Device("device-3", 500.0, 1.0)]


def test_memory_may_be_undeclared_and_a_true_limit_given_for_emulation(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[[device]]\nname = "ghost"\n\n[[device]]\nname = "watch"\nmemory_mb = 900\noom_mb = 1024\n')
    assert load_fleet(path) == [Device("ghost", None), Device("watch", 900.0, oom_mb=1024.0)]


@pytest.mark.parametrize("layout", ["devices", "list"])
def test_json_fleet(tmp_path, layout):
    rows = [{"name": "watch", "memory_mb": 450, "count": 3}, {"name": "phone", "memory_mb": 2048.5, "speed": 2}]
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"devices": rows} if layout == "devices" else rows))
    devices = load_fleet(path)
    assert [d.name for d in devices] == ["watch-1", "watch-2", "watch-3", "phone"]
    assert devices[-1] == Device("phone", 2048.5, 2.0)


@pytest.mark.parametrize("name, text, message", [
    ("missing.toml", None, "cannot read fleet file"),
    ("bad.toml", "[[device]\nmemory_mb = 1", "is not valid TOML"),
    ("bad.json", "{devices: [}", "is not valid JSON"),
    ("empty.toml", "title = 'x'\n", "lists no devices"),
    ("notable.json", '[3]', "device 1 is not a table"),
    ("oom.json", '[{"name": "a", "oom_mb": -5}]', "device 'a' has oom_mb = -5 — give oom_mb as a number above 0"),
    ("text.json", '[{"name": "a", "memory_mb": "lots"}]', "device 'a' has memory_mb = 'lots'"),
    ("neg.json", '[{"name": "a", "memory_mb": 100, "count": 0}]', "device 'a' has count = 0"),
    # numbers that would take the machine down, or are not numbers at all
    ("huge-count.json", '[{"name": "a", "memory_mb": 100, "count": 1000000000}]', "device 'a' has count = 1000000000"),
    ("fast.json", '[{"name": "a", "memory_mb": 100, "speed": 1e9}]', "device 'a' has speed = 1000000000.0"),
    ("nan.toml", '[[device]]\nname = "a"\nmemory_mb = 100\nspeed = nan\n', "device 'a' has speed = nan"),
    ("inf.toml", '[[device]]\nname = "a"\nmemory_mb = inf\n', "device 'a' has memory_mb = inf"),
    ("string.json", '[{"name": "a", "memory_mb": "2000"}]', "device 'a' has memory_mb = '2000'"),
    ("bool.json", '[{"name": "a", "memory_mb": true}]', "device 'a' has memory_mb = True"),
    ("twice.json", '[{"name": "a", "memory_mb": 100}, {"name": "a", "memory_mb": 200}]', "two devices are named 'a'"),
    ("noname.json", '[{"name": 7, "memory_mb": 100}]', "device 1 has name = 7"),
    ("half.json", '[{"name": "a", "memory_mb": 100, "count": 1.5}]', "device 'a' has count = 1.5"),
    ("halftoml.toml", '[[device]]\nname = "a"\nmemory_mb = 100\ncount = 2.0\n', "device 'a' has count = 2.0"),
    ("slow.json", '[{"name": "a", "memory_mb": 100, "speed": -1}]', "device 'a' has speed = -1"),
    # a misspelt key is refused, naming it and the known keys, not silently ignored
    ("typo.toml", '[[device]]\nname = "a"\nmemory_mb = 100\nsped = 0.5\n',
     "device 'a' has unknown key 'sped' — the keys of a device are name, memory_mb, speed, count, rank, depth"),
    ("rank-neg.toml", '[[device]]\nname = "a"\nmemory_mb = 100\nrank = -4\n', "device 'a' has rank = -4"),
    ("rank-str.toml", '[[device]]\nname = "a"\nmemory_mb = 100\nrank = "big"\n', "device 'a' has rank = 'big'"),
    ("rank-float.json", '[{"name": "a", "memory_mb": 100, "rank": 2.5}]', "device 'a' has rank = 2.5"),
    ("depth-neg.toml", '[[device]]\nname = "a"\nmemory_mb = 100\ndepth = -4\n', "device 'a' has depth = -4"),
    ("depth-str.toml", '[[device]]\nname = "a"\nmemory_mb = 100\ndepth = "big"\n', "device 'a' has depth = 'big'"),
    ("depth-bool.json", '[{"name": "a", "memory_mb": 100, "depth": true}]', "device 'a' has depth = True"),
])
def test_bad_fleet_files_give_one_line_errors(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(LLMPruneError) as err:
        load_fleet(path)
    line = str(err.value)
    assert message in line and str(path) in line
    assert "\n" not in line and " — " in line


def test_memory_estimate_grows_with_rank_depth_batch_and_seq_len(model):
    base = estimate(model, 2, 1)
    assert estimate(model, 4, 1) > base
    assert estimate(model, 2, 2) > base and estimate(model, 2, 3) > estimate(model, 2, 2)
    assert estimate(model, 2, 1, batch=4) > base
    assert estimate(model, 2, 1, seq=64) > base
    # the floor: weights + runtime, so even the smallest setup is above the model's size
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert base > weights_mb
    mb, params = training_memory_mb(model, 2, 1, BATCH, SEQ, TARGET_MODULES)
    layer = model.model.layers[-1]
    linears = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
              [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    assert params == sum(2 * (l.in_features + l.out_features) for l in linears)


def test_candidate_ranks():
    assert candidate_ranks(8) == [8, 4, 2, 1]
    assert candidate_ranks(6) == [6, 4, 2, 1]
    assert candidate_ranks(1) == [1]


def test_assignment_fits_each_budget_and_more_memory_never_gets_less(model):
    low, high = estimate(model, 1, 1), estimate(model, 8, 3)
    budgets = [low + (high - low) * k / 12 for k in range(13)] + [high * 2]
    plans = assign_devices(model, [Device(f"d{k}", b) for k, b in enumerate(budgets)], 8, BATCH, SEQ, TARGET_MODULES)
    previous = 0
    for budget, plan in zip(budgets, plans):
        assert plan.rank in (1, 2, 4, 8) and 1 <= plan.depth <= 3
        assert plan.estimate_mb <= budget + 0.05
        assert plan.estimate_mb == pytest.approx(estimate(model, plan.rank, plan.depth), abs=0.05)
        assert plan.lora_params >= previous, "a larger budget got a smaller setup"
        previous = plan.lora_params
    assert (plans[0].rank, plans[0].depth) == (1, 1)
    assert (plans[-1].rank, plans[-1].depth) == (8, 3)
    assert len({(p.rank, p.depth) for p in plans}) > 3


def test_fixed_rank_and_depth_are_kept_and_depth_is_capped(model):
    plans = assign_devices(model, [Device("fixed", 1e6, 1.0, rank=2, depth=1),
                                   Device("deep", 1e6, 1.0, rank=4, depth=99)], 8, BATCH, SEQ, TARGET_MODULES)
    assert [(p.rank, p.depth) for p in plans] == [(2, 1), (4, 3)]
    assert plans[0].to_dict()["device"] == "fixed" and plans[0].memory_mb == 1e6


def test_impossible_budget_names_the_device_and_the_smallest_budget_that_fits(model):
    devices = [Device("phone", 1e6), Device("old-watch", 50.0)]
    with pytest.raises(LLMPruneError) as err:
        assign_devices(model, devices, 8, BATCH, SEQ, TARGET_MODULES)
    line = str(err.value)
    assert "'old-watch' has 50 MB" in line and "\n" not in line
    need = int(re.search(r"at least (\d+)", line).group(1))
    assert need == pytest.approx(estimate(model, 1, 1), abs=1)
    # the budget the message names does fit, and nothing smaller by a megabyte does
    plan = assign_devices(model, [Device("old-watch", need)], 8, BATCH, SEQ, TARGET_MODULES)[0]
    assert plan.estimate_mb <= need
    with pytest.raises(LLMPruneError):
        assign_devices(model, [Device("old-watch", need - 1)], 8, BATCH, SEQ, TARGET_MODULES)


def test_impossible_fixed_setup_names_its_own_smallest_budget(model):
    """A device with a fixed rank/depth too big for it: the budget named is that setup's."""
    with pytest.raises(LLMPruneError) as err:
        assign_devices(model, [Device("tablet", estimate(model, 1, 1) + 1, 1.0, rank=8, depth=3)], 8, BATCH, SEQ,
                       TARGET_MODULES)
    need = int(re.search(r"at least (\d+)", str(err.value)).group(1))
    assert "'tablet'" in str(err.value) and "rank 8, 3 layer" in str(err.value)
    assert need == pytest.approx(estimate(model, 8, 3), abs=1)
