"""fedrecover/split.py: the U-shaped split's maths on every architecture — the device's front and tail
(a lean submodel read from the checkpoint) with the server's middle equal the whole model, values and
LoRA gradients; the merged batch of devices cut at different layers gives each device back exactly
its own gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.fedrecover.client_model import chunked_vocab_loss, load_submodel
from llmprune.fedrecover.lora import attach_lora, init_arrays, module_shapes
from llmprune.fedrecover.split import Cut, embed, head_loss, merged_forward, run_layers, window_calls
from llmprune.models import load_model

SEQ = 12


def _arrays(model, seed: int = 0) -> dict:
    """LoRA on every layer with B nonzero, so that A gets a gradient too."""
    shapes = module_shapes(model, ("q_proj", "v_proj", "down_proj"))
    arrays = init_arrays(shapes, list(shapes), 2, seed)
    rng = np.random.default_rng(seed + 1)
    return {k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if k.endswith(".B") else v) for k, v in arrays.items()}


def _grads(peft_model) -> dict:
    from llmprune.fedrecover.lora import _lora_layers

    return {f"{name}.{part}": getattr(m, f"lora_{part}")["default"].weight.grad.clone()
            for name, m in _lora_layers(peft_model) for part in ("A", "B")
            if getattr(m, f"lora_{part}")["default"].weight.grad is not None}


def _ids(seed: int, batch: int) -> torch.Tensor:
    return torch.randint(3, 320, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def test_the_split_model_equals_the_whole_model_values_and_lora_gradients(checkpoint, arch):
    folder = checkpoint(arch)
    whole = load_model(folder).float().eval()
    arrays = _arrays(whole)
    ids = _ids(0, 3)
    reference = attach_lora(whole, arrays, scale=2.0)
    expected_loss = chunked_vocab_loss(reference.get_base_model(), ids, vocab_chunk=100)
    expected_loss.backward()
    expected = _grads(reference)

    cut = Cut(4, front=1, back=3)
    submodel = cut.submodel()
    device = load_submodel(folder, submodel, dtype=torch.float32)
    device_lora = attach_lora(device, submodel.to_local({k: v for k, v in arrays.items()
                                                         if submodel.holds(k.rsplit(".", 1)[0])}), scale=2.0)
    server = attach_lora(load_model(folder).float().eval(), arrays, scale=2.0)
    device_model, server_model = device_lora.get_base_model(), server.get_base_model()
    device_calls, server_calls = window_calls(device_model, SEQ), window_calls(server_model, SEQ)

    features = run_layers(device_model, embed(device_model, ids), [0], device_calls)               # the device's front
    middle = merged_forward(server_model, {"d": features}, {"d": cut.front}, cut.back, server_calls)
    at_back = middle.outputs["d"].requires_grad_(True)                                            # what the device receives
    loss = head_loss(device_model, run_layers(device_model, at_back, [1], device_calls), ids, vocab_chunk=100)
    loss.backward()
    returned = middle.backward({"d": at_back.grad})["d"]
    features.backward(returned)

    assert torch.allclose(loss, expected_loss, rtol=1e-5), (loss, expected_loss)
    got = {**submodel.to_global(_grads(device_lora)), **{k: v for k, v in _grads(server).items()
                                                          if int(k.split(".")[0]) in cut.server_layers}}
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def test_merged_devices_get_back_exactly_their_own_gradients(checkpoint):
    folder = checkpoint("qwen3")
    arrays = _arrays(load_model(folder))
    model = attach_lora(load_model(folder).float().eval(), arrays, scale=2.0)
    base = model.get_base_model()
    calls = window_calls(base, SEQ)
    cuts, batches = {"a": 1, "b": 2, "c": 1}, {"a": 2, "b": 3, "c": 1}
    ids = {key: _ids(i, batches[key]) for i, key in enumerate(cuts)}
    features = {key: run_layers(base, embed(base, ids[key]), range(cuts[key]), calls).detach() for key in cuts}

    def own_loss(out, key):
        return head_loss(base, run_layers(base, out, [3], calls), ids[key])

    alone_grads, alone_server = {}, {}
    for key in cuts:                          # each device on its own through the server's layers
        model.zero_grad()
        single = merged_forward(base, {key: features[key]}, {key: cuts[key]}, 3, calls)
        out = single.outputs[key].requires_grad_(True)
        own_loss(out, key).backward()
        alone_grads[key] = single.backward({key: out.grad})[key]
        alone_server[key] = {k: v for k, v in _grads(model).items() if int(k.split(".")[0]) in (1, 2)}

    model.zero_grad()
    merged = merged_forward(base, features, cuts, 3, calls)
    device_grads = {}
    for key in cuts:
        out = merged.outputs[key].requires_grad_(True)
        own_loss(out, key).backward()
        device_grads[key] = out.grad
    back = merged.backward(device_grads)
    total = sum(batches.values())
    for key in cuts:
        assert torch.allclose(back[key], alone_grads[key], atol=1e-6), key
    server = {k: v for k, v in _grads(model).items() if int(k.split(".")[0]) in (1, 2)}
    for name, grad in server.items():           # the merged batch's mean loss: devices weighted by windows
        mixed = sum(alone_server[key].get(name, torch.zeros_like(grad)) * batches[key] / total for key in cuts)
        assert torch.allclose(grad, mixed, atol=1e-6), name


@pytest.mark.parametrize("merge", [True, False])
def test_the_server_steps_once_per_pass_at_the_weights_the_passes_ran_with(checkpoint, merge):
    """Merged: one pass, one step. Without merging: one pass and one step per device, every backward
    at the weights the forwards ran with (a step between them would change what the graph holds)."""
    from llmprune.fedrecover.split import server_steps

    folder = checkpoint("llama")
    model = attach_lora(load_model(folder).float().eval(), _arrays(load_model(folder)), scale=2.0)
    base = model.get_base_model()
    calls = window_calls(base, SEQ)
    features = {key: run_layers(base, embed(base, _ids(i, 2)), [0], calls).detach() for i, key in enumerate("ab")}
    cuts = {"a": 1, "b": 1}
    passes = [merged_forward(base, features, cuts, 3, calls)] if merge else \
        [merged_forward(base, {k: h}, {k: 1}, 3, calls) for k, h in features.items()]
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    grads = [{k: torch.ones_like(out) for k, out in p.outputs.items()} for p in passes]
    back = server_steps(passes, grads, params, optimizer)
    assert set(back) == {"a", "b"} and all(g.shape == features[k].shape for k, g in back.items())
    steps = {float(optimizer.state[p]["step"]) for p in params if p in optimizer.state}
    assert steps == {1.0 if merge else 2.0}
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize(("front", "back"), [(0, 3), (3, 3), (2, 5)])
def test_a_cut_outside_the_layers_is_one_line(front, back):
    with pytest.raises(LLMPruneError, match=r"does not fit a 4-layer model.*1 <= front < back <= 4"):
        Cut(4, front, back)


def test_a_cut_holds_the_front_and_the_tail():
    cut = Cut(6, 2, 5)
    assert cut.device_layers == (0, 1, 5) and cut.server_layers == (2, 3, 4)
    assert cut.submodel().layers == (0, 1, 5)
    shapes = {f"{i}.self_attn.q_proj": (4, 4) for i in range(6)}
    assert cut.device_modules(shapes) == ["0.self_attn.q_proj", "1.self_attn.q_proj", "5.self_attn.q_proj"]


# ---------------------------------------------------------------- batch regulation
def test_batches_follow_the_measured_speed_and_the_devices_finish_together():
    from llmprune.fedrecover.split_round import regulate_batches

    seconds = {0: 1.0, 1: 0.5, 2: 0.25}                  # per window: device 2 is four times device 0
    batches = regulate_batches(seconds, 12, {})
    assert batches == {0: 2, 1: 3, 2: 7} and sum(batches.values()) == 12
    finish = max(batches[k] * seconds[k] for k in seconds)
    assert finish == 2.0 < max(4 * s for s in seconds.values())   # the same 12 windows, half the wait


def test_batches_keep_the_mix_balanced_and_within_memory():
    from llmprune.fedrecover.split_round import regulate_batches

    seconds = {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.01}          # one device 100x faster: at most twice the fair 4
    assert regulate_batches(seconds, 16, {}) == {0: 3, 1: 3, 2: 2, 3: 8}
    assert regulate_batches(seconds, 16, {3: 5}) == {0: 4, 1: 4, 2: 3, 3: 5}
    assert regulate_batches({0: None, 1: None}, 6, {}) == {0: 3, 1: 3}          # nothing measured yet: equal
    assert regulate_batches({0: None, 1: 0.5}, 6, {}) == {0: 3, 1: 3}           # unmeasured: the mean speed
    assert regulate_batches({0: 1.0, 1: 1.0}, 8, {0: 1, 1: 1}) == {0: 1, 1: 1}   # memory wins over the total


def test_idle_where_devices_run_side_by_side_is_the_lag_behind_each_exchanges_slowest_job():
    from llmprune.fedrecover.split_round import DeviceSteps, SplitRound

    record = SplitRound({0: DeviceSteps(Cut(4, 1, 3), 2), 1: DeviceSteps(Cut(4, 2, 3), 4)})
    for jobs in ({0: 5.0, 1: 3.0}, {0: 1.0, 1: 2.0}, {0: 1.0}):     # device 1 left out of the last exchange
        for pid, seconds in jobs.items():
            record.devices[pid].seconds += seconds
        record.exchanged(jobs)
    record.served(0.5)
    assert record.parallel_seconds == 5.0 + 2.0 + 1.0 + 0.5
    assert [record.devices[0].lag, record.devices[1].lag] == [1.0, 2.0]
    assert [record.devices[0].first_job, record.devices[1].first_job] == [5.0, 3.0]   # reading the part: once
    record.devices[0].steps = record.devices[1].steps = 1
    assert record.devices[0].seconds_per_window() == (7.0 - 5.0) / 2        # the batch's cost, not the read
    assert record.devices[1].seconds_per_window() == 2.0 / 4
    assert DeviceSteps(Cut(4, 1, 3), 2).seconds_per_window() is None


# ---------------------------------------------------------------- a simulation: two cuts, a dropout
SPLIT = dict(clients=2, rounds=2, policy="split", inject_faults="crash:1@2")


@pytest.fixture(scope="module")
def split_run(pruned_ckpt, text_file, tmp_path_factory):
    """Two devices of different declared speed (so different cuts), 2 rounds; device 1 fails at its
    first tail step of round 2 (mid-round). Every message the server receives is recorded."""
    import json

    from llmprune.fedrecover import split_round

    from .conftest import run_recover

    tmp = tmp_path_factory.mktemp("split")
    fleet = tmp / "fleet.json"
    fleet.write_text(json.dumps({"devices": [{"name": "fast", "memory_mb": 100000, "speed": 1.0},
                                             {"name": "slow", "memory_mb": 100000, "speed": 0.5}]}))
    received: list = []
    real = split_round.send_and_receive

    def recording(grid, messages, timeout, stop=None):
        replies = real(grid, messages, timeout, stop)
        received.extend(replies)
        return replies

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(split_round, "send_and_receive", recording)
        result = run_recover(pruned_ckpt, [text_file], tmp / "recovered", fleet=str(fleet), **SPLIT)
    return result, received, str(fleet)


def test_a_split_round_trains_the_devices_and_the_server_and_records_each_device(split_run, pruned_ckpt):
    from safetensors.numpy import load_file

    from llmprune.fedrecover import state_dir_for
    from llmprune.models import load_config

    result, _, _ = split_run
    rounds = result.metrics["rounds"]
    hidden = load_config(pruned_ckpt).hidden_size
    first = {c["partition-id"]: c for c in rounds[0]["clients"]}
    assert [first[0]["cut"], first[1]["cut"]] == [{"front": 2, "back": 3}, {"front": 1, "back": 3}]
    assert first[0]["batch_size"] + first[1]["batch_size"] == 2 * 2            # --batch-size per device, merged
    for row in first.values():
        assert row["split_steps"] == 2 and row["peak_rss_mb"] > 0 and row["compute_seconds"] > 0
        assert 0 < row["first_job_seconds"] < row["compute_seconds"] and row["idle_if_parallel_seconds"] >= 0
        features = row["batch_size"] * 33 * hidden * 4          # float32 windows of 33 positions, each way per step:
        assert row["bytes_up_per_step"] == row["bytes_down_per_step"] == pytest.approx(2 * features, rel=0.01)  # + gradient
    # round 2: device 1 dropped out at its first tail step; the round applied with device 0
    assert rounds[1]["applied"] and rounds[1]["clients_returned"] == 1
    assert rounds[1]["failures"][0]["partition-id"] == 1 and rounds[1]["failures"][0]["failed"] == "crash"
    state = state_dir_for(result.out)
    start, end = load_file(str(state / "round-001.safetensors")), load_file(str(state / "round-002.safetensors"))
    changed = {k.split(".")[0] for k in end if k.endswith(".B") and not np.array_equal(start[k], end[k])}
    assert changed == {"0", "1", "2"}     # layer 0, 1 on device 0; 1, 2 on the server for device 0 (round 2)
    split = result.metrics["split"]
    assert split["merge"] and len(split["server_seconds_per_round"]) == len(split["parallel_seconds_per_round"]) == 2
    assert all(p > s for p, s in zip(split["parallel_seconds_per_round"], split["server_seconds_per_round"]))


def test_the_server_never_receives_token_ids(split_run, pruned_ckpt):
    from llmprune.fedrecover.records import from_record
    from llmprune.models import load_config

    _, received, _ = split_run
    hidden = load_config(pruned_ckpt).hidden_size
    tensors = [a for r in received if not r.has_error() for rec in r.content.array_records.values()
               for a in from_record(rec).values()]
    assert received and tensors
    assert all(a.dtype == np.float32 for a in tensors)           # features, gradients, LoRA: never ids
    features = [a for a in tensors if a.ndim == 3]
    assert features and all(a.shape[1:] == (33, hidden) for a in features)


def test_a_resumed_split_run_equals_the_uninterrupted_one(split_run, pruned_ckpt, text_file, tmp_path):
    from .conftest import assert_resumed_equal, resumed_after

    ref, _, fleet = split_run
    got = resumed_after(ref, 1, pruned_ckpt, [text_file], tmp_path / "resumed", fleet=fleet, **SPLIT)
    assert_resumed_equal(ref, got)
