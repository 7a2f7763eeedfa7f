"""Federated recovery end to end in Flower's simulation on a tiny pruned model: metrics.json,
the merged checkpoint, client sampling and DP (the shared run), mixed-rank fleets (hetlora,
flexlora), and clients that crash, straggle or exit.

Each `recover()` below is one simulation (10-20 s, mostly ray's start-up); module-scoped
fixtures run each once and several tests read its output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array
from safetensors.numpy import load_file

import llmprune
from llmprune.evaluate import perplexity
from llmprune.fedrecover import METRICS_FILE, TARGET_MODULES, lora_applied, merge_lora, module_shapes, state_dir_for
from llmprune.fedrecover.lora import init_arrays, top_layer_modules
from llmprune.fedrecover.partition import ClientData

from .conftest import DP_CLIP, DP_NOISE, run_recover, varied_text

# What the issue asks every round row to hold.
ROUND_KEYS = {"round", "clients_sampled", "clients_returned", "train_loss", "eval_perplexity", "bytes_up", "bytes_down",
              "seconds"}
SCALE = 2.0          # LoRA alpha / r with the default alpha (2 x rank)
# Four devices of different ranks and depths (fixed in the fleet file, budgets ample).
FLEET = [{"name": "laptop", "memory_mb": 64000, "rank": 4, "depth": 3},
         {"name": "phone", "memory_mb": 64000, "rank": 2, "depth": 2},
         {"name": "watch", "memory_mb": 64000, "rank": 1, "depth": 1},
         {"name": "tablet", "memory_mb": 64000, "rank": 4, "depth": 2}]


def round_arrays(out, rnd: int) -> dict[str, np.ndarray]:
    return load_file(str(state_dir_for(out) / f"round-{rnd:03d}.safetensors"))


def adapter_bytes(shapes, rank: int, depth: int) -> int:
    """What one client of `rank` on the top `depth` layers sends: its float32 A and B as Flower
    serializes them (each array with its small .npy header)."""
    total = 0
    for m in top_layer_modules(shapes, depth):
        out_f, in_f = shapes[m]
        for shape in ((rank, in_f), (out_f, rank)):
            data = len(Array(np.zeros(shape, np.float32)).data)
            assert 0 < data - 4 * shape[0] * shape[1] <= 256
            total += data
    return total


@pytest.fixture(scope="module")
def shapes(pruned_ckpt):
    return module_shapes(llmprune.load_model(pruned_ckpt), TARGET_MODULES)


def fleet_file(tmp_path_factory, devices):
    path = tmp_path_factory.mktemp("fleet") / "fleet.json"
    path.write_text(json.dumps({"devices": devices}))
    return path


@pytest.fixture(scope="module")
def second_domain(tmp_path_factory):
    path = tmp_path_factory.mktemp("domain2") / "other.txt"
    path.write_text(varied_text(1500, seed=5))
    return path


# ---------------------------------------------------------------- FedAvg, sampling, DP (the shared run)


def test_metrics_json_has_what_the_issue_lists(basic_run):
    metrics = json.loads((basic_run.out / METRICS_FILE).read_text())
    assert {k: v for k, v in basic_run.metrics.items() if k != "data"} == metrics
    rows = metrics["rounds"]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert ROUND_KEYS <= set(row), ROUND_KEYS - set(row)
        assert row["clients_sampled"] == 2 and row["clients_returned"] == 2 and row["applied"] is True  # fraction 0.67 of 3
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
        assert math.isfinite(row["eval_perplexity"]) and row["eval_perplexity"] > 1
        assert row["seconds"] > 0 and len(row["client_seconds"]) == 2
        # per device: what it trained, its measured peak and the part of it the model added
        assert len(row["clients"]) == 2 and [c["partition-id"] for c in row["clients"]] == \
            sorted(c["partition-id"] for c in row["clients"])
        for c in row["clients"]:
            assert c["rank"] == 4 and c["depth"] == 3 and c["submodel"] is None and c["bytes_up"] > 0
            assert 0 < c["model_rss_mb"] < c["peak_rss_mb"] and c["estimate_mb"] > 0
    assert metrics["refused"] == [] and metrics["submodels"] is None
    assert [d["partition-id"] for d in metrics["devices"]] == [0, 1, 2]
    for d in metrics["devices"]:
        assert {"device", "rank", "depth", "estimate_mb", "lora_params", "examples", "modules"} <= set(d)
        assert d["rank"] == 4 and d["depth"] == 3 and d["modules"] == 21 and d["estimate_mb"] > 0
    assert [d["examples"] for d in metrics["devices"]] == [c["windows"] for c in basic_run.metrics["data"]["clients"]]
    assert metrics["aggregation"] == "fedavg" and metrics["final_eval_perplexity"] == rows[-1]["eval_perplexity"]
    assert metrics["config"]["fleet.fraction"] == 0.67 and metrics["config"]["fleet.clients"] == 3


def test_bytes_are_the_adapters_that_travelled(basic_run, shapes):
    one = adapter_bytes(shapes, 4, 3)
    metrics = basic_run.metrics
    assert metrics["adapter_bytes"] == sum(4 * 4 * (o + i) for o, i in shapes.values())   # raw float32
    for row in metrics["rounds"]:
        assert row["bytes_up"] == row["bytes_down"] == 2 * one
        assert row["bytes_up_per_client_max"] == one
    assert one < 0.1 * metrics["model_bytes"]


def test_merged_checkpoint_is_the_pruned_model_plus_the_final_adapter(basic_run, pruned_ckpt):
    final = round_arrays(basic_run.out, 2)
    expected = merge_lora(llmprune.load_model(pruned_ckpt), final, SCALE).state_dict()
    got = llmprune.load_model(basic_run.out).state_dict()
    assert got.keys() == expected.keys()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    # the rounds changed the adapter: B is not zero any more
    assert any(v.any() for k, v in final.items() if k.endswith(".B"))


def test_eval_perplexity_is_the_global_adapter_on_the_held_out_windows(basic_run, pruned_ckpt):
    windows = ClientData.load(state_dir_for(basic_run.out) / "partitions.npz").eval_windows
    assert windows.shape == (4, 33)
    model = llmprune.load_model(pruned_ckpt)
    for row in basic_run.metrics["rounds"]:
        with lora_applied(model, round_arrays(basic_run.out, row["round"]), SCALE):
            ppl = perplexity(model, windows, progress=False).perplexity
        assert ppl == pytest.approx(row["eval_perplexity"], rel=1e-4)
    merged = perplexity(llmprune.load_model(basic_run.out), windows, progress=False).perplexity
    assert merged == pytest.approx(basic_run.metrics["final_eval_perplexity"], rel=1e-4)
    assert basic_run.metrics["initial_eval_perplexity"] == pytest.approx(
        perplexity(model, windows, progress=False).perplexity, rel=1e-4)


# ---------------------------------------------------------------- hetlora, mixed fleet, a crash and a straggler


DELAY = 3.0         # the tablet's injected delay: a slow client, not a lost one


@pytest.fixture(scope="module")
def hetlora_run(pruned_ckpt, text_file, second_domain, tmp_path_factory):
    """4 devices of ranks 4/2/1/4 and depths 3/2/1/2, one domain per client; the laptop crashes
    and the tablet is slow. No round timeout (the simulation's default): the test does not depend
    on how fast a busy machine is."""
    out = tmp_path_factory.mktemp("hetlora") / "recovered"
    return run_recover(pruned_ckpt, [text_file, second_domain], out, clients=4, aggregation="hetlora",
                       partition="domain", fleet=str(fleet_file(tmp_path_factory, FLEET)),
                       inject_faults=f"crash:0,delay:3:{DELAY}")


def test_fleet_devices_get_their_ranks_and_depths(hetlora_run, text_file, second_domain):
    devices = hetlora_run.metrics["devices"]
    assert [(d["device"], d["rank"], d["depth"], d["modules"]) for d in devices] == \
        [("laptop", 4, 3, 21), ("phone", 2, 2, 14), ("watch", 1, 1, 7), ("tablet", 4, 2, 14)]
    assert all(d["memory_mb"] == 64000 and 0 < d["estimate_mb"] <= 64000 for d in devices)
    domains = [list(c["domains"]) for c in hetlora_run.metrics["data"]["clients"]]
    assert domains == [[str(text_file)], [str(second_domain)], [str(text_file)], [str(second_domain)]]


def test_a_crashing_client_does_not_stop_the_round_and_a_slow_one_is_waited_for(hetlora_run, shapes):
    (row,) = hetlora_run.metrics["rounds"]
    assert (row["clients_sampled"], row["clients_returned"], row["applied"]) == (4, 3, True)
    assert row["bytes_down"] == sum(adapter_bytes(shapes, d["rank"], d["depth"]) for d in FLEET)
    # the laptop crashed; the phone, the watch and the slow tablet count
    assert row["bytes_up"] == sum(adapter_bytes(shapes, d["rank"], d["depth"]) for d in FLEET[1:])
    assert row["seconds"] >= DELAY


def test_hetlora_averages_each_layer_over_the_clients_that_hold_it(hetlora_run, shapes):
    got = round_arrays(hetlora_run.out, 1)
    init = init_arrays(shapes, list(shapes), 4, seed=0)
    assert got.keys() == init.keys()
    for name, (out_f, in_f) in shapes.items():
        layer = int(name.split(".")[0])
        a, b = got[f"{name}.A"], got[f"{name}.B"]
        assert a.shape == (4, in_f) and b.shape == (out_f, 4)              # the global rank
        if layer == 0:   # only the crashed laptop holds layer 0: unchanged
            np.testing.assert_array_equal(a, init[f"{name}.A"])
            np.testing.assert_array_equal(b, init[f"{name}.B"])
        else:            # held by the phone (rank 2), the tablet (rank 4) and on layer 2 the watch (rank 1)
            assert b[:, :2].any() and b[:, 2:].any()   # rows above rank 2: the tablet's alone
            assert a[2:].any()


def test_a_run_in_which_no_round_was_applied_writes_no_model(pruned_ckpt, text_file, tmp_path):
    """Every client crashes in every round: the adapter never changes, so no "recovered" model
    (the input model) is written; one line says so, and the rounds stay for inspection."""
    from llmprune.errors import LLMPruneError

    out = tmp_path / "recovered"
    with pytest.raises(LLMPruneError) as err:
        run_recover(pruned_ckpt, [text_file], out, inject_faults="crash:0,crash:1")
    line = str(err.value)
    assert "no round was applied (clients returned per round: 0/2), so no recovered model was written" in line
    assert "\n" not in line and " — " in line
    assert not out.exists() and not list(tmp_path.glob(".recovered.*"))
    rows = json.loads((state_dir_for(out) / "state.json").read_text())["rounds"]
    assert [(r["clients_returned"], r["applied"]) for r in rows] == [(0, False)]


def test_merged_model_of_a_hetlora_run(hetlora_run, pruned_ckpt):
    expected = merge_lora(llmprune.load_model(pruned_ckpt), round_arrays(hetlora_run.out, 1), SCALE).state_dict()
    got = llmprune.load_model(hetlora_run.out).state_dict()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []


# ---------------------------------------------------------------- flexlora, a client that exits


@pytest.fixture(scope="module")
def flexlora_run(pruned_ckpt, text_file, second_domain, tmp_path_factory):
    """Laptop, phone and watch with flexlora, Dirichlet partitions, 2 rounds; the phone's process
    exits in round 1."""
    out = tmp_path_factory.mktemp("flexlora") / "recovered"
    return run_recover(pruned_ckpt, [text_file, second_domain], out, clients=3, rounds=2, aggregation="flexlora",
                       partition="dirichlet:1.0", fleet=str(fleet_file(tmp_path_factory, FLEET[:3])),
                       inject_faults="exit:1@1")


def test_an_exiting_client_does_not_stop_the_round_and_comes_back(flexlora_run, shapes):
    r1, r2 = flexlora_run.metrics["rounds"]
    assert (r1["clients_sampled"], r1["clients_returned"], r1["applied"]) == (3, 2, True)
    assert r1["bytes_up"] == adapter_bytes(shapes, 4, 3) + adapter_bytes(shapes, 1, 1)
    # its process was restarted: every client answers round 2
    assert (r2["clients_sampled"], r2["clients_returned"], r2["applied"]) == (3, 3, True)
    assert r2["bytes_up"] == r2["bytes_down"] == sum(adapter_bytes(shapes, d["rank"], d["depth"]) for d in FLEET[:3])


def test_flexlora_keeps_the_average_product_of_the_holders(flexlora_run, shapes):
    """The global factors are the concatenated uploads of the clients holding each layer."""
    rank_of = {1: {0: 4, 1: 4, 2: 4 + 1}, 2: {0: 4, 1: 4 + 2, 2: 4 + 2 + 1}}   # round -> layer -> summed ranks
    for rnd in (1, 2):
        got = round_arrays(flexlora_run.out, rnd)
        for name, (out_f, in_f) in shapes.items():
            r = rank_of[rnd][int(name.split(".")[0])]
            assert got[f"{name}.A"].shape == (r, in_f) and got[f"{name}.B"].shape == (out_f, r), (rnd, name)


def test_merged_model_of_a_flexlora_run(flexlora_run, pruned_ckpt):
    final = round_arrays(flexlora_run.out, 2)
    model = llmprune.load_model(pruned_ckpt)
    expected = merge_lora(model, final, SCALE).state_dict()
    got = llmprune.load_model(flexlora_run.out).state_dict()
    assert [k for k in got if not torch.equal(got[k], expected[k])] == []
    assert flexlora_run.metrics["aggregation"] == "flexlora"
    assert [d["rank"] for d in flexlora_run.metrics["devices"]] == [4, 2, 1]


# ---------------------------------------------------------------- DP (the shared run)


def test_dp_clips_the_updates_and_adds_noise_of_the_right_scale(basic_run, shapes):
    """Each round moves the global adapter by the average of the clipped updates (norm <= CLIP)
    plus Gaussian noise of std NOISE x CLIP / sampled clients. Unclipped, two LoRA steps would
    move it by ~3e-2, far more than the noise (~5e-3); without noise it would move by <= CLIP."""
    previous = init_arrays(shapes, list(shapes), 4, seed=0)
    std = DP_NOISE * DP_CLIP / 2
    for rnd in (1, 2):
        got = round_arrays(basic_run.out, rnd)
        delta = np.concatenate([(got[k].astype(np.float64) - previous[k]).ravel() for k in previous])
        expected_norm = std * math.sqrt(delta.size)
        assert np.linalg.norm(delta) > 10 * DP_CLIP, "no noise was added"
        assert abs(np.linalg.norm(delta) - expected_norm) < DP_CLIP + 0.05 * expected_norm, "the update was not clipped"
        assert delta.std() == pytest.approx(std, rel=0.05)
        previous = got
    config = basic_run.metrics["config"]
    assert config["privacy.dp-clip"] == DP_CLIP and config["privacy.dp-noise"] == DP_NOISE


def test_plan_dp_gives_what_it_gave_before_the_reshaping(basic_run):
    from .conftest import assert_pinned

    assert_pinned(basic_run, "plan_dp")


def test_the_pin_check_allows_float_noise_and_nothing_more():
    """Off the recording CPU the pins hold within float noise: a run whose adapter norm, perplexity,
    train loss or sampled devices moved by more is reported, naming what moved."""
    import copy

    from .conftest import pinned_differences, pins_file

    pins = json.loads(pins_file().read_text())["plan_dp"]
    metrics = {"initial_eval_perplexity": pins["initial_eval_perplexity"], "rounds": copy.deepcopy(pins["rounds"])}

    def adapter(scale: float) -> dict:
        return {"0.q_proj.lora_A": np.array([pins["adapter_norm"] * scale], dtype=np.float32)}

    assert pinned_differences(metrics, adapter(1 + 1e-6), pins) == []
    assert [d.split(" ", 2)[:2] for d in pinned_differences(metrics, adapter(1.0001), pins)] == [["adapter", "norm"]]
    moved = copy.deepcopy(metrics)
    moved["rounds"][1]["eval_perplexity"] += 0.005     # the second round's whole effect is 0.004
    moved["rounds"][0]["clients"].reverse()
    moved["rounds"][0]["train_loss"] *= 1 + 1e-6       # float noise: not reported
    assert [d.split(", pinned")[0] for d in pinned_differences(moved, adapter(1.0), pins)] == [
        "round 1 sampled [2, 1]", f"round 2 perplexity {moved['rounds'][1]['eval_perplexity']!r}"]


def test_a_device_that_drops_out_of_a_secagg_round_is_a_failure_of_the_round(pruned_ckpt, text_file, tmp_path):
    """SecAgg+ shows the server only the sum: the round still names the sampled device whose share
    is missing (`dropped`), so policies learn from it as from a plain round's crash."""
    run = run_recover(pruned_ckpt, [text_file], tmp_path / "out", clients=3, secagg=True, inject_faults="crash:2")
    row = run.metrics["rounds"][0]
    assert row["clients_sampled"] == 3 and row["clients_returned"] == 2 and row["applied"]
    assert [(f["partition-id"], f["failed"]) for f in row["failures"]] == [(2, "dropped")]
