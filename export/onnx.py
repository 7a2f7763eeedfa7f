"""ONNX export of an in-memory (pruned) causal LM (the graph traced by export/decoder_graph.py), tied
weights stored once."""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from llmprune.arch import adapter_for
from llmprune.errors import LLMPruneError

from .weights import (
    add_initializer,
    drop_initializers,
    model_file_bytes,
    split_weights,
    take_weights,
    weights_kept_out,
    write_model,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
_MIN_DEDUPE_ELEMENTS = 1024


# Opsets the exporter takes for these decoders: scaled_dot_product_attention needs 14; the top is
# the newest torch.onnx writes. The default is the one optimum-onnx wrote (its folders and ours alike).
MIN_OPSET = 14
DEFAULT_OPSET = 18


def max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # a torch without the private constant: the newest measured here
        return 23
    return int(ONNX_MAX_OPSET)


def check_opset(opset: int | None) -> None:
    """An --opset the exporter can write for these decoders, checked before any work."""
    if opset is None:
        return
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise LLMPruneError(f"--opset {opset} is not supported for these models (from {MIN_OPSET} to {top})",
                            f"pass --opset between {MIN_OPSET} and {top}, or leave it out for the default ({DEFAULT_OPSET})")


@contextmanager
def stdout_to_log():
    """Sends what C++ code prints on file descriptor 1 during the block (torch.onnx dumps a whole
    IR graph there when an export fails) to the debug log instead of the user's stdout."""
    import sys
    import tempfile

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text = sink.read(100_000).decode("utf-8", "replace")
            if text.strip():
                log.debug("exporter output on stdout (first 100 kB):\n%s", text)


def raw_export(model, out: Path, opset: int | None = None) -> None:
    """The traced decoder (model.onnx, weights inside unless `weights_kept_out` holds them),
    config.json and generation_config.json into `out`."""
    from llmprune.paths import find_write_error

    from .decoder_graph import trace_to_onnx

    adapter_for(model)
    check_opset(opset)
    if next(model.parameters()).dtype != torch.float32:
        raise LLMPruneError(f"the model is {next(model.parameters()).dtype}, not float32",
                            "load it with dtype=torch.float32 for export")
    model.eval()
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), stdout_to_log():
            warnings.simplefilter("ignore")  # the tracer's warnings name transformers' lines, not the user's
            trace_to_onnx(model, str(out / MODEL_FILE), opset or DEFAULT_OPSET)
    except LLMPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.onnx raises many types; one clear line for the user
        if find_write_error(exc) is not None:
            raise  # disk full / read-only: the caller names the output folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LLMPruneError(
            f"the ONNX exporter could not take this {model.config.model_type} model ({type(exc).__name__}: {first[:200]})",
            "rerun with --debug for the traceback; supported: llama, mistral, qwen2, qwen3, gemma3_text",
        ) from exc
    _write_configs(model, out)


def _write_configs(model, out: Path) -> None:
    """config.json (what runtimes read: model type, sizes, token ids) and the generation config.
    The folder holds no modeling file, so the pruned class map is left out: it would point nowhere."""
    config = json.loads(model.config.to_json_string())  # as save_pretrained writes it (llmprune.artifact predicts it so)
    config.pop("auto_map", None)
    config.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)


def dedupe_initializers(graph, arrays: dict[str, np.ndarray]) -> dict:
    """Stores each weight once. An initializer equal to another is replaced by it. For the tied
    LM head, which the exporter writes as a transposed copy of the embedding table for its MatMul,
    the embedding lookup is rewritten to read the LM head's [hidden, vocab] matrix instead —
    Gather(axis=1) then a Transpose of the (small) gathered activations — so the file, and ONNX
    Runtime's memory, hold the table once and no weight is transposed at load time. `arrays`
    holds every initializer's data by name. Returns what was removed."""
    from onnx import helper

    _fold_transposed_initializers(graph, arrays)  # a tie written as a Transpose node -> a plain copy, handled below
    replace, transposed = _find_copies(graph, arrays)
    if not replace and not transposed:
        return {"removed": [], "bytes_saved": 0}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    input_ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input}
    removed = set(replace)
    prefix: list = []
    for copy, original in transposed.items():
        # `copy` = original.T. Preferred: drop `original` if only axis-0 Gathers read it.
        if _gather_through_transpose(graph, copy, original, input_ranks):
            removed.add(original)
        else:  # fall back: a Transpose node of the kept table yields the removed name
            prefix.append(helper.make_node("Transpose", [original], [copy], name=f"llmprune_tied_{len(prefix)}", perm=[1, 0]))
            removed.add(copy)
    saved = sum(arrays[name].nbytes for name in removed)
    drop_initializers(graph, arrays, removed)
    if prefix:
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(prefix + nodes)
    return {"removed": sorted(removed), "tied_transposed": dict(transposed), "duplicates": dict(replace),
            "bytes_saved": int(saved)}


def _fingerprint(array: np.ndarray) -> tuple | None:
    """A key equal for equal arrays and for an array and its transpose: the element bits' XOR and
    sum (exact and order-free), computed without copying; None for element types it skips."""
    if array.itemsize not in (1, 2, 4, 8):
        return None
    bits = array.view(np.dtype(f"u{array.itemsize}"))
    return (array.dtype.str, tuple(sorted(array.shape)), int(np.bitwise_xor.reduce(bits, axis=None)),
            int(bits.sum(dtype=np.uint64)))


def _find_copies(graph, arrays: dict[str, np.ndarray]) -> tuple[dict[str, str], dict[str, str]]:
    """Large initializers equal to an earlier one (name -> kept name), and those equal to an
    earlier one's transpose (name -> kept name)."""
    seen: dict[tuple, list[str]] = {}
    replace: dict[str, str] = {}
    transposed: dict[str, str] = {}
    for init in graph.initializer:
        arr = arrays[init.name]
        key = _fingerprint(arr) if arr.size >= _MIN_DEDUPE_ELEMENTS else None
        if key is None:
            continue
        for other in seen.get(key, []):
            kept = arrays[other]
            if kept.shape == arr.shape and np.array_equal(kept, arr):
                replace[init.name] = other
                break
            if arr.ndim == 2 and kept.shape == arr.shape[::-1] and np.array_equal(kept, arr.T):
                transposed[init.name] = other
                break
        else:
            seen.setdefault(key, []).append(init.name)
    return replace, transposed


def _gather_through_transpose(graph, copy: str, original: str, input_ranks: dict[str, int]) -> bool:
    """If only axis-0 Gathers of graph inputs read `original`, make them read `copy` (its
    transpose) with axis 1 and transpose the small gathered result back; False otherwise."""
    from onnx import helper

    users = [n for n in graph.node if original in n.input]
    gathers_ok = users and all(
        n.op_type == "Gather" and list(n.input).index(original) == 0 and _attr(n, "axis", 0) == 0
        and n.input[1] in input_ranks for n in users)
    if not gathers_ok:
        return False
    for k, node in enumerate(users):
        rank = input_ranks[node.input[1]]
        out = node.output[0]
        gathered = f"{out}_llmprune_hidden_first"
        node.input[0] = copy
        node.output[0] = gathered
        for a in list(node.attribute):
            if a.name == "axis":
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute("axis", 1))
        transpose = helper.make_node("Transpose", [gathered], [out], name=f"llmprune_tied_lookup_{k}",
                                     perm=list(range(1, rank + 1)) + [0])
        graph.node.insert(list(graph.node).index(node) + 1, transpose)
    return True


def _fold_transposed_initializers(graph, arrays: dict[str, np.ndarray]) -> int:
    """Transpose nodes of 2-D initializers become initializers (ONNX Runtime would do the same
    at load time, holding both copies in memory)."""
    folded = 0
    for node in list(graph.node):
        source = arrays.get(node.input[0]) if node.op_type == "Transpose" else None
        if source is None or source.ndim != 2 or list(_attr(node, "perm", [1, 0])) != [1, 0]:
            continue
        add_initializer(graph, arrays, node.output[0], np.ascontiguousarray(source.T))
        graph.node.remove(node)
        folded += 1
    return folded


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            from onnx import helper

            return helper.get_attribute_value(a)
    return default


def untie_initializers(model_proto, arrays: dict[str, np.ndarray], keep_lookups_of: str | None = None) -> dict[str, str]:
    """The reverse of dedupe for tied tables: the embedding lookup reads its own [vocab, hidden]
    table again (and a Transpose-node copy becomes an initializer), so weight-only quantizers,
    which need a constant MatMul weight and an axis-0 Gather table, take both. Lookups of
    `keep_lookups_of` stay as they are (the quantizer rewires them to the head's quantized
    weight). Returns {embedding table: the [hidden, vocab] LM-head weight it was tied to}
    (Transpose-node copies as {copy: source}). `arrays`: the initializers' data (`read_model`); a
    copy is a transposed view of its source, read a slice at a time by whoever quantizes it."""
    graph = model_proto.graph
    inits = {i.name: i for i in graph.initializer}
    tied: dict[str, str] = {}
    for node in list(graph.node):
        if node.op_type == "Transpose" and node.name.startswith("llmprune_tied_lookup_"):
            gather = next(n for n in graph.node if node.input[0] in n.output)
            table = gather.input[0]
            if table == keep_lookups_of:
                continue
            name = f"{table}_llmprune_embedding"
            if name not in inits:
                add_initializer(graph, arrays, name, arrays[table].T)
                inits[name] = graph.initializer[-1]
            gather.input[0] = name
            for a in list(gather.attribute):
                if a.name == "axis":
                    gather.attribute.remove(a)
            gather.output[0] = node.output[0]
            graph.node.remove(node)
            tied[name] = table
        elif node.op_type == "Transpose" and node.name.startswith("llmprune_tied_") and node.input[0] in inits:
            add_initializer(graph, arrays, node.output[0], arrays[node.input[0]].T)
            graph.node.remove(node)
            tied[node.output[0]] = node.input[0]
    return tied


def onnx_files(folder: Path) -> list[Path]:
    """The model files of a folder: .onnx, their external data and .ort."""
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in (".onnx", ".ort") or p.name.endswith(".onnx_data")))


def folder_size(folder: Path, suffixes=(".onnx", ".onnx_data")) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and any(p.name.endswith(s) for s in suffixes))


def export_fp32(model, out: Path, opset: int | None = None) -> dict:
    """The traced export into `out` (the graph; its weights kept in memory), then tied/duplicate
    weights stored once and the model written, each weight streamed from memory. Returns facts
    for the report."""
    import onnx

    kept: dict = {}
    with weights_kept_out(kept) as keeping:
        raw_export(model, out, opset)
    path = out / MODEL_FILE
    if not path.is_file():
        raise LLMPruneError("the ONNX exporter wrote no model.onnx", "rerun with --debug")
    proto = onnx.load(str(path), load_external_data=not keeping)
    arrays = take_weights(proto, kept) if keeping else split_weights(proto)
    kept.clear()
    raw = model_file_bytes(proto, arrays)
    dedupe = dedupe_initializers(proto.graph, arrays)
    # Weights in model.onnx_data at any size: ONNX Runtime maps that file instead of parsing and
    # copying a 1 GB protobuf, so a session costs the weights once (the export's checks rely on it).
    write_model(proto, arrays, path, limit=0)
    return {"raw_bytes": raw, "bytes": folder_size(out), "dedupe": dedupe,
            "opset": int(proto.opset_import[0].version)}
