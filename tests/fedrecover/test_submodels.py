"""Submodels (FedPruner): the Submodel description, the memory model that sizes them per device,
the per-round policy, holder-weighted aggregation with missing modules (SecAgg+ included), and
the bad inputs of --submodels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.fedrecover import ClientUpdate, RecoverConfig, aggregate
from llmprune.fedrecover.fleet import (
    Device,
    assign_lean_devices,
    assign_submodels,
    lean_memory_mb,
    submodel_memory_mb,
    unit_costs,
)
from llmprune.fedrecover.secagg import padded_upload, unpack_average, upload_layout
from llmprune.fedrecover.submodels import Submodel

from .test_aggregation import adapter


# ---------------------------------------------------------------- the description
def test_units_layers_and_sublayers():
    sub = Submodel.of_units(4, [0, 3, 5], "sublayer")       # attn 0, mlp 1, mlp 2
    assert (sub.attn, sub.mlp, sub.layers) == ((0,), (1, 2), (0, 1, 2))
    assert sub.units("sublayer") == [0, 3, 5] and not sub.is_full
    assert sub.holds("0.self_attn.q_proj") and not sub.holds("0.mlp.up_proj") and sub.holds("2.mlp.down_proj")
    layer = Submodel.of_units(4, [3, 1], "layer")
    assert (layer.attn, layer.mlp, layer.units("layer")) == ((1, 3), (1, 3), [1, 3])
    assert Submodel.full(3).is_full and Submodel.from_json(sub.to_json()) == sub


def test_names_go_local_and_back():
    sub = Submodel.of_layers(6, [1, 4])
    arrays = {"1.self_attn.q_proj.A": np.ones(1), "4.mlp.up_proj.B": np.zeros(1)}
    local = sub.to_local(arrays)
    assert sorted(local) == ["0.self_attn.q_proj.A", "1.mlp.up_proj.B"]
    assert sub.to_global(local).keys() == arrays.keys()
    with pytest.raises(LLMPruneError, match="not in the submodel"):
        sub.to_local({"2.mlp.up_proj.A": np.ones(1)})


@pytest.mark.parametrize("attn, mlp", [((), ()), ((3,), ()), ((1, 1), ()), ((2, 1), ())])
def test_bad_submodels_are_refused(attn, mlp):
    with pytest.raises(LLMPruneError):
        Submodel(3, attn, mlp)


# ---------------------------------------------------------------- aggregation over holders
@pytest.mark.parametrize("method", ["fedavg", "hetlora"])
def test_secagg_layout_gives_the_holder_weighted_average_with_missing_modules(method):
    """What SecAgg+ computes (the weighted sum of zero-padded uploads with holder flags, divided
    by the summed flags) equals the plain aggregation over holders, and a module nobody held keeps
    its value."""
    modules = ("0.self_attn.q_proj", "1.mlp.down_proj", "2.mlp.up_proj")
    previous = adapter(4, 0, modules=modules)
    ranks = (4, 4) if method == "fedavg" else (4, 2)
    a = adapter(ranks[0], 1, modules=modules[:2])       # holds layers 0 and 1
    b = adapter(ranks[1], 2, modules=modules[1:2])      # holds layer 1 only; nobody holds layer 2
    weights = np.array([3.0, 1.0])
    layout = upload_layout(previous)
    uploads = [padded_upload(x, layout, 4) for x in (a, b)]
    summed = [sum(w * u[i] for w, u in zip(weights / weights.sum(), uploads)) for i in range(len(uploads[0]))]
    secure = unpack_average(summed, layout, previous)
    plain = aggregate(method, [ClientUpdate(a, 3.0), ClientUpdate(b, 1.0)], previous, rank=4)
    for key in previous:
        np.testing.assert_allclose(secure[key], plain[key], rtol=1e-5, atol=1e-6)
    for part in ("A", "B"):
        np.testing.assert_array_equal(secure[f"2.mlp.up_proj.{part}"], previous[f"2.mlp.up_proj.{part}"])
    # layer 0: only `a` held it, so it is a's alone (not scaled by its 3/4 share)
    np.testing.assert_allclose(secure["0.self_attn.q_proj.A"], a["0.self_attn.q_proj.A"], rtol=1e-6)


# ---------------------------------------------------------------- the memory model
@pytest.fixture(scope="module")
def costs(pruned_ckpt):
    from llmprune.fedrecover.planning import meta_model

    cfg = RecoverConfig.of(fleet="x.toml", policy="submodels", batch_size=2, seq_len=32, lora_rank=4,
                           client_dtype="bfloat16", client_embedding="int8")
    return unit_costs(meta_model(str(pruned_ckpt)), cfg)


def test_unit_costs_follow_the_shapes(pruned_ckpt, costs):
    model = llmprune.load_model(pruned_ckpt)
    layers = model.model.layers
    assert len(costs.weights) == len(layers) and costs.layer_of == list(range(len(layers)))
    for i, layer in enumerate(layers):
        assert costs.weights[i] == pytest.approx(2 * sum(p.numel() for p in layer.parameters()))
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert costs.fixed >= vocab * hidden + 4 * vocab   # int8 rows + a float scale each


def test_more_units_and_rank_cost_more_and_lora_only_where_trained(costs):
    one = submodel_memory_mb(costs, 1, 1)[0]
    assert submodel_memory_mb(costs, 2, 1)[0] > one and submodel_memory_mb(costs, 1, 4)[0] > one
    held = [0, 1, 2]
    low = lean_memory_mb(costs, held, [2], 4)          # LoRA on the top layer: no activations below it
    high = lean_memory_mb(costs, held, held, 4)
    assert high[0] > low[0] and high[1] > low[1]


def test_submodels_fit_each_budget_and_more_memory_never_gets_less(costs):
    n = len(costs.weights)
    low, high = submodel_memory_mb(costs, 1, 1)[0], submodel_memory_mb(costs, n, 4)[0]
    budgets = [low + (high - low) * k / 8 for k in range(9)]
    plans = assign_submodels(costs, [Device(f"d{k}", b) for k, b in enumerate(budgets)], 4, False)
    previous = (0, 0)
    for budget, plan in zip(budgets, plans):
        assert plan.estimate_mb <= budget + 0.05 and 1 <= plan.units <= n
        assert (plan.units, plan.rank) >= previous
        previous = (plan.units, plan.rank)
    assert (plans[0].units, plans[0].rank) == (1, 1) and (plans[-1].units, plans[-1].rank) == (n, 4)


def test_a_budget_no_submodel_fits_names_the_device_and_the_budget_that_fits(costs):
    with pytest.raises(LLMPruneError) as err:
        assign_submodels(costs, [Device("big", 1e6), Device("tiny-watch", 100.0)], 4, False)
    line = str(err.value)
    assert "'tiny-watch' has 100 MB" in line and "\n" not in line and "--skip-unfit" in line
    need = int(re.search(r"at least (\d+)", line).group(1))
    assert assign_submodels(costs, [Device("tiny-watch", need)], 4, False)[0].units == 1
    refused = assign_submodels(costs, [Device("tiny-watch", need - 1)], 4, True)[0]
    assert refused.refused.startswith("device 'tiny-watch' has") and f"{need} MB would fit" in refused.refused


def test_lean_full_model_devices_get_rank_and_depth(costs):
    (plan,) = assign_lean_devices(costs, [Device("phone", 1e6)], 4, False)
    assert (plan.rank, plan.depth) == (4, len(costs.weights))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "submodels"}, "--policy submodels needs --fleet"),
    ({"submodel_granularity": "sublayer"}, "it belongs to --policy submodels / bandit"),
    ({"policy": "submodels", "fleet": "f.toml", "submodel_granularity": "block"},
     "--submodel-granularity: 'block' is not one of layer, sublayer"),
])
def test_bad_submodel_options(kwargs, message):
    with pytest.raises(LLMPruneError, match=re.escape(message)):
        RecoverConfig.of(**kwargs)


def test_resume_refuses_submodels_for_a_run_started_without(tmp_path):
    from llmprune.fedrecover.state import RoundState, load_state, save_state

    arrays = {"0.mlp.up_proj.A": np.zeros((2, 3), np.float32), "0.mlp.up_proj.B": np.zeros((4, 2), np.float32)}
    save_state(tmp_path, RoundState(1, arrays, [{"round": 1}]), RecoverConfig.of(fleet="f.toml"), model="m")
    with pytest.raises(LLMPruneError, match=r"settings differ from the saved run \(.*policy.name, "):
        load_state(tmp_path, RecoverConfig.of(fleet="f.toml", policy="submodels"), model="m")
    # a state written before a setting existed counts as written with its default
    meta = json.loads((tmp_path / "state.json").read_text())
    del meta["settings"]["training.lr"]
    (tmp_path / "state.json").write_text(json.dumps(meta))
    assert load_state(tmp_path, RecoverConfig.of(fleet="f.toml"), model="m").round == 1
    with pytest.raises(LLMPruneError, match=r"\(--lr\)"):
        load_state(tmp_path, RecoverConfig.of(fleet="f.toml", lr=1e-3), model="m")


# ---------------------------------------------------------------- the policy
def test_an_overrun_shrinks_the_next_cut_and_the_state_round_trips(pruned_ckpt, costs):
    from types import SimpleNamespace

    from llmprune.fedrecover.grouping import UnitSchedule
    from llmprune.fedrecover.messages import TrainReply
    from llmprune.fedrecover.planning import FleetPlan
    from llmprune.fedrecover.policies import RoundOutcome
    from llmprune.fedrecover.policies.submodels import SubmodelPolicy

    budget = submodel_memory_mb(costs, 2, 1)[0] + 0.01
    devices = {"phone": Device("phone", budget)}
    (plan,) = assign_submodels(costs, list(devices.values()), 4, False)
    assert plan.units == 2
    cfg = RecoverConfig.of(fleet="x.toml", policy="submodels", batch_size=2, seq_len=32, lora_rank=4,
                           client_dtype="bfloat16", client_embedding="int8")

    def policy_with(schedule):
        policy = SubmodelPolicy(cfg)
        policy.run = SimpleNamespace(plan=FleetPlan({7: (0, plan)}, {0: []}, 4, {}, []))
        policy.schedule, policy.unit_costs, policy.devices = schedule, costs, devices
        policy.units = {"phone": plan.units}
        return policy

    policy = policy_with(UnitSchedule([[0, 1, 2]], np.array([0.5, 0.2, 0.3]), "layer"))
    first = policy.assign(1, [7])[7]
    held = first.device_model.held()
    assert held.units("layer") == sorted(held.layers) and len(held.layers) == 2
    assert first.estimate_mb <= budget
    policy.observe(1, RoundOutcome([TrainReply(0, 1, 5.0, 1.0, budget * 1.5)], {}))
    assert policy.correction["phone"] == pytest.approx(budget * 1.5 / first.estimate_mb, rel=1e-3)
    assert policy.units["phone"] == 1           # the next cut shrinks
    second = policy.assign(2, [7])[7]
    assert len(second.device_model.held().layers) == 1 and second.estimate_mb > first.estimate_mb / 2
    # resume: a fresh policy loading the saved state draws exactly what this one does next
    saved = json.loads(json.dumps(policy.state_dict()))
    other = policy_with(UnitSchedule([[0, 1, 2]], np.array([0.5, 0.2, 0.3]), "layer"))
    other.load_state_dict(saved)
    policy.observe(2, RoundOutcome([], {}))
    other.observe(2, RoundOutcome([], {}))
    for rnd in (3, 4, 5):
        assert policy.assign(rnd, [7])[7].device_model == other.assign(rnd, [7])[7].device_model


# ---------------------------------------------------------------- a simulation: three budgets
def budgets_fleet(tmp_path, costs, counts: list[int]) -> str:
    """Devices whose budgets admit exactly `counts` units at rank 1 (the estimate's bound)."""
    n = len(costs.weights)
    rows = []
    for i, count in enumerate(counts):
        mb = 1e6 if count >= n else submodel_memory_mb(costs, count, 1)[0] + 0.01
        rows.append({"name": f"dev{i}", "memory_mb": mb, "rank": 1 if count < n else 4})
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"devices": rows}))
    return str(path)


SUB = dict(clients=3, rounds=2, aggregation="hetlora", policy="submodels", client_dtype="bfloat16",
           client_embedding="int8")


@pytest.fixture(scope="module")
def submodel_run(pruned_ckpt, text_file, costs, tmp_path_factory):
    from .conftest import run_recover

    tmp = tmp_path_factory.mktemp("submodels")
    fleet = budgets_fleet(tmp, costs, [len(costs.weights), 2, 1])
    return run_recover(pruned_ckpt, [text_file], tmp / "recovered", fleet=fleet, **SUB), fleet


def test_the_smallest_device_trains_a_submodel_and_holders_are_averaged(submodel_run, pruned_ckpt):
    from safetensors.numpy import load_file

    from llmprune.fedrecover import state_dir_for

    run, _ = submodel_run
    m = run.metrics
    assert [(d["device"], d["units"]) for d in m["devices"]] == [("dev0", 3), ("dev1", 2), ("dev2", 1)]
    assert m["submodels"]["groups"] == [[0, 1, 2]] and len(m["submodels"]["importance"]) == 3
    state = state_dir_for(run.out)
    previous = load_file(str(state / "round-001.safetensors"))
    for row in m["rounds"]:
        clients = {c["device"]: c for c in row["clients"]}
        assert set(clients) == {"dev0", "dev1", "dev2"}
        assert len(clients["dev2"]["submodel"]["layers"]) == 1 <= len(clients["dev1"]["submodel"]["layers"]) <= 2
        assert clients["dev0"]["submodel"]["layers"] == [0, 1, 2]
        for c in clients.values():
            assert c["model_rss_mb"] > 0 and c["peak_rss_mb"] > c["model_rss_mb"] and c["estimate_mb"] > 0
            assert c["bytes_up"] > 0 and c["bytes_down"] > 0
        # the small devices upload only their layers: less than the full device
        assert clients["dev2"]["bytes_up"] < clients["dev0"]["bytes_up"]
    # round 2: a module only the full device held changed, and modules are exactly what the holders sent:
    # with hetlora, a layer held only by dev0 (rank 4) is dev0's upload; we check the layer nobody else held moved
    r2 = load_file(str(state / "round-002.safetensors"))
    assert any(not np.array_equal(r2[k], previous[k]) for k in r2 if k.endswith(".B"))


def test_resume_with_submodels_equals_the_uninterrupted_run(submodel_run, pruned_ckpt, text_file, tmp_path):
    """The run stopped after round 1 (its round file carries the policy's state after round 1: the
    unit draw's staleness, the devices' cuts) and resumed ends where the uninterrupted run ended."""
    from safetensors.numpy import load_file

    from llmprune.fedrecover import state_dir_for

    from .conftest import copy_run, cut_back_to, run_recover

    ref, fleet = submodel_run
    out = tmp_path / "recovered"
    copy_run(ref, out)
    cut_back_to(out, 1)
    got = run_recover(pruned_ckpt, [text_file], out, fleet=fleet, **SUB, resume=True)
    keys = ("round", "train_loss", "eval_perplexity", "bytes_up", "bytes_down")
    assert [{k: r[k] for k in keys} for r in got.metrics["rounds"]] == [{k: r[k] for k in keys} for r in ref.metrics["rounds"]]
    assert [[c["submodel"] for c in r["clients"]] for r in got.metrics["rounds"]] == \
        [[c["submodel"] for c in r["clients"]] for r in ref.metrics["rounds"]]
    a = load_file(str(state_dir_for(ref.out) / "round-002.safetensors"))
    b = load_file(str(state_dir_for(out) / "round-002.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_sublayer_submodels_run(pruned_ckpt, text_file, tmp_path):
    from llmprune.fedrecover.planning import meta_model

    from .conftest import run_recover

    cfg = RecoverConfig.of(fleet="x.toml", policy="submodels", submodel_granularity="sublayer", batch_size=2,
                           seq_len=32, lora_rank=4, client_dtype="bfloat16", client_embedding="int8")
    costs = unit_costs(meta_model(str(pruned_ckpt)), cfg, "sublayer")
    fleet = budgets_fleet(tmp_path, costs, [len(costs.weights), 3])
    run = run_recover(pruned_ckpt, [text_file], tmp_path / "out", fleet=fleet,
                      **{**SUB, "clients": 2, "rounds": 1, "submodel_granularity": "sublayer"})
    m = run.metrics
    assert [d["units"] for d in m["devices"]] == [6, 3] and len(m["submodels"]["groups"]) == 3
    small = next(c for c in m["rounds"][0]["clients"] if c["device"] == "dev1")["submodel"]
    assert len(small["attn"]) + len(small["mlp"]) == 3
    # the merged model is the pruned model plus the global adapter, as without submodels
    assert (run.out / "metrics.json").is_file()
