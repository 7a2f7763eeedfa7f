"""DevFT staged growth: schedules and their round split, contiguous grouping by similarity and
anchors, layer fusion (by hand on constructed tensors, on tiny models, and read lean from a
checkpoint against the fully loaded model), the LoRA hand-over between stages, and Stage JSON."""

from __future__ import annotations

import copy
import weakref

import numpy as np
import pytest
import torch

import llmprune
from llmprune.arch import adapter_for
from llmprune.compress.surgery import install_layers
from llmprune.errors import LLMPruneError
from llmprune.fedrecover.client_model import load_submodel
from llmprune.fedrecover.devft import (
    DEFAULT_BETA,
    Stage,
    anchor_of,
    build_stages,
    check_schedule_text,
    expand_lora,
    fuse_layers_in_place,
    fuse_model,
    fuse_parameters,
    load_stage_model,
    parse_schedule,
    segment_layers,
    stage_modules,
    stage_of_rounds,
)
from llmprune.fedrecover.lora import init_arrays, module_shapes
from llmprune.fedrecover.submodels import Submodel
from llmprune.testing import tiny_model

from .test_client_model import ids, logits  # the same tiny inputs as the submodel tests

ARCHS = ("llama", "gemma3_text")
# 4 layers in two groups; the anchors are a sliding and the full layer in the tiny Gemma
STAGE = Stage(4, ((0, 1), (2, 3)), (1, 2), 0.3)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and exc.value.fix, text
    return text


# ---------------------------------------------------------------- the schedule
@pytest.mark.parametrize("text, layers, expected", [
    ("devft:4,8,all", 12, [4, 8, 12]),
    ("devft:4,8", 12, [4, 8, 12]),      # the full model is always the last stage
    ("devft:2,4", 4, [2, 4]),
    ("devft:all", 6, [6]),
    ("  devft: 1 , 3 ,ALL ", 5, [1, 3, 5]),
])
def test_parse_schedule(text, layers, expected):
    assert parse_schedule(text, layers) == expected
    check_schedule_text(text)


@pytest.mark.parametrize("text, message", [
    ("grow:1,2", "must start with 'devft:'"),
    ("1,2", "must start with 'devft:'"),
    ("devft:", "lists no stage"),
    ("devft: ", "lists no stage"),
    ("devft:a,2", "'a' is not a layer count"),
    ("devft:2.5", "'2.5' is not a layer count"),
    ("devft:2,,4", "'' is not a layer count"),
    ("devft:0,2", "'0' is not a layer count"),
    ("devft:-1,2", "'-1' is not a layer count"),
    ("devft:8,4", "--schedule devft:8,4 does not grow"),
    ("devft:4,4", "does not grow"),
    ("devft:all,4", "does not grow"),
    ("devft:2,all,all", "does not grow"),
])
def test_bad_schedules_are_refused_in_one_line(text, message):
    for check in (lambda: parse_schedule(text, 12), lambda: check_schedule_text(text)):
        with pytest.raises(LLMPruneError) as exc:
            check()
        assert message in one_line(exc)


@pytest.mark.parametrize("text, message", [
    ("devft:4,20", "stage 20 exceeds the model's 12 layers"),
    ("devft:13,all", "stage 13 exceeds the model's 12 layers"),
    ("devft:12,all", "does not grow"),   # 'all' is 12 here
])
def test_schedules_that_do_not_fit_the_model_are_refused(text, message):
    check_schedule_text(text)          # the syntax is fine: only the layer count rules it out
    with pytest.raises(LLMPruneError) as exc:
        parse_schedule(text, 12)
    assert message in one_line(exc)


@pytest.mark.parametrize("stages, rounds, expected", [
    ([2, 4, 8], 3, [0, 1, 2]),
    ([2, 4, 8], 7, [0, 0, 1, 1, 2, 2, 2]),
    ([2, 4, 8], 8, [0, 0, 1, 1, 1, 2, 2, 2]),   # the extra rounds go to the later stages
    ([2, 4, 8], 9, [0, 0, 0, 1, 1, 1, 2, 2, 2]),
    ([8], 2, [0, 0]),
])
def test_stage_of_rounds(stages, rounds, expected):
    assert stage_of_rounds(stages, rounds) == expected


def test_fewer_rounds_than_stages_are_refused():
    with pytest.raises(LLMPruneError) as exc:
        stage_of_rounds([2, 4, 8], 2)
    assert "--rounds 2 is fewer than the schedule's 3 stages" in one_line(exc)


# ---------------------------------------------------------------- grouping
def block_similarity(sizes, inside=0.8, across=0.1, noise=0.05, seed=0) -> np.ndarray:
    n = sum(sizes)
    rng = np.random.default_rng(seed)
    sim = np.full((n, n), across)
    start = 0
    for size in sizes:
        sim[start:start + size, start:start + size] = inside
        start += size
    sim += rng.uniform(-noise, noise, size=(n, n))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    return sim


@pytest.mark.parametrize("sizes, inside, across", [((3, 2, 4), 0.8, 0.1), ((4, 4), 0.6, 0.4), ((2, 5, 1, 3), 0.9, 0.5)])
def test_segment_layers_recovers_the_blocks(sizes, inside, across):
    sim = block_similarity(sizes, inside, across)
    groups = segment_layers(sim, len(sizes))
    expected, start = [], 0
    for size in sizes:
        expected.append(list(range(start, start + size)))
        start += size
    assert groups == expected
    assert segment_layers(sim, len(sizes)) == groups     # deterministic


def test_segment_layers_is_balanced_on_a_smoothly_decaying_similarity():
    n = 12
    sim = np.exp(-np.abs(np.subtract.outer(np.arange(n), np.arange(n))) / 4.0)
    assert [len(g) for g in segment_layers(sim, 3)] == [4, 4, 4]
    assert [len(g) for g in segment_layers(sim, 4)] == [3, 3, 3, 3]


def test_segment_layers_edge_cases_and_ties():
    sim = block_similarity((3, 3))
    assert segment_layers(sim, 6) == [[i] for i in range(6)]
    assert segment_layers(sim, 1) == [list(range(6))]
    uniform = np.full((5, 5), 0.5)
    np.fill_diagonal(uniform, 1.0)
    first = segment_layers(uniform, 2)
    assert [m for g in first for m in g] == list(range(5)) and len(first) == 2
    assert all(segment_layers(uniform, 2) == first for _ in range(3))
    for k in (0, 7, 2.0, True):
        with pytest.raises(LLMPruneError):
            segment_layers(sim, k)
    with pytest.raises(LLMPruneError):
        segment_layers(np.ones((2, 3)), 1)


def test_anchor_of():
    sim = np.array([[1.0, 0.2, 0.3, 0.1],
                    [0.2, 1.0, 0.9, 0.8],
                    [0.3, 0.9, 1.0, 0.7],
                    [0.1, 0.8, 0.7, 1.0]])
    assert anchor_of([0, 1, 2, 3], sim) == 1        # sums 0.6, 1.9, 1.9, 1.6: tie -> lowest
    assert anchor_of([2, 3, 1], sim) == 1
    assert anchor_of([2, 3], sim) == 2              # two members: a tie
    assert anchor_of([3], sim) == 3
    assert anchor_of([0, 2, 3], sim) == 2           # 0.4, 1.0, 0.8


def test_build_stages():
    sim = block_similarity((2, 3, 3))
    stages = build_stages(sim, [1, 3, 8], 0.2)
    assert [len(s.groups) for s in stages] == [1, 3, 8]
    assert stages[1].groups == ((0, 1), (2, 3, 4), (5, 6, 7))
    assert all(a in g for s in stages for a, g in zip(s.anchors, s.groups))
    assert stages[-1].is_full and not stages[0].is_full and stages[-1].anchors == tuple(range(8))
    assert stages[1].submodel() == Submodel.of_layers(8, stages[1].anchors)
    with pytest.raises(LLMPruneError):
        build_stages(sim, [3, 6], 0.2)     # does not end at the model's depth
    assert DEFAULT_BETA == 1.0     # measured best in bench/devft_transfer.py


def test_stage_json_round_trip_and_validation():
    stage = Stage(5, ((0, 1), (2,), (3, 4)), (1, 2, 3), 0.25)
    assert Stage.from_json(stage.to_json()) == stage
    assert stage.to_dict() == {"num_layers": 5, "groups": [[0, 1], [2], [3, 4]], "anchors": [1, 2, 3], "beta": 0.25,
                               "handover": "copy"}
    for text in ("{", "[]", '{"num_layers": 5}', '{"num_layers": 5, "groups": 3, "anchors": [], "beta": 0}'):
        with pytest.raises(LLMPruneError, match="malformed DevFT stage"):
            Stage.from_json(text)
    for groups, anchors, beta in ((((0, 2), (1, 3, 4)), (0, 1), 0.2), (((0, 1), (2, 3, 4)), (2, 3), 0.2),
                                  (((0, 1), (2, 3)), (0, 2), 0.2), (((0, 1), (2, 3, 4)), (0, 2), float("nan"))):
        with pytest.raises(LLMPruneError):
            Stage(5, groups, anchors, beta)


# ---------------------------------------------------------------- fusion on constructed tensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_parameters_by_hand(dtype):
    anchor = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype), "b": torch.tensor([0.5, -1.0], dtype=dtype)}
    members = [{"w": torch.tensor([[2.0, 2.0], [1.0, 4.0]], dtype=dtype), "b": torch.tensor([1.5, -1.0], dtype=dtype)},
               {"w": torch.tensor([[0.0, 3.0], [3.0, 8.0]], dtype=dtype), "b": torch.tensor([0.5, 3.0], dtype=dtype)},
               {"w": torch.tensor([[1.0, -2.0], [5.0, 4.0]], dtype=dtype), "b": torch.tensor([-0.5, 0.0], dtype=dtype)}]
    before = {k: v.clone() for k, v in anchor.items()}
    fused = fuse_parameters(anchor, members, 0.25)
    # w: anchor + 0.25 * ([[1, 0], [-2, 0]] + [[-1, 1], [0, 4]] + [[0, -4], [2, 0]]) = anchor + 0.25 * [[0, -3], [0, 4]]
    expected = {"w": torch.tensor([[1.0, 1.25], [3.0, 5.0]]), "b": torch.tensor([0.5 + 0.25 * 0.0, -1.0 + 0.25 * 5.0])}
    for name in anchor:
        assert fused[name].dtype == dtype
        assert torch.equal(fused[name], expected[name].to(dtype))
        assert torch.equal(anchor[name], before[name])       # pure
    assert all(torch.equal(fuse_parameters(anchor, members, 0.0)[n], anchor[n]) for n in anchor)
    assert all(torch.equal(fuse_parameters(anchor, [], 0.7)[n], anchor[n]) for n in anchor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_parameters_on_random_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    anchor = {"w": torch.randn(6, 5, generator=g).to(dtype)}
    members = [{"w": torch.randn(6, 5, generator=g).to(dtype)} for _ in range(3)]
    a = anchor["w"].double()
    expected = a + 0.2 * sum(m["w"].double() - a for m in members)
    torch.testing.assert_close(fuse_parameters(anchor, members, 0.2)["w"], expected.to(dtype), rtol=1e-6, atol=1e-6)


def test_fuse_parameters_needs_the_same_parameters_and_fuses_other_widths_on_the_overlap():
    anchor = {"w": torch.ones(2, 3)}
    with pytest.raises(LLMPruneError) as exc:
        fuse_parameters(anchor, [{"w": torch.ones(2, 3), "extra": torch.ones(1)}], 0.5)
    assert "does not have the anchor's parameters" in one_line(exc)
    with pytest.raises(LLMPruneError):
        fuse_parameters(anchor, [{"w": torch.ones(6)}], 0.5)
    narrow, wide = {"w": torch.full((2, 2), 3.0)}, {"w": torch.full((4, 3), 5.0)}
    fused = fuse_parameters(anchor, [narrow, wide], 0.5)["w"]
    assert fused.shape == (2, 3)
    # overlap with both: 1 + 0.5 * (2 + 4); the last column only with the wide one: 1 + 0.5 * 4
    assert torch.equal(fused, torch.tensor([[4.0, 4.0, 3.0], [4.0, 4.0, 3.0]]))


def test_fuse_layers_in_place_reads_one_member_at_a_time():
    layers = [torch.nn.Linear(3, 2) for _ in range(2)]
    others = {j: {"weight": torch.full((2, 3), float(j)), "bias": torch.full((2,), float(j))} for j in range(5)}
    stage = Stage(5, ((0, 1, 2), (3, 4)), (1, 3), 0.5)
    for layer, a in zip(layers, stage.anchors):
        with torch.no_grad():
            layer.weight.copy_(others[a]["weight"])
            layer.bias.copy_(others[a]["bias"])
    live, most, calls = [0], [0], []

    class State(dict):
        pass

    def member_state(j):
        calls.append(j)
        state = State({k: v.clone() for k, v in others[j].items()})
        live[0] += 1
        most[0] = max(most[0], live[0])
        weakref.finalize(state, lambda: live.__setitem__(0, live[0] - 1))
        return state

    fuse_layers_in_place(layers, stage, member_state)
    assert calls == [0, 2, 4] and most[0] == 1
    assert torch.equal(layers[0].weight, torch.full((2, 3), 1.0 + 0.5 * ((0 - 1) + (2 - 1))))
    assert torch.equal(layers[1].bias, torch.full((2,), 3.0 + 0.5 * (4 - 3)))


# ---------------------------------------------------------------- fusion on tiny models
def hand_fused(model, stage: Stage):
    """The stage's model built by hand: fused weights from the formula in float64, then the stack cut."""
    ref = copy.deepcopy(model)
    layers = list(ref.model.layers)
    for group, a in zip(stage.groups, stage.anchors):
        members = [dict(layers[j].named_parameters()) for j in group if j != a]
        with torch.no_grad():
            for name, p in layers[a].named_parameters():
                base = p.double()
                p.copy_((base + stage.beta * sum(m[name].double() - base for m in members)).to(p.dtype))
    install_layers(ref, [layers[a] for a in stage.anchors], list(stage.anchors))
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_fuse_model_equals_the_hand_built_fusion(arch):
    model = tiny_model(arch)
    types = list(getattr(model.config, "layer_types", None) or [])
    ref = hand_fused(model, STAGE)
    fused = fuse_model(model, STAGE)
    layers = fused.model.layers
    assert fused.config.num_hidden_layers == len(layers) == 2
    assert [l.layer_idx for l in layers] == [l.self_attn.layer_idx for l in layers] == [0, 1]
    if types:
        assert fused.config.layer_types == [types[1], types[2]] == ["sliding_attention", "full_attention"]
        assert [adapter_for(fused).attention_kind(l) for l in layers] == fused.config.layer_types
    for (name, p), (ref_name, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert name == ref_name
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    x = ids()
    torch.testing.assert_close(logits(fused, x), logits(ref, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_beta_zero_gives_the_anchors_exactly(arch):
    model = tiny_model(arch)
    anchors = {a: {n: p.clone() for n, p in model.model.layers[a].named_parameters()} for a in STAGE.anchors}
    fused = fuse_model(model, Stage(4, STAGE.groups, STAGE.anchors, 0.0))
    for layer, a in zip(fused.model.layers, STAGE.anchors):
        assert all(torch.equal(p, anchors[a][n]) for n, p in layer.named_parameters())


def test_a_full_stage_leaves_the_model_unchanged():
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    full = Stage(4, ((0,), (1,), (2,), (3,)), (0, 1, 2, 3), 0.5)
    assert full.is_full and fuse_model(model, full) is model
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(LLMPruneError):
        fuse_model(model, Stage(5, ((0, 1), (2, 3, 4)), (0, 2), 0.2))


# ---------------------------------------------------------------- lean loading from a checkpoint
@pytest.mark.parametrize("arch", ARCHS)
def test_load_stage_model_equals_fusing_the_fully_loaded_model(arch, checkpoint):
    folder = checkpoint(arch)
    device = load_stage_model(folder, STAGE, dtype=torch.float32)
    full = fuse_model(llmprune.load_model(folder), STAGE)
    assert device.config.num_hidden_layers == 2
    if arch == "gemma3_text":
        assert device.config.layer_types == full.config.layer_types == ["sliding_attention", "full_attention"]
    d_layers, f_layers = device.model.layers, full.model.layers
    assert [l.layer_idx for l in d_layers] == [0, 1]
    for d, f in zip(d_layers, f_layers):
        for (name, p), (f_name, q) in zip(d.named_parameters(), f.named_parameters()):
            assert name == f_name and torch.equal(p, q)
    x = ids()
    torch.testing.assert_close(logits(device, x), logits(full, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_stage_model_in_bfloat16(arch, checkpoint):
    folder = checkpoint(arch)
    device = load_stage_model(folder, STAGE, dtype=torch.bfloat16)
    full = fuse_model(llmprune.load_model(folder, dtype=torch.bfloat16), STAGE)
    for d, f in zip(device.model.layers, full.model.layers):
        pairs = list(zip(d.named_parameters(), f.named_parameters()))
        assert pairs and all(n == m and p.dtype == torch.bfloat16 and torch.equal(p, q) for (n, p), (m, q) in pairs)
    assert torch.isfinite(logits(device, ids())).all()


def test_a_full_stage_loads_as_the_submodel(checkpoint):
    folder = checkpoint("llama")
    full = Stage(4, ((0,), (1,), (2,), (3,)), (0, 1, 2, 3), 0.2)
    x = ids()
    torch.testing.assert_close(logits(load_stage_model(folder, full, dtype=torch.float32), x),
                               logits(load_submodel(folder, Submodel.full(4), dtype=torch.float32), x))


def test_load_stage_model_of_a_pruned_checkpoint(pruned_ckpt):
    stage = Stage(3, ((0, 1, 2),), (1,), 0.2)
    device = load_stage_model(pruned_ckpt, stage, dtype=torch.float32)
    full = fuse_model(llmprune.load_model(pruned_ckpt), stage)
    spec = llmprune.load_model(pruned_ckpt).config.llmprune
    assert device.config.llmprune["layers"] == full.config.llmprune["layers"] == [spec["layers"][1]]
    x = ids()
    torch.testing.assert_close(logits(device, x), logits(full, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- LoRA across stages
def test_expand_lora_copies_the_anchors_adapter_to_every_member():
    shapes = module_shapes(tiny_model("llama"), ("q_proj", "down_proj"))
    stage = STAGE
    trained = init_arrays(shapes, stage_modules(shapes, stage), rank=4, seed=1)
    assert sorted({k.split(".")[0] for k in trained}) == ["1", "2"]
    expanded = expand_lora(trained, stage)
    assert len(expanded) == 2 * len(trained)     # 4 layers from 2 anchors
    for group, a in zip(stage.groups, stage.anchors):
        for j in group:
            for path in ("self_attn.q_proj", "mlp.down_proj"):
                for ab in ("A", "B"):
                    src, dst = trained[f"{a}.{path}.{ab}"], expanded[f"{j}.{path}.{ab}"]
                    assert dst.dtype == src.dtype and dst.tobytes() == src.tobytes()   # bit for bit
    before = {k: v.copy() for k, v in trained.items()}
    for value in expanded.values():
        value += 1.0                     # real copies: the source never changes
    assert all(np.array_equal(trained[k], before[k]) for k in trained)


def test_expand_lora_keeps_layers_no_anchor_covers_and_overwrites_members():
    shapes = module_shapes(tiny_model("llama"), ("q_proj",))
    everything = init_arrays(shapes, list(shapes), rank=2, seed=0)
    stage = Stage(4, ((0,), (1, 2), (3,)), (0, 2, 3), 0.2)
    partial = {k: v for k, v in everything.items() if not k.startswith("3.")}   # layer 3's anchor has no LoRA
    partial["3.self_attn.q_proj.A"] = everything["3.self_attn.q_proj.A"]
    expanded = expand_lora(partial, stage)
    assert np.array_equal(expanded["1.self_attn.q_proj.A"], partial["2.self_attn.q_proj.A"])
    assert not np.array_equal(expanded["1.self_attn.q_proj.A"], partial["1.self_attn.q_proj.A"])
    assert np.array_equal(expanded["0.self_attn.q_proj.B"], partial["0.self_attn.q_proj.B"])
    assert expanded["0.self_attn.q_proj.B"] is not partial["0.self_attn.q_proj.B"]
    assert np.array_equal(expanded["3.self_attn.q_proj.A"], partial["3.self_attn.q_proj.A"])
    assert "3.self_attn.q_proj.B" not in expanded
    # a member pruned to another width gets the anchor's arrays cropped / zero-padded to its shape
    narrow = dict(partial, **{"1.self_attn.q_proj.B": np.zeros((48, 2), dtype=np.float32)})
    got = expand_lora(narrow, stage)["1.self_attn.q_proj.B"]
    assert got.shape == (48, 2) and np.array_equal(got, partial["2.self_attn.q_proj.B"][:48])
    with pytest.raises(LLMPruneError):
        expand_lora({"x.A": np.zeros(1)}, stage)


def test_a_stage_change_hands_each_groups_lora_to_the_next_stages_anchors():
    shapes = module_shapes(tiny_model("llama"), ("q_proj", "v_proj"))
    first, second = Stage(4, ((0, 1, 2, 3),), (2,), 0.2), STAGE
    local = first.submodel().to_local(init_arrays(shapes, stage_modules(shapes, first), rank=2, seed=3))
    assert sorted({k.split(".")[0] for k in local}) == ["0"]     # the device's one fused layer
    trained = first.submodel().to_global({k: v * 2 for k, v in local.items()})
    start = expand_lora(trained, first)
    nxt = {m + s: start[m + s] for m in stage_modules(shapes, second) for s in (".A", ".B")}
    assert {k.split(".")[0] for k in nxt} == {"1", "2"}
    for key, value in nxt.items():
        assert np.array_equal(value, trained["2." + key.split(".", 1)[1]])
    device = second.submodel().to_local(nxt)
    assert {k.split(".")[0] for k in device} == {"0", "1"} and second.submodel().to_global(device).keys() == nxt.keys()


def test_stage_modules():
    shapes = module_shapes(tiny_model("llama"), ("q_proj", "up_proj"))
    assert stage_modules(shapes, STAGE) == ["1.self_attn.q_proj", "1.mlp.up_proj", "2.self_attn.q_proj",
                                            "2.mlp.up_proj"]


# ---------------------------------------------------------------- the hand-over (split / copy)
def test_the_split_hand_over_gives_each_member_its_share_of_the_groups_update():
    shapes = module_shapes(tiny_model("llama"), ("q_proj", "v_proj"))
    split = Stage(4, ((0, 1, 2), (3,)), (1, 3), 1.0, "split")
    trained = init_arrays(shapes, stage_modules(shapes, split), rank=2, seed=5)
    trained = {k: v + 1.0 for k, v in trained.items()}          # B != 0
    got = expand_lora(trained, split)
    for member in (0, 1, 2):     # the anchor too: the group adds the stage's update once, not three times
        assert np.allclose(got[f"{member}.self_attn.q_proj.B"], trained["1.self_attn.q_proj.B"] / 3)
        assert np.array_equal(got[f"{member}.self_attn.q_proj.A"], trained["1.self_attn.q_proj.A"])
    assert np.array_equal(got["3.self_attn.v_proj.B"], trained["3.self_attn.v_proj.B"])   # a group of one
    summed = sum(got[f"{m}.self_attn.q_proj.B"] @ got[f"{m}.self_attn.q_proj.A"] for m in (0, 1, 2))
    assert np.allclose(summed, trained["1.self_attn.q_proj.B"] @ trained["1.self_attn.q_proj.A"], atol=1e-5)
    copied = expand_lora(trained, Stage(4, split.groups, split.anchors, 1.0, "copy"))
    assert np.array_equal(copied["0.self_attn.q_proj.B"], trained["1.self_attn.q_proj.B"])


def test_the_hand_over_travels_with_the_stage_and_an_older_stage_is_a_copy():
    stage = Stage(4, STAGE.groups, STAGE.anchors, 1.0, "split")
    assert Stage.from_json(stage.to_json()) == stage
    old = '{"num_layers": 4, "groups": [[0, 1], [2, 3]], "anchors": [1, 2], "beta": 0.2}'
    assert Stage.from_json(old).handover == "copy"
    with pytest.raises(LLMPruneError, match="hand-over 'sum' is not one of split, copy"):
        Stage(4, STAGE.groups, STAGE.anchors, 1.0, "sum")
    assert DEFAULT_BETA == 1.0 and build_stages(np.eye(4), [2, 4], DEFAULT_BETA)[0].handover == "split"


def test_a_stages_training_lowers_the_next_stages_starting_loss():
    """On a tiny model: LoRA trained on the 2-layer stage model (fused at the default beta), handed
    over by the default split, starts the whole model at a lower loss on held-out windows of the
    same text than no stage training would."""
    from llmprune.fedrecover.lora import lora_applied
    from llmprune.fedrecover.task import chunked_lm_loss, train_lora

    torch.manual_seed(0)
    model = tiny_model("llama")
    model.eval()
    pattern = torch.arange(7, 7 + 12)                          # a text the random model has not seen
    windows = torch.stack([torch.roll(pattern.repeat(3), -i)[:32] for i in range(12)])
    train, held = windows[:8], windows[8:]
    shapes = module_shapes(model, ("q_proj", "v_proj", "up_proj", "down_proj"))
    stage = build_stages(np.eye(4) * 0.5 + 0.5, [2, 4], DEFAULT_BETA)[0]
    start = init_arrays(shapes, list(shapes), rank=4, seed=0)
    local = stage.submodel().to_local({k: v for k, v in start.items()
                                       if k.rsplit(".", 1)[0] in set(stage_modules(shapes, stage))})
    trained, _ = train_lora(fuse_model(copy.deepcopy(model), stage), local, train, scale=2.0, steps=20,
                            batch_size=4, lr=1e-2, seed=0)
    handed = expand_lora({**start, **stage.submodel().to_global(trained)}, stage)
    with torch.no_grad():
        untrained = chunked_lm_loss(model, held).item()        # B = 0: no stage training
        with lora_applied(model, handed, 2.0):
            after = chunked_lm_loss(model, held).item()
    assert after < untrained - 0.05, (untrained, after)


def test_the_server_hands_over_the_share_of_the_update_its_text_prefers():
    """The policy tries B x 1, 1/2, 1/4, 0 on its own evaluation and keeps the best; `copy` (DevFT
    as published) hands over the whole update without asking."""
    from types import SimpleNamespace

    from llmprune.fedrecover import RecoverConfig
    from llmprune.fedrecover.devft import HANDOVER_SCALES
    from llmprune.fedrecover.policies.devft import StagePolicy

    shapes = module_shapes(tiny_model("llama"), ("q_proj",))
    split = Stage(4, ((0, 1), (2, 3)), (1, 2), 1.0, "split")
    trained = {k: v + 1.0 for k, v in init_arrays(shapes, stage_modules(shapes, split), rank=2, seed=1).items()}
    full_b = np.abs(expand_lora(trained, split)["1.self_attn.q_proj.B"]).sum()
    asked = []

    def evaluate(arrays, rows):     # the server's perplexity: best where B is a quarter of the update
        share = np.abs(arrays["1.self_attn.q_proj.B"]).sum() / full_b
        asked.append(round(float(share), 6))
        return 10.0 + (share - 0.25) ** 2

    policy = StagePolicy(RecoverConfig.of(policy="devft", devft_stages="2,all"))
    policy.run = SimpleNamespace(evaluate=evaluate, state=SimpleNamespace(rows=None))
    arrays, scale = policy.handed_over(trained, split)
    assert asked == list(HANDOVER_SCALES) and scale == 0.25
    assert np.allclose(arrays["0.self_attn.q_proj.B"], trained["1.self_attn.q_proj.B"] / 2 * 0.25)
    asked.clear()
    again, scale = policy.handed_over(trained, split, 0.25)        # the share already chosen: no evaluation
    assert scale == 0.25 and asked == [] and all(np.array_equal(again[k], arrays[k]) for k in arrays)
    copied, scale = policy.handed_over(trained, Stage(4, split.groups, split.anchors, 1.0, "copy"))
    assert scale == 1.0 and asked == [] and np.array_equal(copied["0.self_attn.q_proj.B"], trained["1.self_attn.q_proj.B"])
