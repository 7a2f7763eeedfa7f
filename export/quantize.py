"""Weight quantization of an fp32 export with onnxruntime.quantization: block-wise int8 and int4
weights (MatMulNBits; the embedding as GatherBlockQuantized, sharing the LM head's table when tied).

The model is read with its weights apart (`read_model`: the graph in memory, each weight a memory
map of the file) and each weight is quantized by ONNX Runtime's quantizer on a model of its one
node, a slice of output columns at a time, so the quantizer never holds the whole fp32 model (it
parses and copies it whole: 3 GB at its peak for a 1 GB model); the quantized model is streamed
to its file by `write_model`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from llmprune.artifact import WIDE
from llmprune.errors import LLMPruneError

from .onnx import stdout_to_log, untie_initializers
from .weights import add_initializer, forget_pages, read_model, tensor_parts, write_model

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
    proto, arrays = read_model(src)
    head = lm_head_matmul(proto)
    head_name = head.name if head is not None else None
    head_weight = head.input[1] if head is not None else None
    # A tied table the LM head's quantized weight will serve is not copied back out for its lookup
    # (a transposed copy of the largest matrix, only to be dropped): the lookup is rewired later.
    share_later = bool(head_weight and embedding_bits and embedding_bits == table_bits and _tied_lookups(proto, head_weight))
    untied = untie_initializers(proto, arrays, keep_lookups_of=head_weight if share_later else None)
    tables = embedding_tables(proto, untied)
    wide_names = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name != head_name
                  and any(w in n.name for w in wide)]
    if layer_bits:
        skip = ([head_name] if head_name else []) + wide_names
        if algorithm == "k_quant":    # ORT packs its zero points in pairs of whole blocks: other widths get rtn
            uneven = _uneven_matmuls(proto, block_size)
            quantize_nodes(proto, arrays, layer_bits, block_size, symmetric, accuracy_level, "MatMul", skip + uneven,
                           algorithm)
        quantize_nodes(proto, arrays, layer_bits, block_size, symmetric, accuracy_level, "MatMul", skip,
                       "rtn" if algorithm == "k_quant" else algorithm)
    if wide_names:
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in wide_names]
        quantize_nodes(proto, arrays, 8, block_size, True, accuracy_level, "MatMul", others)
    if table_bits and head_name:
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name != head_name]
        quantize_nodes(proto, arrays, table_bits, block_size, True, accuracy_level, "MatMul", others)
    shared = share_tied_lookups(proto, arrays, head_weight, block_size, table_bits) if share_later else 0
    if share_later and _tied_lookups(proto, head_weight):    # not shareable after all: the copy, as for other tables
        untied |= untie_initializers(proto, arrays)
        tables = embedding_tables(proto, untied)
    shared += _quantize_embedding_tables(proto, arrays, tables, untied, head_weight, embedding_bits, table_bits,
                                         block_size, symmetric)
    repacked = repack_int4_gathers(proto, arrays)
    write_model(proto, arrays, dst)
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


def _quantize_embedding_tables(proto, arrays: dict, tables, untied: dict, head_weight: str | None, embedding_bits: int,
                               table_bits: int, block_size: int, symmetric: bool) -> int:
    """The embedding Gathers at `embedding_bits`: a tied table reads the LM head's quantized
    weight when both have the same width (stored once); the rest become 4-bit Gathers or int8
    GatherBlockQuantized. Returns how many Gathers now share the head's table."""
    shared = 0
    if not (embedding_bits and tables):
        return shared
    if table_bits == embedding_bits and head_weight is not None:
        shared = share_tied_table(proto, arrays, {t: w for t, w in untied.items() if w == head_weight and t in tables},
                                  block_size, embedding_bits)
    left = {n.name for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in tables}
    if left and embedding_bits == 4:
        others = [n.name for n in proto.graph.node if n.op_type == "Gather" and n.name not in left]
        quantize_nodes(proto, arrays, 4, block_size, symmetric, None, "Gather", others)
    elif left:
        quantize_gathers_int8(proto, arrays, left, block_size)
    return shared


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


# fp32 bytes of a weight given to ONNX Runtime's quantizer at once (its slices are independent).
_SLICE_BYTES = 32 << 20


def quantize_nodes(proto, arrays: dict, bits: int, block_size: int, symmetric: bool, accuracy_level: int | None,
                   op_type: str, exclude: list[str], algorithm: str = "rtn") -> int:
    """Each node of `op_type` (MatMul or Gather) with a constant 2-D weight, not in `exclude`,
    quantized by ONNX Runtime's MatMulNBitsQuantizer as it would in a pass over the whole model —
    but on a model of that one node, a slice of the weight at a time (`_quantize_node`); the fp32
    weight is dropped once nothing reads it. Returns how many nodes were quantized."""
    from collections import Counter

    readers = Counter(name for n in proto.graph.node for name in n.input)
    nodes, count = [], 0
    for node in list(proto.graph.node):
        weight = (node.input[1] if op_type == "MatMul" else node.input[0]) if node.op_type == op_type else None
        done = None
        if weight in arrays and arrays[weight].ndim == 2 and node.name not in exclude:
            done = _quantize_node(proto, arrays, node, weight, bits, block_size, symmetric, accuracy_level, algorithm)
        if done is None:
            nodes.append(node)
            continue
        new_nodes, tensors = done
        nodes.extend(new_nodes)
        for header, data in tensors:
            add_initializer(proto.graph, arrays, header.name, data, header)
        readers[weight] -= 1
        if not readers[weight]:
            del arrays[weight]        # unmapped now; its header goes with _replace_nodes
        count += 1
    if count:
        _replace_nodes(proto, arrays, nodes)
    return count


def _quantize_node(proto, arrays: dict, node, weight: str, bits: int, block_size: int, symmetric: bool,
                   accuracy_level: int | None, algorithm: str):
    """(the nodes that replace `node`, [(initializer header, data)]) or None when the quantizer
    leaves it. The weight goes to the quantizer in slices along the axis whose slices it quantizes
    independently — MatMul: B's output columns (its blocks run down K); Gather: the table's rows —
    and the slices' outputs, laid out with that axis outermost, are joined; HQQ's fit stops on the
    whole tensor's error, so it gets the tensor whole. Slices hold an even number of rows so that
    two 4-bit values never share a byte across slices."""
    table = arrays[weight]
    along_columns = node.op_type == "MatMul"
    total = table.shape[1] if along_columns else table.shape[0]
    width = table.nbytes // max(1, total)
    step = total if algorithm == "hqq" else max(2, _SLICE_BYTES // max(1, width) // 2 * 2)
    parts, new_nodes = [], None
    for start in range(0, total, step):
        piece = np.ascontiguousarray(table[:, start:start + step] if along_columns else table[start:start + step],
                                     dtype=np.float32)
        forget_pages(table)
        new_nodes, tensors = _quantize_one(proto, node, weight, piece, bits, block_size, symmetric, accuracy_level,
                                           algorithm)
        if [n.op_type for n in new_nodes] == [node.op_type]:
            return None
        parts.append(tensors)
    joined = []
    for k, (header, _) in enumerate(parts[0]):
        data = parts[0][k][1] if len(parts) == 1 else np.concatenate([p[k][1] for p in parts])
        if header.dims:
            header.dims[0] = sum(p[k][0].dims[0] for p in parts)
        joined.append((header, data))
    for attribute in (a for n in new_nodes for a in n.attribute if n.op_type == "MatMulNBits" and a.name == "N"):
        attribute.i = total
    return new_nodes, joined


def _quantize_one(proto, node, weight: str, piece: np.ndarray, bits: int, block_size: int, symmetric: bool,
                  accuracy_level: int | None, algorithm: str):
    """ONNX Runtime's quantizer on a model of `node` alone with `piece` as its weight: the nodes it
    made and their new initializers as (header, data) pairs."""
    from onnx import TensorProto, helper, numpy_helper

    if node.op_type == "MatMul":
        inputs = [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, ["rows", piece.shape[0]])]
    else:
        inputs = [helper.make_tensor_value_info(node.input[1], TensorProto.INT64, ["rows"])]
    outputs = [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)]
    graph = helper.make_graph([node], "llmprune_one_node", inputs, outputs, [numpy_helper.from_array(piece, weight)])
    one = helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    done = _nbits_pass(one, bits, block_size, symmetric, accuracy_level, node.op_type, [], algorithm)
    made = {name for n in done.graph.node for name in n.input} - {weight}
    tensors = [tensor_parts(tensor) for tensor in done.graph.initializer if tensor.name in made]
    return list(done.graph.node), tensors


def _nbits_pass(proto, bits: int, block_size: int, symmetric: bool, accuracy_level: int | None, op_type: str,
                exclude: list[str], algorithm: str = "rtn"):
    """One MatMulNBitsQuantizer pass over the nodes of `op_type` that are not in `exclude`."""
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


def share_tied_table(proto, arrays: dict, tied: dict[str, str], block_size: int, bits: int) -> int:
    """For a tied embedding, the lookup reads the LM head's MatMulNBits weight instead of a copy
    of its own, so the table is stored once (see `_shared_lookup`). `tied`: {the lookup's table:
    the head's weight}."""
    nodes = list(proto.graph.node)
    shared = 0
    for table, weight in tied.items():
        gathers = [n for n in nodes if n.op_type == "Gather" and n.input[0] == table]
        new = _shared_lookup(proto, arrays, weight, gathers[0].input[1], gathers[0].output[0], table, block_size, bits) \
            if len(gathers) == 1 else None
        if new is None:
            continue
        at = nodes.index(gathers[0])
        nodes[at:at + 1] = new
        shared += 1
    if shared:
        _replace_nodes(proto, arrays, nodes)
    return shared


def _shared_lookup(proto, arrays: dict, weight: str, indices: str, output: str, prefix: str, block_size: int, bits: int):
    """The nodes that look `indices` up in the LM head's quantized weight (`weight` quantized by
    MatMulNBits) into `output`, or None when the head is not in that form. MatMulNBits keeps B as
    uint8 [vocab, hidden/block, block·bits/8] (4 bits: two values a byte, implicit zero point 8;
    8 bits: implicit zero point 128) with one scale a block: as GatherBlockQuantized data that is
    the same table, gathered on axis 0 and dequantized along the last axis; its [batch, seq,
    blocks, block] output is reshaped to [batch, seq, hidden]."""
    from onnx import helper

    graph = proto.graph
    matmuls = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{weight}_Q{bits}" and len(n.input) == 3]
    data = next((i for i in graph.initializer if matmuls and i.name == matmuls[0].input[1]), None)
    if len(matmuls) != 1 or data is None or len(data.dims) != 3 or data.dims[2] * 8 != block_size * bits:
        return None
    vocab, blocks = int(data.dims[0]), int(data.dims[1])
    shape_3d, shape_out = f"{prefix}_llmprune_scales_shape", f"{prefix}_llmprune_hidden_shape"
    add_initializer(graph, arrays, shape_3d, np.array([vocab, blocks, 1], np.int64))
    add_initializer(graph, arrays, shape_out, np.array([0, 0, -1], np.int64))
    scales_3d, gathered = f"{prefix}_llmprune_scales_3d", f"{output}_llmprune_blocks"
    return [
        helper.make_node("Reshape", [matmuls[0].input[2], shape_3d], [scales_3d], name=f"{prefix}_llmprune_scales_reshape"),
        helper.make_node("GatherBlockQuantized", [data.name, indices, scales_3d], [gathered],
                         name=f"{prefix}_llmprune_shared_lookup", domain="com.microsoft",
                         gather_axis=0, quantize_axis=2, block_size=block_size, bits=bits),
        helper.make_node("Reshape", [gathered, shape_out], [output], name=f"{prefix}_llmprune_hidden"),
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


def share_tied_lookups(proto, arrays: dict, weight: str, block_size: int, bits: int) -> int:
    """The lookups of a table tied to the LM head (`_tied_lookups`) read the head's quantized
    weight, as `share_tied_table` does for an untied copy, without that copy ever being made.
    Returns how many were rewired."""
    nodes = list(proto.graph.node)
    shared = 0
    for k, (gather, transpose) in enumerate(_tied_lookups(proto, weight)):
        new = _shared_lookup(proto, arrays, weight, gather.input[1], transpose.output[0], f"{weight}_lookup{k}", block_size,
                             bits)
        if new is None:
            continue
        at = nodes.index(transpose)
        nodes[at:at + 1] = new
        if not any(gather.output[0] in n.input for n in nodes):
            nodes.remove(gather)
        shared += 1
    if shared:
        _replace_nodes(proto, arrays, nodes)
    return shared


def _replace_nodes(proto, arrays: dict, nodes: list) -> None:
    """Install the rewritten node list, drop initializers nothing reads any more (and their data:
    a mapped fp32 weight is unmapped) and declare the com.microsoft opset the new contrib nodes need."""
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused_initializers(proto.graph, arrays)
    _ensure_contrib_opset(proto)


def quantize_gathers_int8(proto, arrays: dict, names: set[str], block_size: int) -> int:
    """Plain axis-0 Gathers of a [vocab, hidden] table -> GatherBlockQuantized with 8-bit symmetric
    blocks along hidden (uint8, implicit zero point 128, one scale a block)."""
    from onnx import helper

    graph = proto.graph
    nodes = list(graph.node)
    count = 0
    for at, node in enumerate(nodes):
        if node.name not in names:
            continue
        q, scales = _int8_table(arrays[node.input[0]], block_size)
        data_name, scales_name = f"{node.input[0]}_Q8", f"{node.input[0]}_scales8"
        add_initializer(graph, arrays, data_name, q)
        add_initializer(graph, arrays, scales_name, scales)
        nodes[at] = helper.make_node("GatherBlockQuantized", [data_name, node.input[1], scales_name], list(node.output),
                                     name=f"{node.name}_Q8", domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                     block_size=block_size, bits=8)
        count += 1
    if count:
        _replace_nodes(proto, arrays, nodes)
    return count


def _int8_table(table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A [vocab, hidden] table as uint8 values (zero point 128) and one fp32 scale per block of a
    row, computed a slice of rows at a time (the table may be a memory map, or a transposed one)."""
    vocab, hidden = table.shape
    pad = (-hidden) % block_size
    q = np.empty((vocab, hidden), np.uint8)
    scales = np.empty((vocab, (hidden + pad) // block_size), np.float32)
    rows = max(1, _SLICE_BYTES // max(1, hidden * 4))
    for start in range(0, vocab, rows):
        part = np.asarray(table[start:start + rows], np.float32)
        blocks = np.pad(part, ((0, 0), (0, pad))).reshape(len(part), -1, block_size)
        scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q[start:start + rows] = (np.clip(np.rint(blocks / scale), -127, 127) + 128).astype(np.uint8).reshape(
            len(part), -1)[:, :hidden]
        scales[start:start + rows] = scale[..., 0]
        forget_pages(table)
    return q, scales


def _drop_unused_initializers(graph, arrays: dict) -> None:
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    for init in graph.initializer:
        if init.name not in used:
            arrays.pop(init.name, None)
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _ensure_contrib_opset(proto) -> None:
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def repack_int4_gathers(proto, arrays: dict) -> int:
    """GatherBlockQuantized tables stored as the INT4 tensor type become uint8 with two values a
    byte (`bits=4`, implicit zero point 8): the same weights, in a form the ORT format (.ort,
    ONNX Runtime Mobile) can hold — it has no INT4 tensor type."""
    from onnx import TensorProto, helper

    inits = {i.name: i for i in proto.graph.initializer}
    count = 0
    for node in proto.graph.node:
        if node.op_type != "GatherBlockQuantized" or len(node.input) > 3:
            continue
        init = inits.get(node.input[0])
        if init is None or init.data_type != TensorProto.INT4 or not init.dims or init.dims[-1] % 2:
            continue
        # INT4 packs two signed values a byte, low nibble first; uint8 with zero point 8 holds
        # value + 8 in the same nibble, which is the nibble with its top bit flipped.
        arrays[init.name] = (np.asarray(arrays[init.name]) ^ 0x88).reshape(*init.dims[:-1], init.dims[-1] // 2)
        init.data_type = TensorProto.UINT8
        init.dims[-1] //= 2
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
