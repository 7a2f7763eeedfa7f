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
    return {"mode": "int8", "weight_type": "int8 per-channel (dynamic activations)", "ops": ["MatMul", "Gather"], "untied": untied}


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
    repacked = repack_int4_gathers(proto)
    save_model_proto(proto, dst)
    return {"mode": "int4", "block_size": block_size, "symmetric": True, "ops": list(ops),
            "accuracy_level": accuracy_level, "untied": untied,
            "embedding_repacked_uint8": repacked}


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
