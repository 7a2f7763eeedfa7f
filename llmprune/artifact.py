"""The bytes an exported model takes, predicted from its shapes: what `compress --target-mb` plans
with. The weights follow export's layouts exactly (export/quantize.py: block-wise MatMulNBits for
the decoder MatMuls, 8-bit for down_proj/v_proj and the vocabulary table, a tied table stored
once); tests/llmprune/test_artifact.py checks them byte for byte against real exports at every
precision. The rest — the graph itself, small constants, tokenizer and config files — is small on a
real model: the graph is estimated per decoder layer (measured on Gemma-3-270M's exports) and the
tokenizer and config files are the bytes their JSON actually takes."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .arch import adapter_for, base_model
from .errors import LLMPruneError

PRECISIONS = ("fp32", "int8", "int4")
MB = 1_000_000  # --target-mb counts decimal megabytes, as file managers and app stores do
# MatMuls int4 keeps at 8 bits (ExportConfig.keep_8bit's default): the MLP and v_proj (measured on
# Gemma-3-270M: +2.5% perplexity over fp32 with k_quant, +8.6% bytes, against +11% with down/v only).
WIDE = ("down_proj", "v_proj", "gate_proj", "up_proj")
# The smaller int4 layout (the MLP's gate/up at 4 bits too; +10.5% perplexity instead of +2.5%, 8%
# fewer bytes on the dense Gemma-3-270M): what --target-mb also weighs when a budget is tight.
LEAN_WIDE = ("down_proj", "v_proj")
# The graph beyond its weights (nodes, names, shape constants, the rotary tables), per decoder layer:
# measured on the exports of Gemma-3-270M (bench/deploy.py: 930 kB fp32, 960 kB int4 for 18 layers;
# tiny llama, qwen3 and gemma3 exports: 43-56 kB a layer, so the estimate is good to ~20 kB a layer).
GRAPH_BYTES_PER_LAYER = {"fp32": 51_700, "int8": 52_900, "int4": 53_300}
RUNTIME_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "tokenizer.model")


@dataclass(frozen=True)
class Layout:
    """How export stores weights at one precision (0 bits = fp32)."""

    layer_bits: int      # decoder MatMuls
    wide_bits: int       # WIDE MatMuls
    table_bits: int      # the vocabulary table: LM head, and the lookup (shared when tied)
    zero_points: bool    # layer blocks carry a zero point (int4's default, asymmetric)
    block: int = 32
    wide: tuple[str, ...] = WIDE   # MatMuls (name substrings) at wide_bits: export's --keep-8bit


LAYOUTS = {"fp32": Layout(0, 0, 0, False), "int8": Layout(8, 8, 8, False), "int4": Layout(4, 8, 8, True)}


def layout(precision: str, block: int = 32, wide: tuple[str, ...] | None = None) -> Layout:
    if precision not in LAYOUTS:
        raise LLMPruneError(f"unknown precision '{precision}'", f"choose one of: {', '.join(PRECISIONS)}")
    base = LAYOUTS[precision]
    return Layout(base.layer_bits, base.wide_bits, base.table_bits, base.zero_points, block,
                  WIDE if wide is None else tuple(wide))


def keep_8bit_flags(wide) -> list[str]:
    """Export's arguments for an int4 layout: none for the default, else --keep-8bit NAME..."""
    return [] if wide is None or tuple(wide) == WIDE else ["--keep-8bit", *wide]


def keep_8bit_options(precision: str) -> list[tuple[str, ...]]:
    """The --keep-8bit sets a plan may choose between at `precision` (the default first)."""
    return [WIDE, LEAN_WIDE] if precision == "int4" else [WIDE]


def matrix_bytes(rows: int, cols: int, bits: int, block: int, zero_points: bool = False) -> int:
    """One [rows, cols] weight as MatMulNBits stores it (rows = outputs): packed blocks of `cols`,
    an fp32 scale a block, and a packed zero point a block when asymmetric; fp32 when bits is 0."""
    if not bits:
        return 4 * rows * cols
    blocks = math.ceil(cols / block)
    zp = rows * math.ceil(blocks * bits / 8) if zero_points else 0
    return rows * blocks * block * bits // 8 + 4 * rows * blocks + zp


def gather_int8_bytes(rows: int, cols: int, block: int) -> int:
    """An untied lookup table as quantize_gathers_int8 stores it: uint8 values and an fp32 scale a block."""
    return rows * cols + 4 * rows * math.ceil(cols / block)


def weight_bytes(model: nn.Module, precision: str, block: int = 32, wide: tuple[str, ...] | None = None) -> int:
    """The weights' bytes in the exported ONNX at `precision` (export's defaults; `wide`: its --keep-8bit)."""
    lay = layout(precision, block, wide)
    adapter = adapter_for(model)
    counted: set[int] = set()
    total = 0
    for layer in adapter.decoder_layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                bits = lay.wide_bits if any(w in name for w in lay.wide) else lay.layer_bits
                zp = lay.zero_points and not any(w in name for w in lay.wide)
                total += matrix_bytes(module.out_features, module.in_features, bits, block, zp)
                counted.add(id(module.weight))
    total += _table_bytes(model, lay, counted)
    for p in {id(p): p for p in model.parameters()}.values():
        if id(p) not in counted:
            total += 4 * p.numel()        # norms, biases: fp32
    return total


def _table_bytes(model: nn.Module, lay: Layout, counted: set[int]) -> int:
    emb = base_model(model).get_input_embeddings().weight
    head = model.get_output_embeddings()
    rows, cols = emb.shape
    counted.add(id(emb))
    if head is None:
        return gather_int8_bytes(rows, cols, lay.block) if lay.table_bits else 4 * rows * cols
    counted.add(id(head.weight))
    head_bytes = matrix_bytes(head.weight.shape[0], head.weight.shape[1], lay.table_bits, lay.block)
    if head.weight is emb:
        return head_bytes                                    # stored once, the lookup reads the head's blocks
    lookup = gather_int8_bytes(rows, cols, lay.block) if lay.table_bits else 4 * rows * cols
    return head_bytes + lookup


def row_bytes(model: nn.Module, precision: str, block: int = 32) -> float:
    """Bytes one vocabulary row costs at `precision` (its table row(s), tied or not)."""
    lay = layout(precision, block)
    emb = base_model(model).get_input_embeddings().weight
    head = model.get_output_embeddings()
    cols = emb.shape[1]
    one = matrix_bytes(1, cols, lay.table_bits, block)
    if head is None or head.weight is emb:
        return one
    return one + (gather_int8_bytes(1, cols, block) if lay.table_bits else 4 * cols)


def graph_bytes(model: nn.Module, precision: str) -> int:
    return GRAPH_BYTES_PER_LAYER[precision] * len(adapter_for(model).decoder_layers(model))


def files_bytes(model: nn.Module, tokenizer) -> int:
    """The runtime's JSON files (config, generation config, tokenizer) as they would be written."""
    with tempfile.TemporaryDirectory(prefix="llmprune-size-") as tmp:
        model.config.to_json_file(Path(tmp) / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.to_json_file(Path(tmp) / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).iterdir() if p.name in RUNTIME_FILES)


def predict_bytes(model: nn.Module, tokenizer, precision: str, block: int = 32,
                  wide: tuple[str, ...] | None = None) -> dict:
    """The predicted artifact: weights, graph, runtime files and their total, in bytes."""
    parts = {"weights": weight_bytes(model, precision, block, wide), "graph": graph_bytes(model, precision),
             "files": files_bytes(model, tokenizer)}
    return {**parts, "total": sum(parts.values()), "precision": precision}
