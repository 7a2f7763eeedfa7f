"""The fp32 export's weights kept out of torch's serializer: the same graph as the plain exporter,
a streamed file that decodes to the same model (one file or external data), copies found exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from llmprune.export.onnx import _find_copies, raw_export
from llmprune.export.runtime import OnnxCausalLM
from llmprune.export.weights import model_file_bytes, take_weights, weights_kept_out, write_model

from .conftest import pruned_tiny_model


@pytest.fixture(scope="module")
def both_exports(tmp_path_factory):
    """A tiny pruned Gemma-3 exported by the plain exporter and with its weights kept out."""
    torch.set_num_threads(1)
    model = pruned_tiny_model("gemma3_text")
    plain, kept_dir = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("kept")
    raw_export(model, plain)
    kept: dict = {}
    with weights_kept_out(kept) as keeping:
        raw_export(model, kept_dir)
    assert keeping
    return onnx.load(str(plain / "model.onnx")), onnx.load(str(kept_dir / "model.onnx")), kept, kept_dir


def test_the_graph_and_weights_are_the_plain_exporters(both_exports):
    """The same nodes and initializers; the plain exporter's only extra is an Identity node per
    equal weight (torch's dedupe; here llmprune's dedupe stores equal weights once instead)."""
    from collections import Counter

    plain, graph_only, kept, _ = both_exports
    assert not graph_only.graph.initializer
    identities = {n.output[0]: n.input[0] for n in plain.graph.node if n.op_type == "Identity"}
    ops = Counter(n.op_type for n in plain.graph.node if n.output[0] not in identities)
    assert Counter(n.op_type for n in graph_only.graph.node) == ops
    values = {i.name: numpy_helper.to_array(i) for i in plain.graph.initializer}
    assert set(kept) == set(values) | (set(identities) & set(kept))
    for name, tensor in kept.items():
        np.testing.assert_array_equal(values[identities.get(name, name)], tensor.detach().numpy())


def test_the_streamed_file_decodes_to_the_model(both_exports, tmp_path):
    plain, graph_only, kept, folder = both_exports
    proto = onnx.ModelProto()
    proto.CopyFrom(graph_only)
    arrays = take_weights(proto, kept)
    first = next(iter(arrays))
    arrays["strided"] = np.arange(24, dtype=np.float32).reshape(4, 6).T     # a view, written a block at a time
    proto.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.zeros((6, 4), np.float32), "strided"))
    proto.graph.initializer[-1].ClearField("raw_data")
    path = tmp_path / "model.onnx"
    assert write_model(proto, arrays, path) == [path]
    loaded = onnx.load(str(path))
    assert path.stat().st_size == model_file_bytes(proto, arrays) == loaded.ByteSize()
    got = {i.name: numpy_helper.to_array(i) for i in loaded.graph.initializer}
    assert set(got) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], array)
    assert [i.name for i in loaded.graph.input] == [i.name for i in plain.graph.input]
    assert got[first].dtype == arrays[first].dtype


def test_the_external_layout_runs_the_same(both_exports, tmp_path):
    import shutil

    _, graph_only, kept, folder = both_exports
    outputs = []
    for limit, files in ((10**12, ["model.onnx"]), (0, ["model.onnx", "model.onnx_data"])):
        out = tmp_path / str(limit)
        out.mkdir()
        shutil.copy2(folder / "config.json", out / "config.json")
        proto = onnx.ModelProto()
        proto.CopyFrom(graph_only)
        assert [p.name for p in write_model(proto, take_weights(proto, kept), out / "model.onnx", limit=limit)] == files
        outputs.append(OnnxCausalLM(out, threads=1).forward(np.array([[1, 5, 7, 9]]))[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    plain_folder = folder.parent / folder.name.replace("kept", "plain")
    np.testing.assert_allclose(OnnxCausalLM(plain_folder, threads=1).forward(np.array([[1, 5, 7, 9]]))[0],
                               outputs[0], atol=1e-6, rtol=0)


def test_copies_and_transposed_copies_are_found_exactly():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((64, 32)).astype(np.float32)
    square = rng.standard_normal((40, 40)).astype(np.float32)
    symmetric = square + square.T
    nearly = table.copy()
    nearly[3, 4] += 1e-3
    arrays = {"table": table, "copy": table.copy(), "head": np.ascontiguousarray(table.T), "nearly": nearly,
              "square": square, "square_t": square.T, "sym": symmetric, "sym_copy": symmetric.copy(),
              "small": np.ones(3, np.float32), "small_copy": np.ones(3, np.float32)}
    graph = onnx.helper.make_graph([], "g", [], [])
    for name, array in arrays.items():
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    replace, transposed = _find_copies(graph, arrays)
    assert replace == {"copy": "table", "sym_copy": "sym"}
    assert transposed == {"head": "table", "square_t": "square"}


# ---------------------------------------------------------------- reading a model with its weights apart


@pytest.mark.parametrize("limit", [10**12, 0], ids=["one-file", "external-data"])
def test_read_model_gives_back_what_was_written(both_exports, tmp_path, limit):
    """`read_model` is `write_model`'s inverse: the same graph, each weight the same values, and
    those values memory maps of the file rather than copies."""
    from llmprune.export.weights import read_model

    _, graph_only, kept, _ = both_exports
    proto = onnx.ModelProto()
    proto.CopyFrom(graph_only)
    arrays = take_weights(proto, kept)
    arrays["ids"] = np.arange(5, dtype=np.int64)
    proto.graph.initializer.add().CopyFrom(numpy_helper.from_array(np.zeros(5, np.int64), "ids"))
    proto.graph.initializer[-1].ClearField("raw_data")
    path = tmp_path / "model.onnx"
    write_model(proto, arrays, path, limit=limit)
    got_proto, got = read_model(path)
    assert [n.SerializeToString() for n in got_proto.graph.node] == [n.SerializeToString() for n in proto.graph.node]
    assert [(i.name, list(i.dims), i.data_type) for i in got_proto.graph.initializer] == \
        [(i.name, list(i.dims), i.data_type) for i in proto.graph.initializer]
    assert not any(i.HasField("raw_data") or i.external_data for i in got_proto.graph.initializer)
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], array)
    big = max(got, key=lambda n: got[n].nbytes)
    assert isinstance(got[big], np.memmap)
    # and written again, the file is the same bytes
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / "model.onnx"
    written = write_model(got_proto, got, again, limit=limit)
    assert [p.read_bytes() for p in written] == [(tmp_path / p.name).read_bytes() for p in written]


def test_a_truncated_model_is_named(both_exports, tmp_path):
    from llmprune.errors import LLMPruneError
    from llmprune.export.weights import read_model

    _, graph_only, kept, _ = both_exports
    proto = onnx.ModelProto()
    proto.CopyFrom(graph_only)
    arrays = take_weights(proto, kept)
    path = tmp_path / "model.onnx"
    write_model(proto, arrays, path, limit=0)
    data = tmp_path / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(LLMPruneError, match="is damaged"):
        read_model(path)
