"""Fixtures of the export tests: tiny pruned models of every supported architecture (a dropped
layer, per-layer MLP widths, pruned query heads, least-squares output biases), built in memory in
milliseconds, and their exports (cached per session, read only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmprune.checkpoint import pruned_class
from llmprune.export import ExportConfig, export_onnx
from llmprune.testing import tiny_config, tiny_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# (MLP width, query heads, output biases) of the 3 layers kept out of 4: layer 1 was dropped.
PRUNED_LAYERS = [(96, 2, False), (40, 4, True), (128, 2, False)]
LAYER_MAP = [0, 2, 3]


def pruned_tiny_model(arch: str, seed: int = 0, biases: bool = True):
    """A tiny model of `arch` with pruned shapes, randomly initialised (eval mode, float32);
    biases=False: no least-squares output biases (what llama.cpp's Gemma-3 and Qwen graphs take)."""
    from transformers import AutoModelForCausalLM

    overrides = {"num_hidden_layers": 3}
    if arch == "gemma3_text":  # the original pattern [s, s, f, s] with layer 1 dropped
        overrides["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    config = tiny_config(arch, **overrides)
    config.llmprune = {
        "format_version": 1,
        "layers": [{"intermediate_size": w, "num_attention_heads": h, "mlp_out_bias": b, "attn_out_bias": b}
                   for w, h, b in ((w, h, b and biases) for w, h, b in PRUNED_LAYERS)],
        "layer_map": LAYER_MAP, "original_num_hidden_layers": 4,
    }
    torch.manual_seed(seed)
    stock = AutoModelForCausalLM._model_mapping[type(config)]
    model = pruned_class(stock)(config).eval()
    with torch.no_grad():  # non-zero biases so that they matter in the parity check
        for layer in model.model.layers:
            for lin in (layer.mlp.down_proj, layer.self_attn.o_proj):
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
    return model


def fast_config(**overrides) -> ExportConfig:
    """Small checks on one thread (tiny models run fastest that way on a busy machine)."""
    base = dict(threads=1, parity_tokens=32, eval_windows=2, eval_seq_len=64)
    return ExportConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def pruned_export(tmp_path_factory, tok):
    """Factory: pruned_export(arch, **config) -> (model, ExportResult), cached per session (read only)."""
    made: dict = {}

    def make(arch: str, **config):
        key = (arch, tuple(sorted(config.items())))
        if key not in made:
            torch.set_num_threads(1)
            model = pruned_tiny_model(arch)
            out = tmp_path_factory.mktemp(f"onnx-{arch}") / "onnx"
            made[key] = (model, export_onnx(model, fast_config(**config), out, tokenizer=tok))
        return made[key]

    return make


@pytest.fixture(scope="session")
def pruned_checkpoint(tmp_path_factory, tok) -> Path:
    """A pruned tiny Gemma-3 checkpoint folder as `llmprune compress` writes it (modeling file, shapes)."""
    from llmprune.checkpoint import save_pruned

    out = tmp_path_factory.mktemp("pruned-ckpt") / "ckpt"
    save_pruned(pruned_tiny_model("gemma3_text"), tok, out, layer_map=LAYER_MAP)
    return out
