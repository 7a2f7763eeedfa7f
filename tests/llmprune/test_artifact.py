"""llmprune.artifact: the exported bytes predicted from a model's shapes, against real exports."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from llmprune import artifact
from llmprune.testing import tiny_model, tiny_tokenizer


def _onnx_weight_bytes(path) -> int:
    """Bytes of the weight tensors an ONNX file stores (initializers: float, uint8, int4)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    total = 0
    for t in onnx.load(str(path)).graph.initializer:
        if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
            total += (int(np.prod(t.dims)) + 1) // 2
        elif t.data_type in (TensorProto.FLOAT, TensorProto.UINT8):
            total += numpy_helper.to_array(t).nbytes
    return total


def _vector_params(model) -> int:
    """Parameters of 1-D tensors (norms, biases): ONNX may fold them into graph constants."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.ndim == 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])   # an untied and a tied vocabulary table
def test_predicted_weights_are_the_exported_weights_at_every_precision(arch, tmp_path):
    from llmprune.export import ExportConfig, export_onnx

    model, tok = tiny_model(arch, hidden_size=64, intermediate_size=96), tiny_tokenizer()
    export_onnx(model, ExportConfig(quantize=("int8", "int4")), out=tmp_path / "onnx", tokenizer=tok)
    folders = {"fp32": tmp_path / "onnx", "int8": tmp_path / "onnx" / "int8", "int4": tmp_path / "onnx" / "int4"}
    for precision, folder in folders.items():
        predicted, exported = artifact.weight_bytes(model, precision), _onnx_weight_bytes(folder / "model.onnx")
        # The matrices and the table exactly; the norms may live in the graph instead of initializers.
        assert 0 <= predicted - exported <= 4 * _vector_params(model), (precision, predicted, exported)
        files = sum(p.stat().st_size for p in folder.iterdir() if p.name in artifact.RUNTIME_FILES)
        assert artifact.files_bytes(model, tok) == files, precision
    # int4 is smaller than int8, int8 than fp32, as exported.
    sizes = [artifact.weight_bytes(model, p) for p in ("fp32", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("precision", artifact.PRECISIONS)
def test_a_vocabulary_row_costs_row_bytes(arch, precision):
    from llmprune.compress.vocab import slice_vocabulary

    model = tiny_model(arch)
    trimmed = copy.deepcopy(model)
    slice_vocabulary(trimmed, np.arange(300))
    saved = artifact.weight_bytes(model, precision) - artifact.weight_bytes(trimmed, precision)
    assert saved == pytest.approx(20 * artifact.row_bytes(model, precision))


def test_matrix_bytes_follow_matmulnbits_layout():
    assert artifact.matrix_bytes(10, 64, 0, 32) == 10 * 64 * 4
    assert artifact.matrix_bytes(10, 64, 8, 32) == 10 * 64 + 10 * 2 * 4           # values + a scale a block
    assert artifact.matrix_bytes(10, 70, 4, 32, zero_points=True) == 10 * 3 * 16 + 10 * 3 * 4 + 10 * 2
    with pytest.raises(Exception, match="unknown precision 'int2'"):
        artifact.layout("int2")


def test_the_lean_int4_layout_is_predicted_as_exported(tmp_path):
    """--keep-8bit down_proj v_proj (what --target-mb may choose): gate/up at 4 bits, as predicted."""
    from llmprune.export import ExportConfig, export_onnx

    model, tok = tiny_model("qwen3", hidden_size=64, intermediate_size=96), tiny_tokenizer()
    export_onnx(model, ExportConfig(quantize="int4", keep_8bit=artifact.LEAN_WIDE), out=tmp_path / "onnx", tokenizer=tok)
    predicted = artifact.weight_bytes(model, "int4", wide=artifact.LEAN_WIDE)
    exported = _onnx_weight_bytes(tmp_path / "onnx" / "int4" / "model.onnx")
    assert 0 <= predicted - exported <= 4 * _vector_params(model)
    assert predicted < artifact.weight_bytes(model, "int4")
