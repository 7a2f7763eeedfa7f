"""The parameter budget: layers, heads and neurons removed for a ratio."""

from __future__ import annotations

import numpy as np
import pytest

from llmprune.compress.budget import (
    choose_drop,
    error_allocation,
    head_params,
    heads_to_keep,
    layer_params,
    make_plan,
    max_droppable,
    neuron_counts,
    neuron_params,
)
from llmprune.errors import LLMPruneError
from llmprune.testing import tiny_model


@pytest.fixture(scope="module")
def layers():
    return list(tiny_model("llama").model.layers)


def test_unit_costs_of_the_tiny_llama(layers):
    layer = layers[0]
    # hidden 64: a neuron is a gate row, an up row and a down column; a query head 16 q rows + 16 o columns.
    assert neuron_params(layer) == 3 * 64
    assert head_params(layer) == 16 * 64 + 16 * 64
    assert layer_params(layer) == sum(p.numel() for p in layer.parameters())


def test_choose_drop_never_takes_layer_zero():
    assert choose_drop([0.0, 0.5, 0.1, 0.3], 1) == [2]
    assert choose_drop([0.0, 0.5, 0.1, 0.3], 2) == [2, 3]
    assert choose_drop([0.0, 0.5, 0.1, 0.3], 3) == [1, 2, 3]
    assert choose_drop([0.2, 0.2, 0.2, 0.2], 2) == [1, 2]  # ties: lower index first


def test_neuron_counts_are_uniform_and_exact():
    widths = {0: 128, 2: 128, 3: 64}
    kept = neuron_counts(widths, 100)
    assert sum(widths.values()) - sum(kept.values()) == 100
    for i, w in widths.items():
        assert abs((w - kept[i]) - w * 100 / 320) < 1.0
    with pytest.raises(LLMPruneError, match="no MLP neuron"):
        neuron_counts(widths, 320)


def test_error_allocation_prunes_where_the_error_is_cheap():
    widths = {0: 8, 1: 8}
    flat = np.linspace(1.0, 0.0, 9) ** 8  # losing the last neurons costs almost nothing
    steep = np.linspace(1.0, 0.0, 9)  # every neuron costs the same
    kept = error_allocation(widths, 6, {0: flat, 1: steep}, min_keep=0.25)
    assert sum(kept.values()) == 16 - 6
    assert kept[0] == 2 and kept[1] == 8  # layer 0 is cut to its floor (25% of 8) first
    kept = error_allocation(widths, 8, {0: flat, 1: steep}, min_keep=0.25)
    assert kept == {0: 2, 1: 6}
    with pytest.raises(LLMPruneError, match="minimum kept fraction"):
        error_allocation(widths, 13, {0: flat, 1: steep}, min_keep=0.25)


def test_heads_to_keep_respects_kv_groups(layers):
    layer = layers[0]  # 4 query heads, 2 KV heads: 2 per group
    assert heads_to_keep(layer, 0.5) == 2
    assert heads_to_keep(layer, 0.1) == 4
    assert heads_to_keep(layer, 0.99) == 2  # at least one per group
    assert heads_to_keep(layer, 0.5) % 2 == 0


def test_heads_are_never_pruned_without_grouped_query_attention():
    layer = tiny_model("llama", num_key_value_heads=4).model.layers[0]
    assert heads_to_keep(layer, 0.9) == 4


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.37, 0.5])
@pytest.mark.parametrize("n_drop", [0, 1])
def test_make_plan_removes_the_ratio(layers, ratio, n_drop):
    total = sum(layer_params(l) for l in layers)
    if n_drop * layer_params(layers[1]) > ratio * total:
        with pytest.raises(LLMPruneError, match="removes more than"):
            make_plan(layers, [0.0, 0.3, 0.1, 0.2], ratio, n_drop)
        return
    plan = make_plan(layers, [0.0, 0.3, 0.1, 0.2], ratio, n_drop)
    assert plan.drop == ([2] if n_drop else [])
    assert set(plan.keep_neurons) == {i for i in range(4) if i not in plan.drop}
    removed = sum(layer_params(layers[i]) for i in plan.drop)
    removed += sum((128 - k) * neuron_params(layers[0]) for k in plan.keep_neurons.values())
    assert abs(removed - ratio * total) <= neuron_params(layers[0]) / 2 + 1e-6


def test_make_plan_with_heads_and_output_bias(layers):
    total = sum(layer_params(l) for l in layers)
    plan = make_plan(layers, [0.0, 0.3, 0.1, 0.2], 0.3, 0, head_ratio=0.5, output_bias=True)
    assert plan.keep_heads == {0: 2, 1: 2, 2: 2, 3: 2}
    removed = 4 * 2 * head_params(layers[0])
    removed += sum((128 - k) * neuron_params(layers[0]) for k in plan.keep_neurons.values())
    added = 4 * (64 + 64)  # a new bias on every pruned down_proj and o_proj
    assert abs(removed - added - 0.3 * total) <= neuron_params(layers[0]) / 2 + 1e-6
    with pytest.raises(LLMPruneError, match="head-ratio"):
        make_plan(layers, [0.0, 0.3, 0.1, 0.2], 0.05, 0, head_ratio=0.5)


def test_make_plan_that_leaves_no_neuron(layers):
    with pytest.raises(LLMPruneError, match="no MLP neuron"):
        make_plan(layers, [0.0, 0.3, 0.1, 0.2], 0.9, 0)
    with pytest.raises(LLMPruneError, match="minimum kept fraction"):
        make_plan(layers, [0.0, 0.3, 0.1, 0.2], 0.6, 0, curves={i: np.linspace(1, 0, 129) for i in range(4)}, min_keep=0.25)


def test_max_droppable(layers):
    assert max_droppable(layers, 0.1) == 0
    assert max_droppable(layers, 0.25) == 1
    assert max_droppable(layers, 0.74) == 2
    assert max_droppable(layers, 0.99) == 3  # never all of them


@pytest.mark.parametrize("ratio,n_drop", [(0.1, 0), (0.2, 0), (0.37, 0), (0.37, 1), (0.5, 1)])  # a layer is 25%
def test_uniform_plan_keeps_one_width_in_multiples_and_meets_the_ratio(layers, ratio, n_drop):
    total = sum(layer_params(l) for l in layers)
    plan = make_plan(layers, [0.0, 0.3, 0.1, 0.2], ratio, n_drop, uniform_multiple=32)
    widths = set(plan.keep_neurons.values())
    assert len(widths) == 1 and next(iter(widths)) % 32 == 0
    removed = sum(layer_params(layers[i]) for i in plan.drop)
    removed += sum((128 - k) * neuron_params(layers[0]) for k in plan.keep_neurons.values())
    assert removed >= ratio * total - neuron_params(layers[0]) / 2  # rounded down: at least the ratio is removed
    assert removed - ratio * total < 32 * len(plan.keep_neurons) * neuron_params(layers[0])  # by less than one step


def test_uniform_plan_refusals(layers):
    with pytest.raises(LLMPruneError, match="fewer than 256 MLP neurons per layer.*--uniform-multiple"):
        make_plan(layers, [0.0, 0.3, 0.1, 0.2], 0.2, 0, uniform_multiple=256)  # the tiny model is 128 wide


def test_compress_uniform_writes_uniform_widths(tok, calib_texts, small_config):
    from llmprune.compress import compress
    from llmprune.export.gguf_layout import layer_widths

    result = compress(tiny_model("gemma3_text"), small_config(ratio=0.3, uniform=True, uniform_multiple=32),
                      tokenizer=tok, calib=calib_texts)
    widths = {w.intermediate for w in layer_widths(result.model)}
    assert len(widths) == 1 and next(iter(widths)) % 32 == 0
    assert 0.3 - 0.01 <= result.report["ratio_achieved"] < 0.45  # rounded down to a multiple: a little more removed
    with pytest.raises(LLMPruneError, match="--uniform keeps one MLP width"):
        small_config(uniform=True, allocation="error")
