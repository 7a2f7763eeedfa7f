"""Tiny-model exports of every supported architecture with pruned shapes: parity with PyTorch,
the optimum layout, tied weights stored once, quantized and .ort files, genai_config."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.export import REPORT_FILE, OnnxCausalLM, export_onnx

from .conftest import ARCHS, PRUNED_LAYERS, fast_config, pruned_tiny_model


def _initializer_shapes(path) -> list[tuple]:
    model = onnx.load(str(path))
    return [tuple(i.dims) for i in model.graph.initializer]


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_export_matches_pytorch(arch, pruned_export):
    model, result = pruned_export(arch)
    out = result.path
    fp32 = result.report["variants"]["fp32"]
    assert fp32["logits"]["max_abs_logit_diff"] < 1e-4
    assert fp32["logits"]["max_abs_logit_diff_kv_cache"] < 1e-4
    assert fp32["generation"]["all_equal"] and len(fp32["generation"]["prompts"]) == 3
    assert all(len(r["onnx"]) == 32 or r["onnx"][-1] == model.config.eos_token_id for r in fp32["generation"]["prompts"])
    # The weights are in model.onnx_data (ONNX Runtime maps it); the size counts both files.
    assert (json.loads((out / REPORT_FILE).read_text())["variants"]["fp32"]["sizes"]["onnx_bytes"]
            == (out / "model.onnx").stat().st_size + (out / "model.onnx_data").stat().st_size)

    # The pruned shapes are in the graph as they are: 3 layers of KV cache, each layer's MLP width
    # and query-head count.
    session = OnnxCausalLM(out, threads=1)
    assert session.num_layers == 3 and session.kv_shapes == [(2, 16)] * 3
    shapes = _initializer_shapes(out / "model.onnx")
    for width, heads, _ in PRUNED_LAYERS:
        assert (64, width) in shapes and (width, 64) in shapes  # up/gate and down projections (MatMul layout)
        assert (64, heads * 16) in shapes  # q_proj
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and "auto_map" not in config
    assert [l["intermediate_size"] for l in config["llmprune"]["layers"]] == [w for w, _, _ in PRUNED_LAYERS]
    if arch == "gemma3_text":
        assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
        assert config["sliding_window"] == 16  # parity inputs (48 tokens) and generation run past it
    # Tied embeddings are stored once (the exporter alone writes a transposed copy for the LM head).
    vocab_tables = [s for s in shapes if 320 in s and 64 in s]
    assert len(vocab_tables) == (1 if model.config.tie_word_embeddings else 2), vocab_tables
    if model.config.tie_word_embeddings:
        assert result.report["dedupe"]["removed"] == ["model.embed_tokens.weight"]
        assert result.report["dedupe"]["bytes"] <= result.report["dedupe"]["raw_bytes"] + 1024
        # ... and not copied again by ONNX Runtime's load-time folding of a Transpose of a weight.
        proto = onnx.load(str(out / "model.onnx"))
        weights = {i.name for i in proto.graph.initializer}
        assert not [n.name for n in proto.graph.node if n.op_type == "Transpose" and n.input[0] in weights]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_optimum_loads_and_generates(arch, pruned_export):
    """Users' existing optimum code works on the fp32 folder (optimum-onnx installs beside
    transformers 4.5x only: the `optimum` extra)."""
    ORTModelForCausalLM = pytest.importorskip("optimum.onnxruntime").ORTModelForCausalLM

    model, result = pruned_export(arch)
    ort_model = ORTModelForCausalLM.from_pretrained(result.path)
    ids = torch.tensor([[1, 17, 45, 99, 120, 7, 8, 9]])
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    got = ort_model.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(ref, got)
    with torch.inference_mode():
        diff = (ort_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits - model(ids).logits).abs().max()
    assert diff < 1e-4


def test_int4_ort_genai(pruned_export, tok):
    """int4 (embedding quantized too) + .ort + genai_config on the tied, sliding-window Gemma-3."""
    model, result = pruned_export("gemma3_text", quantize="int4", ort=True, genai=True)
    out = result.path
    report = result.report
    q = report["variants"]["int4"]
    assert (out / "int4" / "model.onnx").is_file() and (out / "int4" / "model.ort").is_file() and (out / "model.ort").is_file()
    # Every MatMul weight and the embedding table are 4-bit: no float table of the vocabulary left.
    proto = onnx.load(str(out / "int4" / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    floats = [tuple(i.dims) for i in proto.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= 320 * 64]
    assert floats == []
    # The tied table is stored once in 4 bits too: the lookup reads the LM head's MatMulNBits weight.
    gather = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    matmul_weights = {n.input[1] for n in proto.graph.node if n.op_type == "MatMulNBits"}
    assert gather.input[0] in matmul_weights and q["quantization"]["tied_table_shared"] == 1
    tables = [i.name for i in proto.graph.initializer
              if 320 in i.dims and i.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.INT4)]
    assert len(tables) == 1, tables
    assert q["sizes"]["onnx_bytes"] < 0.5 * report["variants"]["fp32"]["sizes"]["onnx_bytes"]
    assert q["size_vs_fp32"] == pytest.approx(q["sizes"]["onnx_bytes"] / report["variants"]["fp32"]["sizes"]["onnx_bytes"])
    # Quantized: close to fp32, perplexity change measured on the evaluation windows.
    assert 0 < q["logits"]["max_abs_logit_diff"] < 0.5 * q["logits"]["max_abs_logit"]  # a wrong zero point gives ~8x
    ppl = q["perplexity"]
    assert ppl["onnx"] > 1 and ppl["onnx_fp32"] > 1 and ppl["change"] == pytest.approx(ppl["onnx"] / ppl["onnx_fp32"] - 1)
    assert abs(ppl["change"]) < 0.2
    # The .ort files run and give the .onnx results.
    for name in ("fp32", "int4"):
        assert report["variants"][name]["ort"]["max_abs_logit_diff_vs_onnx"] < 1e-5
    ort_session = OnnxCausalLM(out / "int4", threads=1, prefer_ort=True)
    assert ort_session.path.name == "model.ort"
    assert len(ort_session.generate([1, 5, 6, 7], 8)) == 8
    # genai_config describes the pruned decoder.
    genai = json.loads((out / "int4" / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["num_hidden_layers"] == 3 and decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 16
    assert genai["model"]["type"] == "gemma3_text" and genai["search"]["past_present_share_buffer"] is False
    assert (out / "int4" / "tokenizer.json").is_file()


def test_genai_generates_like_onnxruntime(pruned_export):
    og = pytest.importorskip("onnxruntime_genai")
    _, result = pruned_export("gemma3_text", quantize="int4", ort=True, genai=True)
    for folder in (result.path, result.path / "int4"):
        model = og.Model(str(folder))
        ids = [1, 17, 45, 99, 120, 7]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 10, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        got = []
        while not generator.is_done():
            generator.generate_next_token()
            got.append(int(generator.get_next_tokens()[0]))
        ref = OnnxCausalLM(folder, threads=1).generate(ids, 10)
        assert got and got == ref[: len(got)]
        assert og.Tokenizer(model).decode(got)  # tokenizer files load


def test_genai_prompt_starts_with_bos(pruned_export, tok):
    """onnxruntime-genai's tokenizer adds no BOS by itself (Gemma needs it first): GenaiCausalLM
    encodes prompts as the Hugging Face tokenizer does, BOS first, and generates like onnxruntime."""
    og = pytest.importorskip("onnxruntime_genai")
    from llmprune.export import GenaiCausalLM

    _, result = pruned_export("gemma3_text", quantize="int4", ort=True, genai=True)
    folder = result.path / "int4"
    text = "The quick brown fox"
    want = tok(text)["input_ids"]
    assert want[0] == tok.bos_token_id
    raw = [int(t) for t in og.Tokenizer(og.Model(str(folder))).encode(text)]
    assert raw == want[1:]  # the reason for the wrapper
    lm = GenaiCausalLM(folder)
    assert lm.encode(text) == want
    assert lm.generate(want, 8) == OnnxCausalLM(folder, threads=1).generate(want, 8)


def test_int8(pruned_export):
    model, result = pruned_export("llama", quantize="int8")
    q = result.report["variants"]["int8"]
    proto = onnx.load(str(result.path / "int8" / "model.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    weights = {i.name for i in proto.graph.initializer}
    assert not [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # every weight 8-bit
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    assert {next(a.i for a in n.attribute if a.name == "bits") for n in proto.graph.node if n.op_type == "MatMulNBits"} == {8}
    assert q["size_vs_fp32"] < 0.6
    assert 0 < q["logits"]["max_abs_logit_diff"] < 0.1 * q["logits"]["max_abs_logit"]
    assert abs(q["perplexity"]["change"]) < 0.05
    session = OnnxCausalLM(result.path / "int8", threads=1)
    assert len(session.generate([1, 2 + 3, 9], 5, eos_token_id=None)) == 5


def test_int8_and_int4_side_by_side(pruned_export):
    """--quantize int8 int4: one export, both quantized folders, each checked against the one fp32."""
    _, result = pruned_export("llama", quantize=("int8", "int4"))
    variants = result.report["variants"]
    assert list(variants) == ["fp32", "int8", "int4"]
    fp32_ppl = variants["fp32"]["perplexity"]["onnx"]
    for mode in ("int8", "int4"):
        assert (result.path / mode / "model.onnx").is_file() and (result.path / mode / "tokenizer.json").is_file()
        assert variants[mode]["perplexity"]["onnx_fp32"] == fp32_ppl
        assert abs(variants[mode]["perplexity"]["change"]) < 0.2
    assert not (result.path / "int8" / "int4").exists()
    q = variants["int4"]["quantization"]
    # untied (llama): the LM head found, 8-bit; own 8-bit lookup table
    assert q["table_bits"] == 8 and q["layer_bits"] == 4 and q["lm_head"]
    proto = onnx.load(str(result.path / "int4" / "model.onnx"))
    bits = sorted({next(a.i for a in n.attribute if a.name == "bits") for n in proto.graph.node if n.op_type == "MatMulNBits"})
    assert bits == [4, 8]
    gathers = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and next(a.i for a in gathers[0].attribute if a.name == "bits") == 8


def test_quantize_modes_validated():
    from llmprune.export import ExportConfig

    assert ExportConfig(quantize=["int4", "int8"]).modes == ("int4", "int8")
    assert ExportConfig(quantize="none").modes == ()
    with pytest.raises(LLMPruneError, match="cannot be combined"):
        ExportConfig(quantize=("none", "int8"))
    with pytest.raises(LLMPruneError, match="table bits"):
        ExportConfig(quantize="int4", table_bits=6)


def test_failed_parity_leaves_nothing(tmp_path, tok):
    """An export that fails its check writes no output and leaves no temporary folder."""
    model = pruned_tiny_model("qwen2")
    out = tmp_path / "onnx"
    with pytest.raises(LLMPruneError, match="differ from PyTorch"):
        export_onnx(model, fast_config(atol=1e-12, check_generation=False), out, tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=64)).eval()
    with pytest.raises(LLMPruneError, match="unsupported architecture 'gpt2'"):
        export_onnx(model, fast_config(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_external_data_layout_loads_and_quantizes(pruned_export, tmp_path):
    """The fp32 weights are in model.onnx_data (ONNX Runtime maps them); a quantized model above
    2 GB is written the same way — forced here on a tiny model — and runs the same."""
    import shutil

    from llmprune.export.weights import read_model, write_model

    _, result = pruned_export("gemma3_text", quantize="int4", ort=True, genai=True)
    assert (result.path / "model.onnx_data").stat().st_size > 320 * 64 * 4  # the weights are in the data file
    assert (result.path / "model.onnx").stat().st_size < (result.path / "model.onnx_data").stat().st_size
    folder = tmp_path / "external"
    folder.mkdir()
    for p in (result.path / "int4").iterdir():
        if p.suffix == ".json":
            shutil.copy2(p, folder / p.name)
    files = write_model(*read_model(result.path / "int4" / "model.onnx"), folder / "model.onnx", limit=0)
    assert [f.name for f in files] == ["model.onnx", "model.onnx_data"]
    ids = np.array([[1, 40, 41, 42, 43, 44, 45]])
    want = OnnxCausalLM(result.path / "int4", threads=1).forward(ids)[0]
    np.testing.assert_array_equal(OnnxCausalLM(folder, threads=1).forward(ids)[0], want)


def test_dense_checkpoint_folder(checkpoint, tmp_path):
    """A dense checkpoint folder exports through the same path (export_checkpoint loads it)."""
    from llmprune.export import ExportConfig, export_checkpoint

    result = export_checkpoint(checkpoint("qwen2"), ExportConfig(threads=1, eval_windows=2, eval_seq_len=32), tmp_path / "onnx")
    fp32 = result.report["variants"]["fp32"]
    assert fp32["logits"]["max_abs_logit_diff"] < 1e-4 and fp32["generation"]["all_equal"]
    assert result.report["model"]["pruned_layers"] is None and result.report["model"]["num_hidden_layers"] == 4
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()
    assert OnnxCausalLM(tmp_path / "onnx", threads=1).num_layers == 4


@pytest.mark.parametrize("damaged, genai", [
    ("config.json", False), ("tokenizer.json", False), ("tokenizer_config.json", True),
    ("generation_config.json", False), ("genai_config.json", True), ("model.onnx", False), ("model.onnx", True),
])
def test_a_damaged_file_of_an_export_folder_is_one_line_naming_it(pruned_export, tmp_path, damaged, genai):
    """generate on an export folder with one file cut short: one line, exit 2, the file or the
    loader named, never a traceback from the tokenizer, transformers or onnxruntime(-genai)."""
    import shutil

    from ..conftest import run_main

    _, result = pruned_export("gemma3_text", quantize="int4", ort=True, genai=True)
    folder = shutil.copytree(result.path / "int4", tmp_path / "int4")
    path = folder / damaged
    path.write_bytes(path.read_bytes()[:min(200, path.stat().st_size // 2)])
    done = run_main("generate", "--onnx", folder, *(["--genai"] if genai else []), "--prompt", "The quick",
                    "--max-new-tokens", "4", cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    named = "onnxruntime" if damaged == "model.onnx" else f"{damaged}' is not valid JSON"
    assert lines[0].startswith("llmprune generate: error: ") and named in lines[0] and "export" in lines[0], lines[0]


def test_exporting_a_target_checkpoint_off_its_planned_layout_warns(pruned_checkpoint, tmp_path, caplog):
    """A --target-mb plan chose the lean int4 layout: exporting with the default one says so, once."""
    import json
    import logging
    import shutil

    from llmprune.artifact import LEAN_WIDE
    from llmprune.export.pipeline import export_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pruned_checkpoint, ckpt)
    report = json.loads((ckpt / "pruning_report.json").read_text())
    report["target"] = {"chosen": {"keep_8bit": list(LEAN_WIDE)}}
    (ckpt / "pruning_report.json").write_text(json.dumps(report))
    with caplog.at_level(logging.WARNING, logger="llmprune.export.pipeline"):
        export_checkpoint(ckpt, fast_config(quantize="int4"), tmp_path / "default")
        export_checkpoint(ckpt, fast_config(quantize="int4", keep_8bit=LEAN_WIDE), tmp_path / "planned")
    warned = [r.getMessage() for r in caplog.records if "planned by --target-mb" in r.getMessage()]
    assert len(warned) == 1 and "pass --keep-8bit down_proj v_proj" in warned[0]
