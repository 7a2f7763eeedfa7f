"""llmprune.reader: the one safetensors reader. Entries at the right offsets, reads equal to
safetensors' own loads (whole, a row chunk at a time, a gather of rows, vocabulary slices), the
folder's order, one-line refusals of damaged files, and the meta model of a config."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmprune import reader
from llmprune.errors import LLMPruneError
from llmprune.reader import (
    checkpoint_entries,
    find_tensor,
    gather_rows,
    load_tensor,
    meta_model,
    read_header,
    read_rows,
    row_blocks,
    row_ranges,
    safetensors_files,
)
from llmprune.testing import tiny_config, tiny_model

TENSORS = {
    "emb": torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6).to(torch.bfloat16),
    "w": torch.randn(5, 3, 2, generator=torch.Generator().manual_seed(0)),
    "half": torch.randn(7, generator=torch.Generator().manual_seed(1)).to(torch.float16),
    "scalar": torch.tensor(3.5),
    "empty": torch.zeros(0, 4),
    "ints": torch.arange(-5, 5, dtype=torch.int8),
}


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, path)
    return path


def test_entries_point_at_the_stored_bytes(weights):
    entries = read_header(weights)
    assert set(entries) == set(TENSORS)
    raw = weights.read_bytes()
    for name, tensor in TENSORS.items():
        e = entries[name]
        assert e.path == weights and e.shape == tuple(tensor.shape) and e.torch_dtype == tensor.dtype
        assert e.nbytes == tensor.numel() * tensor.element_size()
        assert raw[e.offset : e.offset + e.nbytes] == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_reads_equal_safetensors_loads(weights, monkeypatch):
    entries, stored = read_header(weights), load_file(weights)
    for chunk in (reader.CHUNK_BYTES, 12):  # 12 bytes: one bfloat16 row of 6 per read; wider rows one at a time
        monkeypatch.setattr(reader, "CHUNK_BYTES", chunk)
        for name, e in entries.items():
            got = load_tensor(e, e.torch_dtype)
            assert got.dtype == stored[name].dtype and torch.equal(got, stored[name]), name
            assert torch.equal(load_tensor(e, torch.float64), stored[name].double()), name
    assert torch.equal(read_rows(entries["emb"], 3, 9), TENSORS["emb"][3:9])
    assert read_rows(entries["scalar"], 0, 1).shape == ()


def test_whole_tensors_are_converted_a_row_chunk_at_a_time(weights, monkeypatch):
    entry = read_header(weights)["emb"]  # 40 rows of 12 bytes
    reads = []
    real = reader.read_rows
    monkeypatch.setattr(reader, "CHUNK_BYTES", 120)
    monkeypatch.setattr(reader, "read_rows", lambda e, lo, hi: reads.append((lo, hi)) or real(e, lo, hi))
    out = load_tensor(entry, torch.float32)
    assert reads == [(lo, lo + 10) for lo in range(0, 40, 10)]
    assert out.dtype == torch.float32 and torch.equal(out, TENSORS["emb"].float())
    assert list(row_ranges(entry, 16)) == [(0, 16), (16, 32), (32, 40)]
    blocks = list(row_blocks(entry, 16))  # an LM head a vocabulary slice at a time
    assert [lo for lo, _ in blocks] == [0, 16, 32] and torch.equal(torch.cat([b for _, b in blocks]), TENSORS["emb"])


def test_gather_reads_only_the_runs_of_the_wanted_rows(weights, monkeypatch):
    entry = read_header(weights)["emb"]
    reads = []
    real = reader.read_rows
    monkeypatch.setattr(reader, "read_rows", lambda e, lo, hi: reads.append((lo, hi)) or real(e, lo, hi))
    ids = torch.tensor([[7, 3, 4], [5, 39, 3]])  # any order, repeats, any shape
    assert torch.equal(gather_rows(entry, ids), TENSORS["emb"][ids.reshape(-1)])
    assert reads == [(3, 6), (7, 8), (39, 40)]
    assert gather_rows(entry, torch.tensor([], dtype=torch.long)).shape == (0, 6)
    with pytest.raises(LLMPruneError, match="which has 40 rows"):
        gather_rows(entry, torch.tensor([2, 40]))


def test_folder_order_and_missing_weights(tmp_path):
    assert checkpoint_entries(tmp_path) is None and safetensors_files(tmp_path) == []
    save_file({"z": torch.zeros(2), "a": torch.zeros(3, dtype=torch.float16), "m": torch.zeros(1, dtype=torch.float64)},
              tmp_path / "model.safetensors")
    assert list(checkpoint_entries(tmp_path)) == ["a", "m", "z"]  # one file: by name, whatever the header's order
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"b": torch.zeros(2), "c": torch.zeros(1)}, sharded / "s1.safetensors")
    save_file({"a": torch.zeros(3)}, sharded / "s2.safetensors")
    weight_map = {"c": "s1.safetensors", "a": "s2.safetensors", "b": "s1.safetensors"}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert list(checkpoint_entries(sharded)) == ["c", "a", "b"]  # sharded: the index's order
    assert safetensors_files(sharded) == [sharded / "s1.safetensors", sharded / "s2.safetensors"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}}))
    with pytest.raises(LLMPruneError, match="is not a valid safetensors index"):
        checkpoint_entries(sharded)


def test_find_tensor_names_what_does_not_match(weights):
    entries = read_header(weights)
    assert find_tensor(entries, "w", weights.parent, (5, 3, 2)) is entries["w"]
    with pytest.raises(LLMPruneError, match="has no tensor 'nope'"):
        find_tensor(entries, "nope", weights.parent)
    with pytest.raises(LLMPruneError, match=r"has shape \[5, 3, 2\], the config says \[5, 6\]"):
        find_tensor(entries, "w", weights.parent, (5, 6))


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()  # offsets count from the data section: it moves unchanged
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


@pytest.mark.parametrize("edit", [
    lambda h: h["ints"].update(dtype="XYZ", data_offsets=[h["ints"]["data_offsets"][1], h["ints"]["data_offsets"][0]]),
    lambda h: h["ints"].update(dtype="XYZ", shape=[-10]),
    lambda h: h["ints"].update(dtype=[1]),
])
def test_entries_no_reader_could_use_are_refused(weights, edit):
    _rewrite_header(weights, edit)
    with pytest.raises(LLMPruneError, match="is truncated or corrupt \\(bad header entry for 'ints'\\)"):
        read_header(weights)


def test_a_dtype_torch_cannot_hold_is_refused_when_read(weights):
    _rewrite_header(weights, lambda h: h["ints"].update(dtype="F4X"))  # unknown: no byte count to check
    entry = read_header(weights)["ints"]
    with pytest.raises(LLMPruneError, match="is stored as 'F4X', which llmprune cannot read") as exc:
        read_rows(entry, 0, 1)
    assert "\n" not in str(exc.value)


def test_a_file_cut_after_indexing_is_one_line(weights):
    entries = read_header(weights)
    weights.write_bytes(weights.read_bytes()[: entries["emb"].offset + 10])
    with pytest.raises(LLMPruneError, match="ends inside tensor 'emb'"):
        load_tensor(entries["emb"], torch.float32)


@pytest.mark.parametrize("source", ["llmprune/reader.py", "compress/lowmem.py", "compress/safetensors_io.py",
                                    "fedrecover/client_model.py"])
def test_no_memory_map_and_nothing_unpickled(source):
    """Mapped pages would count in RSS (the client's memory budget): the reader and the modules
    that read weights through it never call safe_open, torch.load, load_file or mmap."""
    tree = ast.parse((Path(__file__).resolve().parents[2] / source).read_text())
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
             for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not calls & {"safe_open", "load", "load_file", "mmap"}


def test_meta_model_has_the_shapes_and_no_storage():
    config = tiny_config("gemma3_text")
    model = meta_model(config)
    assert all(p.is_meta for p in model.parameters())
    real = tiny_model("gemma3_text").state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in real.items()}
