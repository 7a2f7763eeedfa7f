"""int4's block fitting: k_quant (the default) against round to nearest, on a tiny model's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmprune.export import ExportConfig, export_onnx
from llmprune.export.parity import fixed_inputs
from llmprune.export.quantize import quantize_int4
from llmprune.export.runtime import OnnxCausalLM
from llmprune.testing import tiny_model, tiny_tokenizer


def test_k_quant_int4_is_closer_to_fp32_than_round_to_nearest(tmp_path):
    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    export_onnx(model, ExportConfig(), out=tmp_path / "fp32", tokenizer=tiny_tokenizer())
    ids = fixed_inputs(320, 48, 1).numpy()
    with torch.no_grad():
        reference = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    errors = {}
    for algorithm in ("rtn", "k_quant"):
        out = tmp_path / algorithm
        out.mkdir()
        info = quantize_int4(tmp_path / "fp32" / "model.onnx", out / "model.onnx", algorithm=algorithm, wide=())
        assert info["algorithm"] == algorithm
        logits, _ = OnnxCausalLM(out / "model.onnx", threads=1).forward(ids)
        errors[algorithm] = float(np.sqrt(np.mean((logits - reference) ** 2)))
    assert errors["k_quant"] < errors["rtn"], errors
    # same layout, same kernel: the files are the same size to a few bytes of node names
    sizes = {a: (tmp_path / a / "model.onnx").stat().st_size for a in errors}
    assert sizes["k_quant"] == pytest.approx(sizes["rtn"], rel=0.01)


@pytest.mark.parametrize("bits,symmetric,algorithm,op_type", [
    (4, False, "k_quant", "MatMul"), (4, False, "rtn", "MatMul"), (4, True, "rtn", "MatMul"),
    (8, True, "rtn", "MatMul"), (4, False, "rtn", "Gather"), (4, True, "rtn", "Gather")])
def test_sliced_quantization_equals_onnx_runtimes_whole_pass(tmp_path, monkeypatch, bits, symmetric, algorithm, op_type):
    """Each weight quantized on a model of its one node, in slices, gives the very bytes ONNX
    Runtime's quantizer writes in one pass over the whole model."""
    import onnx
    from onnx import numpy_helper

    from llmprune.export import quantize as q
    from llmprune.export.onnx import untie_initializers
    from llmprune.export.weights import read_model

    model = tiny_model("llama", hidden_size=128, intermediate_size=256)
    export_onnx(model, ExportConfig(), out=tmp_path / "fp32", tokenizer=tiny_tokenizer())
    src = tmp_path / "fp32" / "model.onnx"
    proto, arrays = read_model(src)
    untie_initializers(proto, arrays)
    # The whole-model pass needs the data in the proto: the same untied model, loaded whole.
    whole = onnx.ModelProto()
    whole.CopyFrom(proto)
    for init in whole.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arrays[init.name]), init.name))
    whole = q._nbits_pass(whole, bits, 32, symmetric, 4, op_type, [], algorithm)
    monkeypatch.setattr(q, "_SLICE_BYTES", 8 * 1024)     # several slices per weight
    assert q.quantize_nodes(proto, arrays, bits, 32, symmetric, 4, op_type, [], algorithm) > 0
    expected = {i.name: i for i in whole.graph.initializer}
    assert {i.name for i in proto.graph.initializer} == set(expected)
    for init in proto.graph.initializer:
        want = expected[init.name]
        assert (list(init.dims), init.data_type) == (list(want.dims), want.data_type), init.name
        raw = want.raw_data if want.HasField("raw_data") else numpy_helper.to_array(want).tobytes()
        assert np.asarray(arrays[init.name]).tobytes() == raw, init.name
    assert sorted(n.SerializeToString() for n in proto.graph.node) == sorted(n.SerializeToString() for n in whole.graph.node)
