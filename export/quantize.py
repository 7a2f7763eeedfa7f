"""Weight quantization of an fp32 export with onnxruntime.quantization: int8 dynamic (MatMul and
the embedding Gather) and int4 block-wise (MatMulNBits; the embedding as GatherBlockQuantized)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from llmprune.errors import LLMPruneError

from .onnx import load_model_proto, save_model_proto, untie_initializers

log = logging.getLogger(__name__)


def quantize_int8(src: Path, dst: Path) -> dict:
    """Dynamic int8: weights int8 per channel, activations quantized at run time (MatMulInteger),
    the embedding table int8 too."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = load_model_proto(src)
    untied = untie_initializers(proto)  # the LM head needs a constant weight to be quantized
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        plain = Path(tmp) / "untied.onnx"
        files = save_model_proto(proto, plain)
        del proto
        quantize_dynamic(
            plain, dst, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=len(files) > 1,
            extra_options={"MatMulConstBOnly": True},
        )
    return {"mode": "int8", "weight_type": "int8 per-channel (dynamic activations)", "ops": ["MatMul", "Gather"],
            "untied": len(untied)}


def quantize_int4(src: Path, dst: Path, block_size: int = 32, quantize_embedding: bool = True,
                  accuracy_level: int | None = 4) -> dict:
    """Block-wise symmetric int4 (MatMulNBits, block `block_size`); with `quantize_embedding` the
    embedding Gather becomes GatherBlockQuantized, so the vocabulary table shrinks too."""
    try:
        import onnx_ir  # noqa: F401 - MatMulNBitsQuantizer imports it
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise LLMPruneError(f"int4 quantization needs a package that is missing ({exc.name})", "pip install onnx-ir") from exc

    proto = load_model_proto(src)
    untied = untie_initializers(proto)
    ops = ("MatMul", "Gather") if quantize_embedding else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        proto, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
        op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    proto = quantizer.model.model
    shared = share_tied_int4_table(proto, untied, block_size) if quantize_embedding else 0
    repacked = repack_int4_gathers(proto)
    save_model_proto(proto, dst)
    return {"mode": "int4", "block_size": block_size, "symmetric": True, "ops": list(ops),
            "accuracy_level": accuracy_level, "untied": len(untied),
            "tied_table_shared": shared, "embedding_repacked_uint8": repacked}


def share_tied_int4_table(proto, tied: dict[str, str], block_size: int) -> int:
    """For a tied embedding, the lookup reads the LM head's 4-bit MatMulNBits weight instead of
    its own quantized copy, so the table is stored once in 4 bits too. MatMulNBits keeps B as
    uint8 [vocab, hidden/block, block/2] (two values a byte, implicit zero point 8, one scale a
    block): as GatherBlockQuantized data that is the same table, gathered on axis 0 and
    dequantized along the last axis; its [batch, seq, blocks, block] output is reshaped to
    [batch, seq, hidden]."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = list(graph.node)
    shared = 0
    for table, weight in tied.items():
        gathers = [n for n in nodes if n.op_type == "GatherBlockQuantized" and n.input[0] == f"{table}_Q4"]
        matmuls = [n for n in nodes if n.op_type == "MatMulNBits" and n.input[1] == f"{weight}_Q4" and len(n.input) == 3]
        if len(gathers) != 1 or len(matmuls) != 1:
            continue
        gather, matmul = gathers[0], matmuls[0]
        data = inits[matmul.input[1]]
        if len(data.dims) != 3 or data.dims[2] * 2 != block_size:
            continue
        vocab, blocks = int(data.dims[0]), int(data.dims[1])
        scales = matmul.input[2]
        shape_3d = numpy_helper.from_array(np.array([vocab, blocks, 1], np.int64), f"{table}_llmprune_scales_shape")
        shape_out = numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{table}_llmprune_hidden_shape")
        graph.initializer.extend([shape_3d, shape_out])
        scales_3d, gathered = f"{table}_llmprune_scales_3d", f"{gather.output[0]}_llmprune_blocks"
        new = [
            helper.make_node("Reshape", [scales, shape_3d.name], [scales_3d], name=f"{table}_llmprune_scales_reshape"),
            helper.make_node("GatherBlockQuantized", [matmul.input[1], gather.input[1], scales_3d], [gathered],
                             name=f"{table}_llmprune_shared_lookup", domain="com.microsoft",
                             gather_axis=0, quantize_axis=2, block_size=block_size, bits=4),
            helper.make_node("Reshape", [gathered, shape_out.name], [gather.output[0]], name=f"{table}_llmprune_hidden"),
        ]
        at = nodes.index(gather)
        nodes[at:at + 1] = new
        shared += 1
    if shared:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for n in graph.node for name in n.input}
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return shared


def repack_int4_gathers(proto) -> int:
    """GatherBlockQuantized tables stored as the INT4 tensor type become uint8 with two values a
    byte (`bits=4`, implicit zero point 8): the same weights, in a form the ORT format (.ort,
    ONNX Runtime Mobile) can hold — it has no INT4 tensor type."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    count = 0
    for node in proto.graph.node:
        if node.op_type != "GatherBlockQuantized" or len(node.input) > 3:
            continue
        init = inits.get(node.input[0])
        if init is None or init.data_type != TensorProto.INT4:
            continue
        q = numpy_helper.to_array(init).astype(np.int16)
        if q.shape[-1] % 2:
            continue
        u = (q + 8).astype(np.uint8)
        packed = (u[..., 0::2] & 0xF) | ((u[..., 1::2] & 0xF) << 4)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(packed), init.name))
        node.attribute.append(helper.make_attribute("bits", 4))
        count += 1
    return count


class _quiet_root:
    """onnxruntime.quantization logs every skipped node through the root logger."""

    def __enter__(self):
        self.level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.root.setLevel(self.level)


def quantize(mode: str, src: Path, dst: Path, block_size: int = 32, quantize_embedding: bool = True,
             accuracy_level: int | None = 4) -> dict:
    with _quiet_root():
        if mode == "int8":
            return quantize_int8(src, dst)
        if mode == "int4":
            return quantize_int4(src, dst, block_size, quantize_embedding, accuracy_level)
    raise LLMPruneError(f"unknown quantization '{mode}'", "use int8 or int4")
