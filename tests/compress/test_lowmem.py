"""--low-memory writes the same checkpoint as the in-memory path, one layer at a time."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune.compress import CompressConfig, compress
from llmprune.errors import LLMPruneError
from llmprune.testing import TINY_TEXT, tiny_checkpoint

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


@pytest.fixture(scope="module")
def text(request):
    from pathlib import Path

    data = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
    return data.read_text()[:60000] if data.is_file() else TINY_TEXT * 40


@pytest.mark.parametrize("arch", ARCHS)
def test_low_memory_equals_in_memory(arch, text, tmp_path):
    src = tiny_checkpoint(tmp_path / "src", arch)
    kw = dict(ratio=0.35, of="decoder", calib_samples=4, calib_seq_len=32, loss_windows=2, layer_share=0.9, prune_heads=True,
              head_ratio=0.5)
    a = compress(str(src), CompressConfig(**kw), calib=[text], out=tmp_path / "a").report
    b = compress(str(src), CompressConfig(low_memory=True, **kw), calib=[text], out=tmp_path / "b").report
    assert b["low_memory"] and a["layers_dropped"] == b["layers_dropped"] != []
    assert abs(a["ratio_achieved"] - b["ratio_achieved"]) < 1e-12
    assert b["calibration_loss"]["pruned"] == pytest.approx(a["calibration_loss"]["pruned"], rel=1e-5)
    # One report builder: the same fields, κ and per-part parameter counts included.
    assert set(a) == set(b) and a["params_before"] == b["params_before"] and a["params_after"] == b["params_after"]
    assert [set(r) for r in a["layers"]] == [set(r) for r in b["layers"]]
    for ra, rb in zip(a["layers"], b["layers"]):
        assert ra.get("kept_neuron_indices") == rb.get("kept_neuron_indices")
        if "kappa_kept" in ra:
            assert rb["kappa_kept"] == pytest.approx(ra["kappa_kept"], rel=1e-9)
    ma, mb = llmprune.load_model(tmp_path / "a"), llmprune.load_model(tmp_path / "b")
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # One shard per kept layer plus the rest, indexed.
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == mb.config.num_hidden_layers + 1
    assert mb.config.llmprune["original_num_hidden_layers"] == 4


def test_low_memory_needs_a_calibration_file(tmp_path):
    src = tiny_checkpoint(tmp_path / "src", "llama")
    with pytest.raises(LLMPruneError, match="calib"):
        compress(str(src), CompressConfig(ratio=0.2, low_memory=True), calib="self", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_low_memory_refuses_taylor_before_reading_anything(tmp_path):
    with pytest.raises(LLMPruneError, match="no --low-memory path"):
        compress(str(tmp_path / "does-not-exist"), CompressConfig(ratio=0.2, method="taylor", low_memory=True),
                 calib=["text"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_weight_file_is_refused_in_one_line_before_any_work(tmp_path):
    src = tiny_checkpoint(tmp_path / "src", "llama")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(LLMPruneError, match="is truncated or corrupt") as exc:
        compress(str(src), CompressConfig(ratio=0.2, low_memory=True), calib=["text"], out=tmp_path / "out")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_copied_tensors_keep_their_bytes(tmp_path):
    from safetensors.torch import load_file, save_file

    from llmprune.compress.safetensors_io import copy_tensors
    from llmprune.reader import checkpoint_entries

    tensors = {"b": torch.randn(300, 7).to(torch.bfloat16), "a": torch.tensor(2.0), "e": torch.zeros(0, 3),
               "i": torch.arange(9, dtype=torch.int8)}
    save_file(tensors, tmp_path / "model.safetensors")
    entries = checkpoint_entries(tmp_path)
    written = copy_tensors([entries[k] for k in ("i", "b", "a", "e")], tmp_path / "copy.safetensors")
    assert written == sum(e.nbytes for e in entries.values())
    copied = load_file(tmp_path / "copy.safetensors")
    assert copied.keys() == tensors.keys() and all(torch.equal(copied[k], v) for k, v in tensors.items())
