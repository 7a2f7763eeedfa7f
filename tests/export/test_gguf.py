"""GGUF export: the file holds what was written (read back with the gguf package), loads in a
second reader (transformers' GGUF loader) and, where llama.cpp is installed (scripts/llama_cpp.sh),
computes in llama.cpp what PyTorch computes — uniform models as their own architecture, non-uniform
Llama-family models as `deci`, non-uniform Gemma-3 / Qwen zero-padded (exactly); and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmprune.arch import rope_parameters
from llmprune.errors import LLMPruneError
from llmprune.export import ExportConfig, export_onnx
from llmprune.export.gguf import check_block_rows, read_back, write_gguf
from llmprune.export.gguf_layout import layer_widths, pad_to_widest, plan_layout
from llmprune.export.gguf_vocab import vocab_fields
from llmprune.export.llama_cpp import LlamaCppModel, llama_cpp_module
from llmprune.testing import tiny_checkpoint, tiny_model

from ..cli.test_cli import assert_one_line_error
from ..conftest import run_main
from .conftest import ARCHS, pruned_tiny_model

TEXT = "hello world, the cat sat on the mat. the dog ran to the park! " * 2
needs_llama_cpp = pytest.mark.skipif(llama_cpp_module() is None,
                                     reason="llama.cpp not installed (bash scripts/llama_cpp.sh)")


def _gguf_fields(path) -> dict:
    import gguf

    return {name: field.contents() for name, field in gguf.GGUFReader(str(path)).fields.items()}


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_model_reads_back_exactly(arch, tok, tmp_path):
    model = tiny_model(arch).eval()
    path = tmp_path / "m.gguf"
    layout = write_gguf(model, tok, path, "f32")
    back = read_back(path, model, layout)
    fields = _gguf_fields(path)
    expected = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}[arch]
    assert back["architecture"] == expected and back["max_abs_diff"] == 0.0
    assert fields[f"{expected}.block_count"] == model.config.num_hidden_layers
    assert fields[f"{expected}.feed_forward_length"] == model.config.intermediate_size
    assert fields["tokenizer.ggml.tokens"] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_transformers_loads_the_file_to_the_same_logits(arch, tok, tmp_path):
    """A second, independent reader: the q/k row order and tensor names are right."""
    from llmprune.models import ModelSource, load_model

    model = tiny_model(arch).eval()
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, "f32")
    loaded = load_model(ModelSource("gguf", str(path)), dtype=torch.float32)
    ids = tok(TEXT)["input_ids"]
    assert np.abs(_logits(model, ids) - _logits(loaded, ids)).max() < 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3_text"])
def test_zero_padding_leaves_outputs_unchanged(arch, tok):
    model = pruned_tiny_model(arch, biases=False)
    ids = tok(TEXT)["input_ids"]
    before = _logits(model, ids)
    assert plan_layout(model).pad
    widths = pad_to_widest(model)
    assert {(w.intermediate, w.query_heads) for w in widths} == {(128, 4)}
    assert np.abs(_logits(model, ids) - before).max() < 1e-5
    assert plan_layout(model).uniform and not plan_layout(model).pad
    assert [s["intermediate_size"] for s in model.config.llmprune["layers"]] == [128, 128, 128]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_non_uniform_llama_family_is_deci_with_per_layer_widths(arch, tok, tmp_path):
    model = pruned_tiny_model(arch)  # output biases included: deci adds them
    path = tmp_path / "m.gguf"
    layout = write_gguf(model, tok, path, "f32")
    fields = _gguf_fields(path)
    assert layout.arch == "deci" and read_back(path, model, layout)["max_abs_diff"] == 0.0
    assert fields["deci.feed_forward_length"] == [96, 40, 128]
    assert fields["deci.attention.head_count"] == [2, 4, 2] and fields["deci.attention.head_count_kv"] == [2, 2, 2]
    assert [w.intermediate for w in layer_widths(model)] == [96, 40, 128]  # deci needs no padding


def test_gemma3_sliding_layers_are_written_per_layer(tok, tmp_path):
    model = pruned_tiny_model("gemma3_text", biases=False)  # [s, f, s]: no period-6 pattern after pruning
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, "f16")
    fields = _gguf_fields(path)
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, True]
    assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(rope_parameters(model.config, "sliding_attention")["rope_theta"])


def test_sentencepiece_vocab_scores_follow_merge_order(tmp_path):
    """An SPM-style tokenizer (the kind llmprune builds for Gemma GGUFs) round-trips through the
    written fields: the tokenizer llmprune builds back from the file splits text the same way."""
    from llmprune.gguf_tokenizer import build_spm_tokenizer, gguf_tokenizer

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + list("▁abcdehilmnorstw") + [
        "▁t", "he", "▁the", "at", "▁c", "▁cat", "▁s", "▁sat", "▁o", "▁on", "ll", "▁he", "▁hell", "▁hello"]
    types = np.array([3, 3, 3, 2] + [6] * 256 + [1] * (len(pieces) - 260))
    scores = np.array([0.0] * 260 + [-100.0] * 16 + [-float(i) for i in range(len(pieces) - 276)])
    vocab = {"model": "llama", "tokens": pieces, "scores": scores, "types": types, "bos_id": 2, "eos_id": 1,
             "unk_id": 3, "pad_id": 0, "add_bos": True, "add_eos": False, "add_space_prefix": True}
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = build_spm_tokenizer(vocab)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                  pad_token="<pad>")
    fields = vocab_fields(tok, len(pieces))
    assert fields.model == "llama" and fields.add_space_prefix and fields.add_bos
    assert fields.types[:4] == [3, 3, 3, 2] and set(fields.types[4:260]) == {6}
    model = tiny_model("llama", vocab_size=len(pieces)).eval()
    path = tmp_path / "spm.gguf"
    write_gguf(model, tok, path, "f32")
    back = gguf_tokenizer(path)
    for text in ("hello the cat sat on the mat", "the cat, ëh?"):
        assert back(text)["input_ids"] == tok(text)["input_ids"]


def test_block_types_refuse_rows_they_cannot_store(tok):
    model = pruned_tiny_model("llama")  # one layer is 40 neurons wide: not a multiple of 32
    with pytest.raises(LLMPruneError, match=r"blocks of 32.*model.layers.1.mlp.down_proj.weight: rows of 40.*--uniform"):
        check_block_rows(model, "q8_0")
    with pytest.raises(LLMPruneError, match=r"multiples of 256, and none"):
        check_block_rows(tiny_model("llama"), "q4_k_m")  # 64-wide: K-quants fit no weight
    assert check_block_rows(model, "f16")["block"] == 1


def test_unsupported_models_are_refused(tok):
    with pytest.raises(LLMPruneError, match="output biases.*gemma3 graph"):
        plan_layout(pruned_tiny_model("gemma3_text"))
    model = tiny_model("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(LLMPruneError, match="rope scaling 'yarn'"):
        write_gguf(model, tok, "/nonexistent/never-written.gguf", "f32")
    with pytest.raises(LLMPruneError, match="--ort is for ONNX files"):
        ExportConfig(format="gguf", ort=True)
    with pytest.raises(LLMPruneError, match="--format gguf has no quantization 'int4'"):
        ExportConfig(format="gguf", quantize="int4")
    with pytest.raises(LLMPruneError, match="--format onnx has no quantization 'q4_k_m'"):
        ExportConfig(quantize="q4_k_m")


def test_k_quant_without_llama_cpp_is_refused_before_any_work(tok, tmp_path, monkeypatch):
    from llmprune.export import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_cpp_module", lambda: None)
    model = tiny_model("llama", hidden_size=256, intermediate_size=512).eval()
    with pytest.raises(LLMPruneError, match="q4_k_m needs llama.cpp's quantizer.*scripts/llama_cpp.sh"):
        export_onnx(model, ExportConfig(format="gguf", quantize="q4_k_m"), tmp_path / "out", tokenizer=tok)
    assert not (tmp_path / "out").exists()


def test_cli_writes_gguf_folder_and_refuses_in_one_line(tok, tmp_path, pruned_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "qwen2")
    out = tmp_path / "gguf"
    result = run_main("export", "--model", ckpt, "--out", out, "--format", "gguf", "--quantize", "f16", "q8_0",
                      "--eval-windows", "2", "--eval-seq-len", "32", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "model-f16.gguf", "model-q8_0.gguf"]
    assert report["gguf"]["architecture"] == "qwen2" and report["variants"]["f16"]["read_back"]["max_rel_diff"] < 1e-3
    assert report["variants"]["q8_0"]["bytes"] < report["variants"]["f16"]["bytes"]
    bad = tmp_path / "bad"
    refused = run_main("export", "--model", pruned_checkpoint, "--out", bad, "--format", "gguf", cwd=tmp_path)
    assert_one_line_error(refused, "output biases")
    assert not bad.exists()


@needs_llama_cpp
@pytest.mark.parametrize("arch,biases", [(a, False) for a in ARCHS] + [("llama", True)])
def test_llama_cpp_computes_what_pytorch_does(arch, biases, tok, tmp_path):
    """Uniform and pruned (deci / padded) files in llama.cpp itself: logits and greedy tokens."""
    for model in (tiny_model(arch).eval(), pruned_tiny_model(arch, biases=biases)):
        ids = tok(TEXT)["input_ids"]
        reference = _logits(model, ids)
        path = tmp_path / f"{arch}.gguf"
        write_gguf(model, tok, path, "f32")
        engine = LlamaCppModel(path, n_ctx=128, threads=1)
        try:
            got = engine.logits(ids)
            greedy, _ = engine.generate(ids[:8], 12)
        finally:
            engine.close()
        assert np.abs(got - reference).max() < 2e-3 * max(1.0, np.abs(reference).max())
        with torch.no_grad():
            torch_greedy = model.generate(torch.tensor([ids[:8]]), max_new_tokens=12, do_sample=False,
                                          pad_token_id=0)[0, 8:].tolist()
        assert greedy[:len(torch_greedy)] == torch_greedy


@needs_llama_cpp
def test_k_quant_file_is_smaller_and_close(tok, tmp_path):
    model = tiny_model("llama", hidden_size=256, intermediate_size=512).eval()
    config = ExportConfig(format="gguf", quantize=("f16", "q4_k_m"), threads=1, eval_windows=2, eval_seq_len=32)
    report = export_onnx(model, config, tmp_path / "out", tokenizer=tok).report
    f16, q4 = report["variants"]["f16"], report["variants"]["q4_k_m"]
    assert not (tmp_path / "out" / "model-f32.gguf").exists()   # the quantizer's source is not kept
    assert q4["bytes"] < 0.45 * f16["bytes"]
    # (greedy equality is checked on f32 above: f16 rounding may flip a random tiny model's near ties)
    assert abs(f16["llama_cpp"]["perplexity_change_vs_torch"]) < 0.01
    assert abs(q4["llama_cpp"]["perplexity_change_vs_torch"]) < 0.1


def test_block_sizes_are_checked_on_the_padded_widths(tok, tmp_path):
    """A Gemma-3 layer 40 neurons wide is stored 128 wide after padding: q8_0's 32-blocks fit."""
    model = pruned_tiny_model("gemma3_text", biases=False)
    config = ExportConfig(format="gguf", quantize="q8_0", threads=1, eval_windows=2, eval_seq_len=32)
    report = export_onnx(model, config, tmp_path / "out", tokenizer=tok).report
    assert report["gguf"]["padded"] and report["gguf"]["widths_before_padding"]["intermediate"] == [96, 40, 128]
    assert report["gguf"]["widths"]["intermediate"] == [128, 128, 128]
    assert report["variants"]["q8_0"]["read_back"]["max_rel_diff"] < 0.02
