"""The fp32 export's weights kept out of torch's ONNX serializer and written once, from memory.

torch.onnx's TorchScript exporter builds the whole model as one protobuf and copies it two or three
times on its way to the file, and ONNX shape inference copies every weight again (measured on
Gemma-3-270M, 1.07 GB of weights: 6.7 GB at the exporter's peak, 8.1 GB with optimum's tied-weight
check). Here the exporter writes the graph alone; the initializers it would have embedded (the
model's parameters and the constants it folded, by name) are kept as tensors, turned into
initializers of the loaded graph (`take_weights`), and streamed into the file by `write_model`
straight from their memory."""

from __future__ import annotations

import io
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2_000_000_000   # bytes: above this the weights go to external data
EXTERNAL_MIN_BYTES = 1024        # smaller tensors stay in model.onnx even then
_TENSOR_RAW_DATA = 9             # TensorProto.raw_data
_GRAPH_INITIALIZER = 5           # GraphProto.initializer
_MODEL_GRAPH = 7                 # ModelProto.graph


@contextmanager
def weights_kept_out(kept: dict):
    """While torch.onnx's TorchScript exporter runs inside the block, the graph's initializers go
    into `kept` (name -> tensor) instead of the file, and ONNX shape inference runs on the graph's
    types alone (given the values it copies every weight, to no effect on these graphs: the
    exported graph is byte-identical). Yields False and changes nothing on a torch without these
    internals (the weights are then in the file, as before)."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter
    except ImportError:
        exporter = None
    to_graph = getattr(exporter, "_model_to_graph", None)
    infer = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if to_graph is None or infer is None:
        log.debug("torch.onnx internals not found: the exporter writes the weights itself")
        yield False
        return

    def model_to_graph(*args, **kwargs):
        graph, params, out = to_graph(*args, **kwargs)
        kept.update(params)
        return graph, {}, out

    def infer_types(graph, params, *args, **kwargs):
        return infer(graph, {}, *args, **kwargs)

    exporter._model_to_graph, torch._C._jit_pass_onnx_graph_shape_type_inference = model_to_graph, infer_types
    try:
        yield True
    finally:
        exporter._model_to_graph, torch._C._jit_pass_onnx_graph_shape_type_inference = to_graph, infer


def _meta(name: str, array: np.ndarray):
    """An initializer without its data (name, type, shape)."""
    from onnx import TensorProto, helper

    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    return tensor


def add_initializer(graph, arrays: dict[str, np.ndarray], name: str, array: np.ndarray, header=None) -> None:
    """An initializer `name` whose data is `array`; `header`: its TensorProto without data, where
    the array alone does not say the type (packed 4-bit types are kept as their raw bytes)."""
    arrays[name] = array
    graph.initializer.append(header if header is not None else _meta(name, array))


def take_weights(proto, kept: dict) -> dict[str, np.ndarray]:
    """Graph inputs that are kept weights become initializers; returns their data by name: views
    of the tensors, not copies (a folded transpose stays a strided view of the table until it is
    written, a block at a time)."""
    graph = proto.graph
    arrays: dict[str, np.ndarray] = {}
    inputs = [value for value in graph.input if value.name not in kept]
    for value in graph.input:
        if value.name in kept:
            add_initializer(graph, arrays, value.name, kept[value.name].detach().numpy())
    del graph.input[:]
    graph.input.extend(inputs)
    return arrays


def split_weights(proto) -> dict[str, np.ndarray]:
    """The initializers' data taken out of a loaded model (the exporter wrote it in the file)."""
    from onnx import numpy_helper

    arrays: dict[str, np.ndarray] = {}
    inits = list(proto.graph.initializer)
    del proto.graph.initializer[:]
    for init in inits:
        add_initializer(proto.graph, arrays, init.name, numpy_helper.to_array(init))
    return arrays


def drop_initializers(graph, arrays: dict[str, np.ndarray], names: set[str]) -> None:
    keep = [i for i in graph.initializer if i.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for name in names:
        arrays.pop(name, None)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


_BLOCK_BYTES = 16 << 20


def _write_array(f, array: np.ndarray) -> None:
    """The array's bytes as ONNX stores them (C order, little-endian), from its memory: a strided
    view is copied a block of rows at a time, never whole."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if array.ndim == 0 or array.flags.c_contiguous:
        f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        return
    rows = max(1, _BLOCK_BYTES // max(1, array[0].nbytes))
    for start in range(0, array.shape[0], rows):
        block = np.ascontiguousarray(array[start:start + rows])
        f.write(memoryview(block.reshape(-1).view(np.uint8)))


def _layout(proto, arrays: dict[str, np.ndarray]) -> tuple[bytes, bytes, list[tuple[bytes, np.ndarray]], int]:
    """The model as it is written in one file: the model's fields without its graph, the graph's
    fields without its initializers, each initializer's header (its fields, then the raw data's
    key and length) with its data, and the graph's length. Protobuf reads fields in any order, so
    the graph and its initializers written last decode to the same model."""
    graph = proto.graph
    inits = list(graph.initializer)
    del graph.initializer[:]
    try:
        graph_fields = graph.SerializeToString()
        model = type(proto)()
        model.CopyFrom(proto)
    finally:
        graph.initializer.extend(inits)
    model.ClearField("graph")
    entries = []
    graph_length = len(graph_fields)
    for init in inits:
        array = arrays[init.name]
        fields = init.SerializeToString()
        head = fields + _field(_TENSOR_RAW_DATA, array.nbytes)
        entries.append((_field(_GRAPH_INITIALIZER, len(head) + array.nbytes) + head, array))
        graph_length += len(entries[-1][0]) + array.nbytes
    return model.SerializeToString(), graph_fields, entries, graph_length


def model_file_bytes(proto, arrays: dict[str, np.ndarray]) -> int:
    """The size of the model written as one file."""
    model_fields, _, _, graph_length = _layout(proto, arrays)
    return len(model_fields) + len(_field(_MODEL_GRAPH, graph_length)) + graph_length


def write_model(proto, arrays: dict[str, np.ndarray], path: Path, limit: int = PROTOBUF_LIMIT) -> list[Path]:
    """Writes the model with its initializers' data from `arrays`, each tensor streamed from its
    memory: one .onnx file, or .onnx + one external data file when it would pass protobuf's 2 GB.
    Returns the files written."""
    data_path = path.with_name(path.name + "_data")
    for stale in (path, data_path):
        if stale.exists():
            stale.unlink()
    if sum(a.nbytes for a in arrays.values()) >= limit:
        return _write_external(proto, arrays, path, data_path)
    model_fields, graph_fields, entries, graph_length = _layout(proto, arrays)
    with open(path, "wb") as f:
        f.write(model_fields)
        f.write(_field(_MODEL_GRAPH, graph_length))
        f.write(graph_fields)
        for head, array in entries:
            f.write(head)
            _write_array(f, array)
    return [path]


def _write_external(proto, arrays: dict[str, np.ndarray], path: Path, data_path: Path) -> list[Path]:
    import onnx

    offset = 0
    with open(data_path, "wb") as f:
        for init in proto.graph.initializer:
            array = arrays[init.name]
            if array.nbytes < EXTERNAL_MIN_BYTES:    # stays in model.onnx
                buffer = io.BytesIO()
                _write_array(buffer, array)
                init.raw_data = buffer.getvalue()
                continue
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
            init.data_location = onnx.TensorProto.EXTERNAL
            _write_array(f, array)
            offset += array.nbytes
    onnx.save_model(proto, str(path))
    os.chmod(data_path, 0o644)
    return [path, data_path]


# ---------------------------------------------------------------- reading a model with its weights apart

# Element types ONNX packs two to a byte: their data is kept as the raw bytes.
_PACKED_TYPES = (21, 22, 23)        # TensorProto.UINT4, INT4, FLOAT4E2M1
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """The protobuf fields in buf[start:end]: (number, field start, field end, payload span of a
    length-delimited field or None). Payloads are not read."""
    pos = start
    while pos < end:
        key, at = _read_varint(buf, pos)
        kind, payload = key & 7, None
        if kind == 0:
            _, at = _read_varint(buf, at)
        elif kind == 1:
            at += 8
        elif kind == 5:
            at += 4
        elif kind == 2:
            length, at = _read_varint(buf, at)
            payload, at = (at, at + length), at + length
        else:
            raise ValueError(f"protobuf wire type {kind} at byte {pos}")
        yield key >> 3, pos, at, payload
        pos = at


def read_model(path: Path):
    """The model at `path` with its initializers' data apart (the inverse of `write_model`):
    returns (ModelProto whose initializers carry name, type and shape only, {name: data}), each
    tensor's data a read-only memory map of model.onnx's raw bytes or of its external data file —
    nothing is copied, and a page of weights is in memory only while it is read (a 1 GB model
    parsed by protobuf costs 2 GB at once)."""
    import mmap

    import onnx

    path = Path(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        model_fields, graph_fields, tensors = bytearray(), bytearray(), []
        for number, start, end, payload in _fields(buf, 0, len(buf)):
            if number != _MODEL_GRAPH or payload is None:
                model_fields += buf[start:end]
                continue
            for inner, s, e, span in _fields(buf, *payload):
                if inner == _GRAPH_INITIALIZER and span is not None:
                    tensors.append(_scan_tensor(buf, *span))
                else:
                    graph_fields += buf[s:e]
    finally:
        buf.close()
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(model_fields))
    proto.graph.ParseFromString(bytes(graph_fields))
    arrays: dict[str, np.ndarray] = {}
    for header, raw in tensors:
        tensor = onnx.TensorProto()
        tensor.ParseFromString(header)
        arrays[tensor.name] = _tensor_data(tensor, raw, path)
        proto.graph.initializer.append(_header(tensor))
    return proto, arrays


def _scan_tensor(buf, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto's fields but its raw data, and the span of the raw data in the file."""
    header, raw = bytearray(), None
    for number, s, e, payload in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA:
            raw = payload
        else:
            header += buf[s:e]
    return bytes(header), raw


def _tensor_data(tensor, raw: tuple[int, int] | None, path: Path) -> np.ndarray:
    from onnx import TensorProto, numpy_helper

    if tensor.data_location == TensorProto.EXTERNAL:
        info = {entry.key: entry.value for entry in tensor.external_data}
        offset = int(info.get("offset", 0))
        source = path.parent / info["location"]
        length = int(info["length"]) if "length" in info else source.stat().st_size - offset
        return _mapped(tensor, source, offset, length)
    if raw is not None:
        return _mapped(tensor, path, raw[0], raw[1] - raw[0])
    return numpy_helper.to_array(tensor)


def _mapped(tensor, source: Path, offset: int, length: int) -> np.ndarray:
    """The tensor's bytes in `source` as a read-only memory map of its type and shape (packed
    4-bit types: the raw bytes); an error when the file does not hold that many bytes."""
    from onnx import helper

    from llmprune.errors import LLMPruneError

    shape = tuple(int(d) for d in tensor.dims)
    packed = tensor.data_type in _PACKED_TYPES
    dtype = np.dtype(np.uint8) if packed else np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    expected = (int(np.prod(shape)) + 1) // 2 if packed else int(np.prod(shape)) * dtype.itemsize
    if length != expected or offset + length > source.stat().st_size:
        raise LLMPruneError(f"'{source}' is damaged: tensor '{tensor.name}' should hold {expected} bytes",
                            "export the model again with `llmprune export`")
    if length == 0:
        return np.zeros(shape, dtype)
    return np.memmap(source, dtype, mode="r", offset=offset, shape=(length,) if packed else shape)


def tensor_parts(tensor) -> tuple[object, np.ndarray]:
    """A TensorProto (e.g. made by ONNX Runtime's quantizer) as its header without data and its
    data (packed 4-bit types: the raw bytes), for `add_initializer`."""
    from onnx import numpy_helper

    header = _header(tensor)
    if tensor.data_type in _PACKED_TYPES:
        data = np.frombuffer(tensor.raw_data, np.uint8) if tensor.HasField("raw_data") else _pack4(numpy_helper.to_array(tensor))
    else:
        data = numpy_helper.to_array(tensor)
    return header, data


def _header(tensor):
    """A copy of the TensorProto without its data: name, type, shape (what `arrays` goes with)."""
    header = type(tensor)()
    header.CopyFrom(tensor)
    for name in _TYPED_FIELDS + ("raw_data", "external_data", "data_location"):
        header.ClearField(name)
    return header


def _pack4(values: np.ndarray) -> np.ndarray:
    flat = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def forget_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's memory (they stay in the page
    cache and come back if read again): a weight read once for quantization does not stay
    resident for the rest of the run. Nothing for an array in ordinary memory."""
    import mmap

    held = getattr(array, "_mmap", None)
    if held is None or not hasattr(held, "madvise"):
        return
    try:
        held.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass
