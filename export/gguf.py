"""Write a (pruned) causal LM as a GGUF file llama.cpp and ollama load.

The `gguf` package writes the file: hyper-parameters under the llama.cpp architecture chosen by
`gguf_layout` (per-layer head counts and widths for `deci`), the tokenizer (`gguf_vocab`), and the
tensors under llama.cpp's names, in f32 / f16 / bf16 or a 32-block type (q8_0, q4_0, q4_1, q5_0,
q5_1). K-quants (q4_k_m, ...) are made from an f32 file by llama.cpp's own quantizer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmprune.arch import rope_parameters
from llmprune.errors import LLMPruneError

from .config import GGUF_K_QUANTS, GGUF_WRITTEN
from .gguf_layout import GGUFLayout, interleave_rope_rows, pad_for_llama_cpp, plan_layout
from .gguf_vocab import vocab_fields, write_vocab

log = logging.getLogger(__name__)

# Types the gguf package writes here (name -> GGMLQuantizationType name, LlamaFileType name); the
# K-quant mixes (LLAMA_CPP_TYPES) are made by llama.cpp's quantizer from the f32 file.
WRITTEN_TYPES = {kind: (kind.upper(), "ALL_F32" if kind == "f32" else f"MOSTLY_{kind.upper()}") for kind in GGUF_WRITTEN}
LLAMA_CPP_TYPES = GGUF_K_QUANTS
K_BLOCK = 256  # a K-quant block: llama.cpp quantizes a weight whose rows are not a multiple in another type


def gguf_arch(name: str):
    import gguf

    return {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[name]


def check_block_rows(model: nn.Module, kind: str) -> dict:
    """The weight matrices whose rows (input features) do not fit `kind`'s block: a 32-block type
    written here cannot store them (refused, naming them); a K-quant falls back per tensor in
    llama.cpp (counted), and one that fits no matrix at all is refused."""
    import gguf

    block = K_BLOCK if kind in LLAMA_CPP_TYPES else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[WRITTEN_TYPES[kind][0]]][0]
    matrices = {n: p.shape[-1] for n, p in model.named_parameters() if p.dim() == 2}
    misfits = {n: rows for n, rows in matrices.items() if rows % block}
    if block > 1 and kind in WRITTEN_TYPES and misfits:
        raise LLMPruneError(f"--quantize {kind} stores rows in blocks of {block}, but {len(misfits)} weight(s) have rows "
                            f"that are not a multiple (e.g. {_named(misfits)})",
                            "prune with compress --uniform (widths in multiples of 256), or use f16, bf16 or a K-quant "
                            "such as q4_k_m (llama.cpp stores such weights in another type)")
    if kind in LLAMA_CPP_TYPES and len(misfits) == len(matrices):
        raise LLMPruneError(f"--quantize {kind} needs weight rows in multiples of {K_BLOCK}, and none of this model's "
                            f"{len(matrices)} weights has them (e.g. {_named(misfits)})",
                            "use q8_0 or q4_0 (blocks of 32), or prune with compress --uniform")
    return {"block": block, "weights": len(matrices), "other_type": sorted(misfits) if block == K_BLOCK else []}


def _named(misfits: dict) -> str:
    name, rows = next(iter(misfits.items()))
    return f"{name}: rows of {rows}"


def _hparams(writer, model: nn.Module, layout: GGUFLayout, rows: int, kind: str) -> None:
    import gguf

    c = model.config
    head_dim = layout.widths[0].head_dim
    per_layer = layout.arch == "deci"
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(len(layout.widths))
    ffn, heads, kv = layout.per_layer("intermediate"), layout.per_layer("query_heads"), layout.per_layer("kv_heads")
    writer.add_feed_forward_length(ffn if per_layer else ffn[0])
    writer.add_head_count(heads if per_layer else heads[0])
    writer.add_head_count_kv(kv if per_layer else kv[0])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    rope = rope_parameters(c)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_vocab_size(rows)
    _rope_scaling(writer, rope)
    if layout.arch == "gemma3":
        _gemma3(writer, c, head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, WRITTEN_TYPES.get(kind, WRITTEN_TYPES["f32"])[1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_scaling(writer, scaling: dict) -> None:
    import gguf

    kind = scaling["rope_type"]
    if kind == "default":
        return
    if kind != "linear":
        raise LLMPruneError(f"the GGUF writer does not write rope scaling '{kind}'",
                            "export ONNX (--format onnx), which keeps the model's own RoPE")
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(scaling["factor"]))


def _gemma3(writer, config, head_dim: int) -> None:
    """Gemma-3's extra keys: sliding-window layers (per layer: pruning leaves no period-6 pattern),
    their RoPE base, and the soft-capping llama.cpp applies."""
    if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        raise LLMPruneError(f"llama.cpp scales Gemma-3 attention by 1/sqrt(head_dim) but this model uses "
                            f"query_pre_attn_scalar {config.query_pre_attn_scalar}", "export ONNX (--format onnx)")
    if getattr(config, "attn_logit_softcapping", None):
        raise LLMPruneError("llama.cpp's Gemma-3 graph has no attention-logit soft-capping, which this model uses",
                            "export ONNX (--format onnx)")
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
        writer.add_rope_freq_base_swa(float(rope_parameters(config, "sliding_attention")["rope_theta"]))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def gguf_tensors(model: nn.Module, layout: GGUFLayout) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) of every weight, transformed for llama.cpp's graphs."""
    import gguf

    names = gguf.get_tensor_name_map(gguf_arch(layout.arch), len(layout.widths))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LLMPruneError(f"the GGUF writer has no llama.cpp name for tensor '{name}'", "export ONNX (--format onnx)")
        yield target, _transformed(name, tensor.detach().float(), layout).numpy()


def _transformed(name: str, tensor: torch.Tensor, layout: GGUFLayout) -> torch.Tensor:
    if layout.rule.norm_offset and "norm" in name:
        return tensor + layout.rule.norm_offset
    if layout.rule.permute_qk and (".q_proj." in name or ".k_proj." in name):
        layer = int(name.split(".layers.")[1].split(".")[0])
        w = layout.widths[layer]
        return interleave_rope_rows(tensor, w.query_heads if ".q_proj." in name else w.kv_heads)
    return tensor


def write_gguf(model: nn.Module, tokenizer, path: Path, kind: str = "f32", name: str | None = None) -> GGUFLayout:
    """Write `model` (padded first where its architecture needs uniform widths: in place, exact) as
    one GGUF file of a type the gguf package writes; returns the layout written."""
    import gguf
    from gguf.quants import quantize

    if kind not in WRITTEN_TYPES:
        raise LLMPruneError(f"the gguf package does not write {kind}", f"use one of {', '.join(WRITTEN_TYPES)}")
    pad_for_llama_cpp(model)
    layout = plan_layout(model)
    check_block_rows(model, kind)
    rows = int(model.get_input_embeddings().weight.shape[0])
    fields = vocab_fields(tokenizer, rows)
    qtype = gguf.GGMLQuantizationType[WRITTEN_TYPES[kind][0]]
    writer = gguf.GGUFWriter(str(path), layout.arch)
    try:
        writer.add_name(name or getattr(model.config, "_name_or_path", "") or "llmprune")
        _hparams(writer, model, layout, rows, kind)
        write_vocab(writer, fields)
        for target, array in gguf_tensors(model, layout):
            stored = gguf.GGMLQuantizationType.F32 if array.ndim == 1 else qtype
            data = array if stored == gguf.GGMLQuantizationType.F32 else quantize(array, stored)
            writer.add_tensor(target, data, raw_dtype=stored)  # the element shape follows from the bytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return layout


def read_back(path: Path, model: nn.Module, layout: GGUFLayout) -> dict:
    """Read the file with the gguf package and compare every tensor with what was written: names,
    shapes, and (dequantized) largest difference against the float32 weights."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    worst, relative, seen = 0.0, 0.0, set()
    for target, array in gguf_tensors(model, layout):  # one tensor at a time: no second copy of the model
        if target not in stored:
            raise LLMPruneError(f"the GGUF file '{path.name}' lacks tensor {target}", "report this as a bug")
        seen.add(target)
        t = stored[target]
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(array.shape)
        diff = float(np.abs(values - array).max()) if array.size else 0.0
        worst = max(worst, diff)
        relative = max(relative, diff / (float(np.abs(array).max()) or 1.0))
    if set(stored) != seen:
        raise LLMPruneError(f"the GGUF file '{path.name}' holds tensors not written ({sorted(set(stored) - seen)[:3]})",
                            "report this as a bug")
    arch = reader.fields["general.architecture"].contents()
    return {"tensors": len(stored), "architecture": arch, "max_abs_diff": worst, "max_rel_diff": relative}
