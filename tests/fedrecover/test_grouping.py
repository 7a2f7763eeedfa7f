"""Unit grouping and scheduling for submodels: profiles of tiny models of every architecture,
linear CKA, average-linkage grouping, importance- and staleness-weighted draws, and the
schedule's coverage and resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmprune.arch import SUPPORTED_ARCHITECTURES
from llmprune.errors import LLMPruneError
from llmprune.fedrecover.grouping import (
    MLP_INPUT_NORMS,
    UnitSchedule,
    cka_matrix,
    draw_units,
    group_units,
    linear_cka,
    mlp_input_norm,
    selection_weights,
    unit_profiles,
)
from llmprune.fedrecover.lora import lora_applied
from llmprune.testing import tiny_model

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def windows(n: int = 5, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 320, (n, seq_len), generator=g)
    x[:, 0] = 1
    return x


def block_similarity(blocks: list[list[int]], n: int, seed: int = 0) -> np.ndarray:
    """High similarity inside each block, low across, with a little symmetric noise."""
    rng = np.random.default_rng(seed)
    sim = rng.uniform(0.0, 0.2, (n, n))
    for b in blocks:
        sim[np.ix_(b, b)] = rng.uniform(0.7, 0.9, (len(b), len(b)))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    return sim


# ---- grouping -------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", [
    [[0, 1, 2], [3, 4], [5]],
    [[0, 3, 5], [1, 2], [4]],
    [[0, 7], [1, 4, 6], [2, 3, 5, 8]],
])
def test_group_units_recovers_blocks(blocks):
    n = sum(len(b) for b in blocks)
    assert group_units(block_similarity(blocks, n), len(blocks)) == sorted(sorted(b) for b in blocks)


def test_group_units_edges_and_ties():
    sim = block_similarity([[0, 3, 5], [1, 2], [4]], 6)
    assert group_units(sim, 1) == [[0, 1, 2, 3, 4, 5]]
    assert group_units(sim, 6) == [[i] for i in range(6)]
    # all distances equal: ties merge the lowest indices first, and again with the merged group
    flat = np.full((4, 4), 0.5)
    np.fill_diagonal(flat, 1.0)
    assert group_units(flat, 3) == [[0, 1], [2], [3]]
    assert group_units(flat, 2) == [[0, 1, 2], [3]]
    for bad in (0, 7, -1, 2.5):
        with pytest.raises(ValueError):
            group_units(sim, bad)
    with pytest.raises(ValueError):
        group_units(np.ones((3, 4)), 2)


def test_group_units_average_linkage():
    # 0-1 closest; then {0,1}-2 has average distance (0.2 + 0.8) / 2 = 0.5, worse than 2-3 at 0.4
    # (single linkage would take 0.2 and merge 2 into {0,1})
    d = np.array([[0, 0.1, 0.2, 0.9], [0.1, 0, 0.8, 0.9], [0.2, 0.8, 0, 0.4], [0.9, 0.9, 0.4, 0]])
    assert group_units(1 - d, 2) == [[0, 1], [2, 3]]


# ---- CKA ------------------------------------------------------------------------------------

def test_linear_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.7 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-10)  # rotation, scale, shift
    assert linear_cka(x, rng.standard_normal((400, 32))) < 0.15  # independent
    assert linear_cka(x, x[:, :8]) < 0.99  # a part is not the whole
    with pytest.raises(ValueError):
        linear_cka(x, x[:10])


def test_cka_matrix_matches_pairs():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((300, 16))
    feats = [base, base @ rng.standard_normal((16, 16)), rng.standard_normal((300, 16)),
             (2 * base).astype(np.float32), np.zeros((300, 16))]
    sim = cka_matrix(feats)
    assert sim.dtype == np.float64 and sim.shape == (5, 5)
    np.testing.assert_array_equal(sim, sim.T)
    np.testing.assert_array_equal(np.diag(sim), np.ones(5))
    for i in range(4):
        for j in range(4):
            if i != j:
                assert sim[i, j] == pytest.approx(linear_cka(feats[i], feats[j]), abs=1e-10)
    assert sim[0, 3] == pytest.approx(1.0) and sim[0, 2] < 0.2
    np.testing.assert_array_equal(sim[4, :4], 0.0)  # no signal: similar to nothing
    with pytest.raises(ValueError):
        cka_matrix([base, base[:10]])


# ---- draws ----------------------------------------------------------------------------------

def test_selection_weights():
    imp = np.array([0.0, 0.1, 0.5])
    w = selection_weights(imp, np.zeros(3))
    assert np.all(w > 0) and w[0] < w[1] < w[2]
    stale = selection_weights(imp, np.array([4, 0, 0]))
    assert stale[0] == pytest.approx(5 * w[0]) and stale[1:] == pytest.approx(w[1:])
    assert np.all(selection_weights(np.zeros(3), np.zeros(3)) > 0)
    with pytest.raises(ValueError):
        selection_weights(imp, np.array([0, -1, 0]))


def test_draw_units_one_per_group_and_count():
    groups = [[0, 3, 5], [1, 2], [4], [6, 7, 8]]
    weights = selection_weights(np.linspace(0.01, 0.8, 9), np.zeros(9))
    for seed in range(50):
        for count in (4, 5, 7):
            units = draw_units(groups, weights, count, np.random.default_rng(seed))
            assert units == sorted(set(units)) and len(units) == count
            assert all(set(g) & set(units) for g in groups)
    assert draw_units(groups, weights, 9, np.random.default_rng(0)) == list(range(9))
    assert draw_units(groups, weights, 12, np.random.default_rng(0)) == list(range(9))
    with pytest.raises(ValueError):
        draw_units(groups, weights, 3, np.random.default_rng(0))
    with pytest.raises(ValueError):  # not a partition
        draw_units([[0, 1], [1, 2]], weights[:3], 2, np.random.default_rng(0))
    # must units count, and cover their group
    for seed in range(20):
        units = draw_units(groups, weights, 4, np.random.default_rng(seed), must=[3])
        assert 3 in units and not {0, 5} & set(units) and all(set(g) & set(units) for g in groups)
    with pytest.raises(ValueError):
        draw_units(groups, weights, 4, np.random.default_rng(0), must=[0, 3])


def test_draw_units_seeded():
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    weights = np.ones(8)
    draws = [draw_units(groups, weights, 4, np.random.default_rng([3, s])) for s in range(10)]
    assert draws == [draw_units(groups, weights, 4, np.random.default_rng([3, s])) for s in range(10)]
    assert len({tuple(d) for d in draws}) > 3


def test_draw_units_prefers_weight():
    # within a group: unit 0 has 90 % of its group's weight
    counts = np.zeros(4)
    for seed in range(500):
        counts[draw_units([[0, 1], [2, 3]], np.array([9.0, 1.0, 1.0, 1.0]), 2, np.random.default_rng(seed))] += 1
    assert counts[0] > 0.8 * 500 and counts[1] < 0.2 * 500
    assert counts[0] + counts[1] == 500 and counts[2] + counts[3] == 500
    # the free draws too: one group, 3 of 6 units, unit 5 ten times as heavy as the others
    counts = np.zeros(6)
    for seed in range(500):
        counts[draw_units([list(range(6))], np.array([1.0, 1, 1, 1, 1, 10]), 3, np.random.default_rng(seed))] += 1
    assert counts[5] > 0.9 * 500 and counts[:5].max() < 0.75 * 500


# ---- schedule -------------------------------------------------------------------------------

GEMMA_LIKE = np.geomspace(0.009, 0.82, 18)[np.random.default_rng(0).permutation(18)]


def first_held(schedule: UnitSchedule, seed: int, rounds: int, devices: int = 2, count: int = 4) -> np.ndarray:
    first = np.full(schedule.num_units, -1)
    for r in range(1, rounds + 1):
        held = set()
        for d in range(devices):
            held |= set(schedule.draw(r, d, count, seed))
        first[[u for u in held if first[u] < 0]] = r
        schedule.record(held)
    return first


@pytest.mark.parametrize("groups", [
    [list(range(i, 18, 3)) for i in range(3)],  # three groups of six
    [list(range(17)), [17]],  # one large group, one singleton
])
def test_schedule_holds_every_unit(groups):
    for seed in range(8):
        first = first_held(UnitSchedule(groups, GEMMA_LIKE, "sublayer"), seed, 30)
        assert np.all(first > 0), f"seed {seed}: units {np.flatnonzero(first < 0)} never held in 30 rounds"


def test_schedule_prefers_important_units():
    schedule = UnitSchedule([list(range(18))], GEMMA_LIKE, "layer")
    held = np.zeros(18)
    for r in range(1, 101):
        units = schedule.draw(r, 0, 4, seed=5)
        held[units] += 1
        schedule.record(units)
    assert held[np.argmax(GEMMA_LIKE)] > 2 * held[np.argmin(GEMMA_LIKE)]


def test_schedule_draws_are_order_free_and_staleness():
    schedule = UnitSchedule([[0, 1, 2], [3, 4, 5]], np.linspace(0.1, 0.6, 6), "layer")
    a = [schedule.draw(1, d, 3, seed=0) for d in (0, 1, 2)]
    b = [schedule.draw(1, d, 3, seed=0) for d in (2, 1, 0)][::-1]
    assert a == b
    schedule.record({0, 4})
    np.testing.assert_array_equal(schedule.staleness, [0, 1, 1, 1, 0, 1])
    schedule.record([4])
    np.testing.assert_array_equal(schedule.staleness, [1, 2, 2, 2, 0, 2])
    with pytest.raises(ValueError):
        schedule.record([6])
    with pytest.raises(ValueError):
        UnitSchedule([[0, 1], [2]], np.ones(3), "sublayer")  # odd unit count


def test_schedule_state_round_trip():
    schedule = UnitSchedule([list(range(0, 18, 2)), list(range(1, 18, 2))], GEMMA_LIKE, "sublayer")
    first_held(schedule, seed=3, rounds=5)
    state = json.loads(json.dumps(schedule.state_dict()))
    resumed = UnitSchedule([[0]], np.ones(1), "layer")
    resumed.load_state_dict(state)
    assert resumed.num_units == 18 and resumed.num_layers == 9 and resumed.granularity == "sublayer"
    for r in range(6, 12):
        draws = [schedule.draw(r, d, 5, seed=3) for d in range(2)]
        assert draws == [resumed.draw(r, d, 5, seed=3) for d in range(2)]
        schedule.record(set().union(*draws))
        resumed.record(set().union(*draws))
    assert UnitSchedule.from_state_dict(schedule.state_dict()).state_dict() == schedule.state_dict()


# ---- profiles -------------------------------------------------------------------------------

def test_mlp_input_norms_cover_supported_architectures():
    assert set(MLP_INPUT_NORMS) == set(SUPPORTED_ARCHITECTURES)
    with pytest.raises(LLMPruneError, match="gpt2"):
        mlp_input_norm(SimpleNamespace(model_type="gpt2"))


@pytest.mark.parametrize("arch", ARCHS)
def test_unit_profiles(arch):
    model = tiny_model(arch)
    layers = model.config.num_hidden_layers
    with torch.no_grad():  # silence layer 1's MLP and layer 2's attention: their contributions vanish
        model.model.layers[1].mlp.down_proj.weight.zero_()
        model.model.layers[2].self_attn.o_proj.weight.zero_()
    x = windows()
    imp_l, feat_l = unit_profiles(model, x, "layer", max_tokens=60)
    imp_s, feat_s = unit_profiles(model, x, "sublayer", max_tokens=60)
    assert imp_l.shape == (layers,) and imp_s.shape == (2 * layers,)
    assert len(feat_l) == layers and len(feat_s) == 2 * layers
    assert all(f.shape == (60, 64) and f.dtype == np.float32 for f in feat_l + feat_s)
    assert np.all((imp_l >= 0) & (imp_l <= 2)) and np.all((imp_s >= 0) & (imp_s <= 2))
    # the blocks split the layer: same tokens, contributions add up
    for i in range(layers):
        np.testing.assert_allclose(feat_s[2 * i] + feat_s[2 * i + 1], feat_l[i], rtol=1e-5, atol=1e-5)
        if i != 2:
            assert imp_s[2 * i] > 1e-4
    # the hook between the blocks sits on the residual stream (for Gemma: not on the attention output)
    assert np.abs(feat_s[3]).max() < 1e-6 and imp_s[3] < 1e-6
    assert np.abs(feat_s[4]).max() < 1e-6 and imp_s[4] < 1e-6
    assert np.abs(feat_s[2]).max() > 1e-3 and np.abs(feat_s[5]).max() > 1e-3
    # deterministic, and every position but BOS is a candidate when max_tokens allows
    imp_again, feat_again = unit_profiles(model, x, "sublayer", max_tokens=60, batch_size=2)
    np.testing.assert_allclose(imp_again, imp_s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(feat_again[0], feat_s[0], rtol=1e-5, atol=1e-6)
    _, all_tokens = unit_profiles(model, x, "layer", max_tokens=10_000)
    assert all_tokens[0].shape == (5 * 23, 64)


def test_unit_profiles_with_lora_hooks():
    model = tiny_model("llama")
    x = windows(3, 16)
    imp, feat = unit_profiles(model, x, "sublayer", max_tokens=40)
    rng = np.random.default_rng(0)
    arrays = {"1.mlp.down_proj.A": rng.standard_normal((4, 128)).astype(np.float32),
              "1.mlp.down_proj.B": rng.standard_normal((64, 4)).astype(np.float32)}
    with lora_applied(model, arrays, scale=1.0):
        imp_lora, feat_lora = unit_profiles(model, x, "sublayer", max_tokens=40)
    for u in (0, 1, 2):  # below the adapter: unchanged
        np.testing.assert_array_equal(feat_lora[u], feat[u])
        assert imp_lora[u] == imp[u]
    assert np.abs(feat_lora[3] - feat[3]).max() > 1e-3  # the adapted MLP
    with pytest.raises(ValueError):
        unit_profiles(model, x[:, :1], "layer")
    with pytest.raises(ValueError):
        unit_profiles(model, x, "block")
