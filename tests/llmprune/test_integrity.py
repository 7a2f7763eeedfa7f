"""llmprune.integrity and llmprune.paths: the checks behind the one-line errors for broken
checkpoints and unwritable outputs (the CLI tables are in tests/cli/test_bad_inputs.py)."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import llmprune
from llmprune import LLMPruneError
from llmprune.integrity import check_loading_info, checkpoint_tensors, read_safetensors_header
from llmprune.paths import check_writable_output, find_write_error, printable


def _weights(path, **tensors):
    save_file({k: torch.zeros(v) for k, v in tensors.items()}, path)
    return path


def test_header_of_a_whole_file(tmp_path):
    path = _weights(tmp_path / "w.safetensors", a=(2, 3), b=(4,))
    assert read_safetensors_header(path) == {"a": ("F32", (2, 3)), "b": ("F32", (4,))}


@pytest.mark.parametrize(("damage", "fragment"), [
    (lambda raw: raw + b"\0" * 16, "16 bytes beyond the last tensor"),
    (lambda raw: raw[:-1], "tensor 'b' ends at byte"),
    (lambda raw: raw[:6], "too short for a safetensors header"),
    (lambda raw: (10**12).to_bytes(8, "little") + raw[8:], "the header says"),
    (lambda raw: raw[:8] + b"x" * (len(raw) - 8), "header is not valid JSON"),
])
def test_damaged_header_is_refused(tmp_path, damage, fragment):
    path = _weights(tmp_path / "w.safetensors", a=(2, 3), b=(4,))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(LLMPruneError, match="is truncated or corrupt") as exc:
        read_safetensors_header(path)
    assert fragment in str(exc.value)


def test_sharded_checkpoint_missing_a_shard(tmp_path):
    _weights(tmp_path / "model-00001-of-00002.safetensors", a=(2,))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LLMPruneError, match="lacks the weight file"):
        checkpoint_tensors(tmp_path)
    _weights(tmp_path / "model-00002-of-00002.safetensors", b=(3, 1))
    assert checkpoint_tensors(tmp_path) == {"a": (2,), "b": (3, 1)}


def test_loading_info_ignores_old_rotary_buffers_only():
    check_loading_info({"missing_keys": [], "unexpected_keys": ["model.layers.0.self_attn.rotary_emb.inv_freq"]}, "x")
    with pytest.raises(LLMPruneError, match=r"1 tensor\(s\) missing from the weights \(lm_head.weight\)"):
        check_loading_info({"missing_keys": ["lm_head.weight"], "unexpected_keys": []}, "x")


def test_every_architecture_loads_clean(checkpoint, arch):
    """No false alarm: tied heads (qwen3, gemma3_text) and all families pass the checks."""
    model = llmprune.load_model(checkpoint(arch))
    assert model.config.model_type == arch


def test_layer_types_of_another_length(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("gemma3_text"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = config["layer_types"][:3]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LLMPruneError):
        llmprune.load_config(folder)


def test_writable_output_probe_leaves_nothing(tmp_path):
    check_writable_output(tmp_path / "a" / "b" / "out")
    assert list(tmp_path.iterdir()) == []


def test_find_write_error_looks_through_wrappers():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("export failed") from inner
    except RuntimeError as outer:
        assert find_write_error(outer).errno == errno.ENOSPC
    assert find_write_error(RuntimeError("[ONNXRuntimeError] : 1 : FAIL : write: No space left on device")) is not None
    assert find_write_error(ValueError("bad shape")) is None
    assert find_write_error(FileNotFoundError(errno.ENOENT, "missing")) is None


def test_printable_escapes_undecodable_bytes():
    assert printable("/tmp/x\udcff") == "/tmp/x\\udcff"


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "generation_config.json", "pruning_report.json"])
def test_a_checkpoint_json_file_cut_short_is_one_line_naming_it(checkpoint, tmp_path, name):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama"), folder)
    path = folder / name
    text = path.read_text() if path.is_file() else '{"a": 1}'
    path.write_text(text[: max(1, len(text) // 2)])
    for load in (llmprune.load_tokenizer, llmprune.load_model):
        with pytest.raises(LLMPruneError, match=f"'{path}' is not valid JSON"):
            load(folder)
