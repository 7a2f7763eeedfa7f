"""The method registry: every method is one entry; a new one is one module plus one registration."""

from __future__ import annotations

import pytest
import torch

from llmprune.compress import METHODS, CompressConfig, PruningMethod, compress
from llmprune.compress.methods import magnitude
from llmprune.errors import LLMPruneError
from llmprune.testing import tiny_model


def test_every_registered_method_is_complete():
    assert list(METHODS) == ["comp", "layer-only", "wanda-sp", "magnitude", "fluctuation", "random", "taylor"]
    for name, method in METHODS.items():
        assert method.name == name and method.summary
        assert (method.neuron_scores is None) != (method.neuron_order is None)
    assert [n for n, m in METHODS.items() if not m.low_memory] == ["taylor"]
    assert [n for n, m in METHODS.items() if m.needs_gradients] == ["taylor"]


def test_defaults_come_from_the_registry():
    assert CompressConfig(method="comp").effective_layer_share == "auto"
    assert CompressConfig(method="layer-only").effective_layer_share == 1.0
    assert CompressConfig(method="wanda-sp").effective_allocation == "uniform"
    assert CompressConfig(method="wanda-sp").fit_mode == "none" and CompressConfig(method="comp").fit_mode == "refit"
    assert CompressConfig(method="fluctuation").uses_intercept and not CompressConfig(method="comp").uses_intercept


def test_a_new_method_is_one_registration(monkeypatch, tok, calib_texts, small_config):
    def up_norm(layer, stats, cfg, index):
        return layer.mlp.up_proj.weight.detach().double().norm(dim=1)

    monkeypatch.setitem(METHODS, "up-norm", PruningMethod(name="up-norm", summary="‖up_j‖", neuron_scores=up_norm,
                                                          head_scores=magnitude.head_scores))
    model = tiny_model("llama")
    up = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    report = compress(model, small_config(ratio=0.2, method="up-norm"), tokenizer=tok, calib=calib_texts).report
    assert report["method"] == "up-norm"
    kept = report["layers"][1]["kept_neuron_indices"]
    best = up.double().norm(dim=1).argsort(descending=True)[: len(kept)].sort().values.tolist()
    assert kept == best
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, up[kept])


def test_a_method_needs_exactly_one_neuron_rule():
    with pytest.raises(ValueError, match="exactly one"):
        PruningMethod(name="x", summary="x", head_scores=magnitude.head_scores)


def test_low_memory_refusal_names_the_methods_that_have_it():
    with pytest.raises(LLMPruneError, match="no --low-memory path") as info:
        CompressConfig(method="taylor", low_memory=True)
    assert "comp" in str(info.value) and "taylor" not in str(info.value).split("choose one of:")[1]
