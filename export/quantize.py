"""Weight quantization of an fp32 export with onnxruntime.quantization: block-wise int8 and int4
weights (MatMulNBits; the embedding as GatherBlockQuantized, sharing the LM head's table when tied)."""

from __future__ import annotations

import logging
from pathlib import Path

from llmprune.artifact import WIDE
from llmprune.errors import LLMPruneError

from .onnx import load_model_proto, save_model_proto, stdout_to_log, untie_initializers

log = logging.getLogger(__name__)

# Block fitting of the 4-bit layers: rtn (round to nearest, min/max), hqq (fitted scale and float
# zero point: a slow ONNX Runtime kernel) and k_quant (ONNX Runtime's data-free search of each
# block's scale and integer zero point: the same layout and kernel as rtn).
INT4_ALGORITHMS = ("rtn", "hqq", "k_quant")


def quantize_int8(src: Path, dst: Path, block_size: int = 32, quantize_embedding: bool = True,
                  accuracy_level: int | None = 4) -> dict:
    """Weight-only int8: every MatMul (the LM head included) becomes MatMulNBits with 8-bit
    symmetric blocks, and the embedding lookup reads the same 8-bit table (stored once when
    tied). Activations stay float; `accuracy_level` 4 lets the kernel quantize them per block
    to int8 inside the product (the fast CPU path; without it ONNX Runtime dequantizes 8-bit
    weights on every call). Dynamic int8 (`quantize_dynamic`: MatMulInteger, one activation scale
    per tensor) measured +14% perplexity on Gemma-3-270M, whose activations have large outliers."""
    info = quantize_int4(src, dst, block_size, quantize_embedding, accuracy_level, symmetric=True, table_bits=8,
                         layer_bits=8)
    return {**info, "mode": "int8"}


def quantize_int4(src: Path, dst: Path, block_size: int = 32, quantize_embedding: bool = True,
                  accuracy_level: int | None = 4, symmetric: bool = False, table_bits: int = 8,
                  layer_bits: int = 4, embedding_bits: int | None = None, algorithm: str = "k_quant",
                  wide: tuple[str, ...] = WIDE) -> dict:
    """Block-wise 4-bit decoder layers: every MatMul of the layers becomes MatMulNBits (block
    `block_size`, `symmetric` or with zero points). The vocabulary table gets `table_bits` (8 or
    4; 0 keeps it fp32), symmetric, same blocks: the LM head MatMul becomes MatMulNBits of that
    width and, with `quantize_embedding`, the embedding Gather a GatherBlockQuantized — for a tied
    table one that reads the LM head's quantized weight, so the table is stored once.
    `wide` names MatMuls (substrings of node names, e.g. 'down_proj') kept at 8 bits.
    `algorithm` (the 4-bit blocks): 'k_quant' (default) searches each block's scale and integer
    zero point (ONNX Runtime's, data-free; the same layout and kernel as 'rtn', round to nearest
    from min and max); 'hqq' fits them half-quadratically but its float zero points take a slow
    kernel in ONNX Runtime (about 25x slower per MatMul), so it is not offered in ExportConfig.
    `layer_bits=0` and `embedding_bits` (default: `table_bits`) are there to measure where the
    error comes from."""
    embedding_bits = (table_bits if embedding_bits is None else embedding_bits) if quantize_embedding else 0
    _check_int4_args(table_bits, layer_bits, embedding_bits, algorithm)
    proto = load_model_proto(src)
    head = lm_head_matmul(proto)
    head_name = head.name if head is not None else None
    head_weight = head.input[1] if head is not None else None
    # A tied table the LM head's quantized weight will serve is not copied back out for its lookup
    # (a transposed copy of the largest matrix, only to be dropped): the lookup is rewired later.
    share_later = bool(head_weight and embedding_bits and embedding_bits == table_bits and _tied_lookups(proto, head_weight))
    untied = untie_initializers(proto, keep_lookups_of=head_weight if share_later else None)
    tables = embedding_tables(proto, untied)
    wide_names = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name != head_name
                  and any(w in n.name for w in wide)]
    if layer_bits:
        skip = ([head_name] if head_name else []) + wide_names
        if algorithm == "k_quant":    # ORT packs its zero points in pairs of whole blocks: other widths get rtn
            uneven = _uneven_matmuls(proto, block_size)
            proto = _nbits_pass(proto, layer_bits, block_size, symmetric, accuracy_level, "MatMul", skip + uneven,
                                algorithm)
        proto = _nbits_pass(proto, layer_bits, block_size, symmetric, accuracy_level, "MatMul", skip,
                            "rtn" if algorithm == "k_quant" else algorithm)
    if wide_names:
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in wide_names]
        proto = _nbits_pass(proto, 8, block_size, True, accuracy_level, "MatMul", others)
    if table_bits and head_name:
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name != head_name]
        proto = _nbits_pass(proto, table_bits, block_size, True, accuracy_level, "MatMul", others)
    shared = share_tied_lookups(proto, head_weight, block_size, table_bits) if share_later else 0
    if share_later and _tied_lookups(proto, head_weight):    # not shareable after all: the copy, as for other tables
        untied |= untie_initializers(proto)
        tables = embedding_tables(proto, untied)
    proto, shared_copies = _quantize_embedding_tables(proto, tables, untied, head_weight, embedding_bits, table_bits,
                                                      block_size, symmetric)
    shared += shared_copies
    repacked = repack_int4_gathers(proto)
    save_model_proto(proto, dst)
    return {"mode": "int4", "block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
            "layer_bits": layer_bits, "table_bits": table_bits, "embedding_bits": embedding_bits,
            "algorithm": algorithm, "wide": {"patterns": list(wide), "matmuls": len(wide_names)},
            "lm_head": head_name, "untied": len(untied), "tied_table_shared": shared,
            "embedding_repacked_uint8": repacked}


def _check_int4_args(table_bits: int, layer_bits: int, embedding_bits: int, algorithm: str) -> None:
    """The quantizer's packages are there and the widths and algorithm are known, before any work."""
    try:
        import onnx_ir  # noqa: F401 - MatMulNBitsQuantizer imports it
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: F401
    except ImportError as exc:
        raise LLMPruneError(f"int4 quantization needs a package that is missing ({exc.name})", "pip install onnx-ir") from exc
    for what, bits in (("table", table_bits), ("layer", layer_bits), ("embedding", embedding_bits)):
        if bits not in (0, 4, 8):
            raise LLMPruneError(f"{what} bits must be 4, 8 or 0 for fp32 (got {bits})", "use --table-bits 8 or 4")
    if algorithm not in INT4_ALGORITHMS:
        raise LLMPruneError(f"unknown int4 algorithm '{algorithm}'", f"use one of: {', '.join(INT4_ALGORITHMS)}")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)


def _uneven_matmuls(proto, block_size: int) -> list[str]:
    """MatMuls whose constant weight's input dimension is not an even number of blocks (ONNX
    Runtime's k_quant packs two blocks' zero points a byte and fails on the others)."""
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and inits[n.input[1]] and inits[n.input[1]][0] % (2 * block_size)]


def _quantize_embedding_tables(proto, tables, untied: dict, head_weight: str | None, embedding_bits: int,
                               table_bits: int, block_size: int, symmetric: bool):
    """The embedding Gathers at `embedding_bits`: a tied table reads the LM head's quantized
    weight when both have the same width (stored once); the rest become 4-bit Gathers or int8
    GatherBlockQuantized. Returns the model and how many Gathers now share the head's table."""
    shared = 0
    if not (embedding_bits and tables):
        return proto, shared
    if table_bits == embedding_bits and head_weight is not None:
        shared = share_tied_table(proto, {t: w for t, w in untied.items() if w == head_weight and t in tables},
                                  block_size, embedding_bits)
    left = {n.name for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in tables}
    if left and embedding_bits == 4:
        others = [n.name for n in proto.graph.node if n.op_type == "Gather" and n.name not in left]
        proto = _nbits_pass(proto, 4, block_size, symmetric, None, "Gather", others)
    elif left:
        quantize_gathers_int8(proto, left, block_size)
    return proto, shared


def lm_head_matmul(proto):
    """The MatMul with a constant weight that produces the logits (through elementwise ops such as
    a soft-cap), or None."""
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    frontier = [o.name for o in graph.output if o.name == "logits"]
    seen: set[int] = set()
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul" and node.input[1] in inits:
            return node
        if node.op_type in ("Mul", "Div", "Tanh", "Add", "Cast", "Reshape", "Identity"):
            frontier.extend(node.input)
    return None


def embedding_tables(proto, untied: dict[str, str]) -> set[str]:
    """Initializers read by a Gather as a [vocab, hidden] lookup table (axis 0, 2-D, the large
    ones): the token embedding(s)."""
    from onnx import helper

    inits = {i.name: i for i in proto.graph.initializer}
    tables = set(untied) & set(inits)
    for node in proto.graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        dims = list(inits[node.input[0]].dims)
        if axis == 0 and len(dims) == 2 and dims[0] >= 256 and dims[0] >= dims[1]:
            tables.add(node.input[0])
    return tables


def _nbits_pass(proto, bits: int, block_size: int, symmetric: bool, accuracy_level: int | None, op_type: str,
                exclude: list[str], algorithm: str = "rtn"):
    """One MatMulNBitsQuantizer pass over the nodes of `op_type` that are not in `exclude`."""
    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    axes = (("MatMul", 0), ("Gather", 1))
    algo = None
    if algorithm == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=(op_type,), quant_axes=axes)
    elif algorithm == "k_quant" and bits == 4:      # ORT's k-quant search is written for 4 bits
        from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig

        algo = KQuantWeightOnlyQuantConfig(op_types_to_quantize=(op_type,))
    quantizer = MatMulNBitsQuantizer(
        proto, bits=bits, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
        op_types_to_quantize=(op_type,), quant_axes=axes, nodes_to_exclude=exclude, algo_config=algo,
    )
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    with np.errstate(divide="ignore", invalid="ignore"), stdout_to_log():   # k_quant prints a progress bar
        quantizer.process()
    return quantizer.model.model


def share_tied_table(proto, tied: dict[str, str], block_size: int, bits: int) -> int:
    """For a tied embedding, the lookup reads the LM head's MatMulNBits weight instead of a copy
    of its own, so the table is stored once (see `_shared_lookup`). `tied`: {the lookup's table:
    the head's weight}."""
    nodes = list(proto.graph.node)
    shared = 0
    for table, weight in tied.items():
        gathers = [n for n in nodes if n.op_type == "Gather" and n.input[0] == table]
        new = _shared_lookup(proto, weight, gathers[0].input[1], gathers[0].output[0], table, block_size, bits) \
            if len(gathers) == 1 else None
        if new is None:
            continue
        at = nodes.index(gathers[0])
        nodes[at:at + 1] = new
        shared += 1
    if shared:
        _replace_nodes(proto, nodes)
    return shared


def _shared_lookup(proto, weight: str, indices: str, output: str, prefix: str, block_size: int, bits: int):
    """The nodes that look `indices` up in the LM head's quantized weight (`weight` quantized by
    MatMulNBits) into `output`, or None when the head is not in that form. MatMulNBits keeps B as
    uint8 [vocab, hidden/block, block·bits/8] (4 bits: two values a byte, implicit zero point 8;
    8 bits: implicit zero point 128) with one scale a block: as GatherBlockQuantized data that is
    the same table, gathered on axis 0 and dequantized along the last axis; its [batch, seq,
    blocks, block] output is reshaped to [batch, seq, hidden]."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    matmuls = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{weight}_Q{bits}" and len(n.input) == 3]
    data = next((i for i in graph.initializer if matmuls and i.name == matmuls[0].input[1]), None)
    if len(matmuls) != 1 or data is None or len(data.dims) != 3 or data.dims[2] * 8 != block_size * bits:
        return None
    vocab, blocks = int(data.dims[0]), int(data.dims[1])
    shape_3d = numpy_helper.from_array(np.array([vocab, blocks, 1], np.int64), f"{prefix}_llmprune_scales_shape")
    shape_out = numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{prefix}_llmprune_hidden_shape")
    graph.initializer.extend([shape_3d, shape_out])
    scales_3d, gathered = f"{prefix}_llmprune_scales_3d", f"{output}_llmprune_blocks"
    return [
        helper.make_node("Reshape", [matmuls[0].input[2], shape_3d.name], [scales_3d], name=f"{prefix}_llmprune_scales_reshape"),
        helper.make_node("GatherBlockQuantized", [data.name, indices, scales_3d], [gathered],
                         name=f"{prefix}_llmprune_shared_lookup", domain="com.microsoft",
                         gather_axis=0, quantize_axis=2, block_size=block_size, bits=bits),
        helper.make_node("Reshape", [gathered, shape_out.name], [output], name=f"{prefix}_llmprune_hidden"),
    ]


def _tied_lookups(proto, weight: str) -> list[tuple]:
    """The embedding lookups export wrote for a table tied to the LM head `weight` ([hidden, vocab]):
    (Gather on axis 1 of `weight`, the Transpose of its output to [..., hidden])."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    pairs = []
    for node in proto.graph.node:
        gather = producer.get(node.input[0]) if node.op_type == "Transpose" else None
        if node.name.startswith("llmprune_tied_lookup_") and gather is not None and gather.op_type == "Gather" \
                and gather.input[0] == weight:
            pairs.append((gather, node))
    return pairs


def share_tied_lookups(proto, weight: str, block_size: int, bits: int) -> int:
    """The lookups of a table tied to the LM head (`_tied_lookups`) read the head's quantized
    weight, as `share_tied_table` does for an untied copy, without that copy ever being made.
    Returns how many were rewired."""
    nodes = list(proto.graph.node)
    shared = 0
    for k, (gather, transpose) in enumerate(_tied_lookups(proto, weight)):
        new = _shared_lookup(proto, weight, gather.input[1], transpose.output[0], f"{weight}_lookup{k}", block_size, bits)
        if new is None:
            continue
        at = nodes.index(transpose)
        nodes[at:at + 1] = new
        if not any(gather.output[0] in n.input for n in nodes):
            nodes.remove(gather)
        shared += 1
    if shared:
        _replace_nodes(proto, nodes)
    return shared


def _replace_nodes(proto, nodes: list) -> None:
    """Install the rewritten node list, drop initializers nothing reads any more and declare the
    com.microsoft opset the new contrib nodes need."""
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused_initializers(proto.graph)
    _ensure_contrib_opset(proto)


def quantize_gathers_int8(proto, names: set[str], block_size: int) -> int:
    """Plain axis-0 Gathers of a [vocab, hidden] table -> GatherBlockQuantized with 8-bit symmetric
    blocks along hidden (uint8, implicit zero point 128, one scale a block)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = list(graph.node)
    count = 0
    for at, node in enumerate(nodes):
        if node.name not in names:
            continue
        table = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        vocab, hidden = table.shape
        pad = (-hidden) % block_size
        blocks = np.pad(table, ((0, 0), (0, pad))).reshape(vocab, -1, block_size)
        scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = (np.clip(np.rint(blocks / scale), -127, 127) + 128).astype(np.uint8).reshape(vocab, -1)[:, :hidden]
        data = numpy_helper.from_array(np.ascontiguousarray(q), f"{node.input[0]}_Q8")
        scales = numpy_helper.from_array(np.ascontiguousarray(scale[..., 0]), f"{node.input[0]}_scales8")
        graph.initializer.extend([data, scales])
        nodes[at] = helper.make_node("GatherBlockQuantized", [data.name, node.input[1], scales.name], list(node.output),
                                     name=f"{node.name}_Q8", domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                     block_size=block_size, bits=8)
        count += 1
    if count:
        _replace_nodes(proto, nodes)
    return count


def _drop_unused_initializers(graph) -> None:
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _ensure_contrib_opset(proto) -> None:
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


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


def quantize(mode: str, src: Path, dst: Path, config=None) -> dict:
    """Quantize the fp32 model `src` into `dst` as `mode` (int8 or int4) with the options of an
    ExportConfig (defaults when None)."""
    from .config import ExportConfig

    c = config or ExportConfig()
    with _quiet_root():
        if mode == "int8":
            return quantize_int8(src, dst, c.block_size, c.quantize_embedding, c.accuracy_level)
        if mode == "int4":
            return quantize_int4(src, dst, c.block_size, c.quantize_embedding, c.accuracy_level, c.symmetric,
                                 c.table_bits, algorithm=c.int4_fit, wide=tuple(c.keep_8bit))
    raise LLMPruneError(f"unknown quantization '{mode}'", "use int8 or int4")
