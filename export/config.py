"""ExportConfig: what `llmprune export` writes and how strictly it checks it."""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.artifact import WIDE
from llmprune.errors import LLMPruneError
from llmprune.options import option, positive_float, positive_int

QUANTIZE_MODES = ("none", "int8", "int4")
FORMATS = ("onnx", "gguf")
# --format gguf: written by the gguf package, or by llama.cpp's quantizer (its K-quant mixes).
GGUF_WRITTEN = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
GGUF_K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
GGUF_QUANTIZE = GGUF_WRITTEN + GGUF_K_QUANTS
_ONNX_ONLY = ("ort", "genai")

# Three short prompts for the greedy-generation parity check (any text the tokenizer can take).
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Pruning a neural network removes",
    "def fibonacci(n):",
)

# Used for the perplexity change of quantized files when no --eval-data is given: real English
# prose, so the numbers mean something on a real model (tiny windows, so they are rough).
DEFAULT_EVAL_TEXT = (
    "The history of the city goes back to a small settlement on the river, where traders met to "
    "exchange grain, salt and timber. Over the following centuries the town grew into a regional "
    "centre, with a cathedral, a market square and a university founded in the fourteenth century. "
    "During the industrial revolution, factories were built along the canal, and the population "
    "doubled within a generation. Railways connected the city to the coast in 1850, and new "
    "districts of brick houses spread across the surrounding fields. In the twentieth century the "
    "old industries declined, but the university expanded and research institutes, hospitals and "
    "software companies became the largest employers. Today the old town is a protected area, and "
    "visitors come to see its churches, its museums and the botanical garden, which holds one of the "
    "oldest collections of medicinal plants in the country. The climate is mild, with warm summers "
    "and cool, wet winters; most of the rain falls between October and March. The city is governed "
    "by an elected council and a mayor, who serve terms of six years. Its football club, founded by "
    "railway workers, has played in the national league for most of its history. "
)


@dataclass
class ExportConfig:
    """Options of one export.

    The fp32 model is always written at the top of the output folder (a standard optimum layout)
    and parity-checked; a quantized model goes in a sub-folder named after the mode, itself a
    complete folder. Each field's help says what it does; `llmprune export` has one flag per field
    the CLI exposes (llmprune.options)."""

    format: str = option(
        "onnx", choices=FORMATS,
        help="onnx (ONNX Runtime, Mobile, onnxruntime-genai; parity-checked against PyTorch) or gguf (llama.cpp and "
             "ollama: one model-<type>.gguf per --quantize type, read back, and checked in llama.cpp where "
             "llama-cpp-python is installed)")
    quantize: str | tuple[str, ...] = option(
        "none", nargs="+", choices=QUANTIZE_MODES + GGUF_QUANTIZE,
        help="onnx: also write an int8 (block-wise 8-bit weights: MatMul and embedding) and/or int4 (block-wise 4-bit "
             "MatMulNBits for the decoder layers; the vocabulary table in --table-bits) model, each in its sub-folder; "
             "gguf: the file types to write (none = f32; f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 by the gguf package; "
             "K-quants such as q4_k_m by llama.cpp's quantizer, which needs llama-cpp-python)")
    block_size: int = option(32, parse=positive_int, help="int8/int4 block size")
    quantize_embedding: bool = option(
        True, help="int8/int4: quantize the embedding lookup table too (--no-quantize-embedding keeps it in fp32; "
                   "the LM head is quantized either way)")
    accuracy_level: int | None = option(
        4, choices=(0, 1, 2, 3, 4),
        help="MatMulNBits compute type: 4 = int8 activations (fast), 0 = unset (fp32 on CPU; very slow for 8-bit weights)")
    symmetric: bool = option(
        False, help="int4: blocks without zero points (default: a zero point per block, measured more accurate)")
    keep_8bit: tuple[str, ...] = option(
        WIDE, nargs="*", metavar="NAME",
        help="int4: MatMuls whose node name contains one of these stay 8-bit (none: give no NAME); the MLP's and "
             "v_proj by default: measured +2.5% perplexity over fp32 on Gemma-3-270M with k_quant, against +11% "
             "with only down_proj and v_proj")
    int4_fit: str = option(
        "k_quant", choices=("k_quant", "rtn"),
        help="int4: how each 4-bit block's scale and zero point are chosen: k_quant (ONNX Runtime's data-free "
             "search; same layout and kernel) or rtn (round to nearest from the block's min and max)")
    table_bits: int = option(
        8, choices=(4, 8), help="int4: bits of the vocabulary table (LM head and tied embedding, stored once)")
    ort: bool = option(False, help="also write model.ort (ONNX Runtime Mobile) beside each model.onnx")
    genai: bool = option(False, help="also write genai_config.json for onnxruntime-genai")
    opset: int | None = option(None, parse=positive_int, default_text="optimum's for the architecture",
                               help="ONNX opset")
    atol: float = option(1e-3, parse=positive_float,
                         help="largest fp32 max |logit difference| against PyTorch (the export fails above it)")
    check_generation: bool = option(True, cli=False, help="fp32 greedy tokens must equal PyTorch's")
    parity_tokens: int = option(32, cli=False, help="tokens generated per prompt in the greedy parity check")
    prompts: tuple[str, ...] = option(DEFAULT_PROMPTS, cli=False, help="prompts of the greedy parity check")
    parity_seq_len: int = option(48, cli=False, help="tokens of the fixed logit-parity input")
    eval_windows: int = option(4, parse=positive_int, help="evaluation windows for the quantized perplexity change")
    eval_seq_len: int = option(128, parse=positive_int, help="tokens per evaluation window")
    max_context: int | None = option(None, cli=False,
                                     help="genai_config context_length (default: the model's positions)")
    threads: int | None = option(None, cli=False,
                                 help="onnxruntime intra-op threads for the checks (default: all cores)")
    overwrite: bool = option(False, help="replace a non-empty --out")

    def __post_init__(self):
        if self.format not in FORMATS:
            raise LLMPruneError(f"unknown export format '{self.format}'", f"use one of: {', '.join(FORMATS)}")
        modes = (self.quantize,) if isinstance(self.quantize, str) else tuple(self.quantize)
        allowed = QUANTIZE_MODES if self.format == "onnx" else ("none",) + GGUF_QUANTIZE
        for mode in modes:
            if mode not in allowed:
                raise LLMPruneError(f"--format {self.format} has no quantization '{mode}'", f"use one of: {', '.join(allowed)}")
        onnx_only = [name for name in _ONNX_ONLY if getattr(self, name)]
        if self.format == "gguf" and onnx_only:
            raise LLMPruneError(f"--{onnx_only[0]} is for ONNX files, not --format gguf",
                                f"drop --{onnx_only[0]}, or export ONNX")
        if "none" in modes and len(modes) > 1 and self.format == "onnx":
            raise LLMPruneError("quantization 'none' cannot be combined with other modes", "give none, or int8 and/or int4")
        self.quantize = modes[0] if len(modes) == 1 else modes
        if self.accuracy_level == 0:  # 0 means "unset": onnxruntime's own default
            self.accuracy_level = None
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise LLMPruneError(f"block size {self.block_size} is not a power of two >= 16", "use 32 (default), 64 or 128")
        self.keep_8bit = tuple(self.keep_8bit)
        if self.table_bits not in (4, 8):
            raise LLMPruneError(f"table bits must be 4 or 8 (got {self.table_bits})", "use 8 (default) or 4")
        if not self.atol > 0:
            raise LLMPruneError(f"parity tolerance must be positive (got {self.atol})", "use e.g. 1e-3")
        if self.parity_tokens < 1 or self.parity_seq_len < 2 or self.eval_windows < 1 or self.eval_seq_len < 2:
            raise LLMPruneError("parity/eval sizes must be positive",
                                "check parity_tokens, parity_seq_len, eval_windows, eval_seq_len")
        self.prompts = tuple(self.prompts)

    @property
    def modes(self) -> tuple[str, ...]:
        """onnx: the quantized variants to write (none, one or both of int8 and int4), each in its
        sub-folder; gguf: the file types to write (none is f32)."""
        modes = (self.quantize,) if isinstance(self.quantize, str) else self.quantize
        if self.format == "gguf":
            return tuple(dict.fromkeys("f32" if m == "none" else m for m in modes))
        return tuple(dict.fromkeys(m for m in modes if m != "none"))
