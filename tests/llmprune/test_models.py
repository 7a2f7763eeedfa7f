"""Model specs: folder, .gguf, hub id, packaged name; loading tiny checkpoints of every family."""

from __future__ import annotations

import pytest
import torch

import llmprune
from llmprune import DEFAULT_MODEL, LLMPruneError, load, load_config, load_model, load_tokenizer, resolve_model_spec
from llmprune.models import ModelSource, cache_dir
from llmprune.testing import TINY_TEXT, tiny_model, tiny_tokenizer, tiny_tokenizer_for

# ---------------------------------------------------------------- resolve_model_spec


def test_folder_with_config(checkpoint):
    folder = checkpoint("llama")
    assert resolve_model_spec(folder) == ModelSource("folder", str(folder))
    assert resolve_model_spec(str(folder)) == ModelSource("folder", str(folder))


def test_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert resolve_model_spec(path) == ModelSource("gguf", str(path))


def test_folder_holding_one_gguf(tmp_path):
    (tmp_path / "m-q4.gguf").write_bytes(b"GGUF")
    assert resolve_model_spec(tmp_path) == ModelSource("gguf", str(tmp_path / "m-q4.gguf"))


def test_folder_with_several_ggufs_is_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(LLMPruneError, match="several .gguf files"):
        resolve_model_spec(tmp_path)


def test_folder_without_model(tmp_path):
    with pytest.raises(LLMPruneError, match="is not a model folder \\(no config.json\\)"):
        resolve_model_spec(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00")
    with pytest.raises(LLMPruneError, match="is not a .gguf file"):
        resolve_model_spec(path)


@pytest.mark.parametrize("spec", ["Qwen/Qwen2.5-0.5B", "google/gemma-3-270m"])
def test_hub_id(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_spec(spec) == ModelSource("hub", spec)


@pytest.mark.parametrize("spec", ["gemma-9", "llama", "gemma-3-270M"])
def test_unknown_model_name(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LLMPruneError) as info:
        resolve_model_spec(spec)
    assert f"unknown model name '{spec}'" in str(info.value)
    assert DEFAULT_MODEL in info.value.fix


@pytest.mark.parametrize("spec", ["./no-such-model", "/definitely/not/here", "missing.gguf", "a/b/c", "~/no-such-llmprune-model"])
def test_missing_path(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LLMPruneError, match="does not exist"):
        resolve_model_spec(spec)


def test_packaged_name_and_default_use_the_cache_dir(tmp_path, monkeypatch):
    """A converted packaged model is found under $LLMPRUNE_CACHE_DIR/models/<name> without
    importing or converting anything."""
    monkeypatch.setenv("LLMPRUNE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "models" / DEFAULT_MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    assert cache_dir() == tmp_path
    assert resolve_model_spec(DEFAULT_MODEL) == ModelSource("folder", str(folder))
    assert resolve_model_spec(None) == ModelSource("folder", str(folder))


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("LLMPRUNE_CACHE_DIR", raising=False)
    from pathlib import Path

    assert cache_dir() == Path.home() / ".cache" / "llmprune"


# ---------------------------------------------------------------- loading


def test_load_tiny_checkpoint_of_every_family(checkpoint, arch):
    folder = checkpoint(arch)
    model, tok = load(folder)
    reference = tiny_model(arch, seed=0)
    assert type(model).__name__ == type(reference).__name__
    assert model.config.model_type == arch
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([tok(TINY_TEXT[:80])["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    assert tok(TINY_TEXT)["input_ids"] == tiny_tokenizer_for(arch)(TINY_TEXT)["input_ids"]


def test_load_model_dtype(checkpoint):
    model = load_model(checkpoint("qwen2"), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_load_config_without_weights(checkpoint):
    config = load_config(checkpoint("gemma3_text"))
    assert config.model_type == "gemma3_text"
    assert config.num_hidden_layers == 4


def test_unsupported_architecture_folder(gpt2_checkpoint):
    for loader in (load_config, load_model, load):
        with pytest.raises(LLMPruneError) as info:
            loader(gpt2_checkpoint)
        assert "unsupported architecture 'gpt2'" in str(info.value)
        for name in llmprune.SUPPORTED_ARCHITECTURES:
            assert name in str(info.value)


def test_corrupt_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LLMPruneError, match=r"config\.json' is not valid JSON \(line 1") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_weights(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(LLMPruneError, match="could not load model") as info:
        load_model(tmp_path)
    assert info.value.fix


def test_load_tokenizer_of_folder(checkpoint):
    tok = load_tokenizer(checkpoint("mistral"))
    assert tok.bos_token_id == 1
    assert (tok("hello world", add_special_tokens=False)["input_ids"]
            == tiny_tokenizer()("hello world", add_special_tokens=False)["input_ids"])


def test_public_api():
    for name in llmprune.__all__:
        assert hasattr(llmprune, name), name
    assert llmprune.__version__
    import importlib

    for stage in ("cli", "compress", "export", "fedrecover"):  # the stage folders install inside the package
        assert importlib.import_module(f"llmprune.{stage}").__name__ == f"llmprune.{stage}"


# ---------------------------------------------------------------- no code from a model folder


def _plant_code(folder, marker) -> None:
    """A tokenizer and model `auto_map` pointing at Python in the folder that would leave a marker."""
    import json

    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast as Evil\n"
    (folder / "evil.py").write_text(code)
    for name, key in (("tokenizer_config.json", "AutoTokenizer"), ("config.json", "AutoModelForCausalLM")):
        data = json.loads((folder / name).read_text())
        data["auto_map"] = {key: ["evil.Evil", None] if key == "AutoTokenizer" else "evil.Evil"}
        if key == "AutoTokenizer":
            data["tokenizer_class"] = "EvilTokenizer"  # no stock class of that name: only the folder's code has it
        (folder / name).write_text(json.dumps(data))


def test_code_in_a_model_folder_is_never_run(checkpoint, tmp_path, monkeypatch):
    import shutil
    import sys

    folder = tmp_path / "planted"
    shutil.copytree(checkpoint("llama"), folder)
    marker = tmp_path / "marker"
    _plant_code(folder, marker)
    import builtins

    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *a: prompts.append(a) or "y")  # answering yes to "run it?"
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(LLMPruneError, match="could not load tokenizer"):
        load_tokenizer(folder)
    model = load_model(folder)
    assert not marker.exists() and not prompts
    assert model.config.model_type == "llama"


def test_tokenizers_return_only_what_the_decoders_take(checkpoint, tmp_path):
    """Stock generation rejects token_type_ids; a tokenizer saved by llmprune keeps that setting,
    also for a folder whose tokenizer_config.json does not say it (the fast-tokenizer default)."""
    import json
    import shutil

    folder = tmp_path / "plain"
    shutil.copytree(checkpoint("llama"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("model_input_names", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    model, tokenizer = load(folder)
    inputs = tokenizer("the cat sat", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    assert set(AutoTokenizer.from_pretrained(tmp_path / "tok")("x")) == {"input_ids", "attention_mask"}


def test_a_folder_without_tokenizer_files_is_one_line_naming_the_fix(tmp_path):
    from llmprune.errors import LLMPruneError
    from llmprune.models import load_tokenizer
    from llmprune.testing import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)              # what prune(..., out=) writes without tokenizer=
    with pytest.raises(LLMPruneError, match="has no tokenizer files .* pass tokenizer= when saving it"):
        load_tokenizer(str(tmp_path))
