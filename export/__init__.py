"""llmprune.export: ONNX artifacts for edge runtimes (see docs/export.md).

`export_onnx(model, ExportConfig(...), out)` writes a standard optimum folder (model.onnx with KV
cache, config, tokenizer) checked against PyTorch, plus optional int8/int4 variants, `.ort` files
and `genai_config.json`; `OnnxCausalLM` runs such a folder with onnxruntime."""

from .config import DEFAULT_PROMPTS, QUANTIZE_MODES, ExportConfig
from .genai import GenaiCausalLM
from .pipeline import REPORT_FILE, ExportResult, export_checkpoint, export_onnx
from .runtime import OnnxCausalLM, text_stream

__all__ = [
    "DEFAULT_PROMPTS",
    "QUANTIZE_MODES",
    "REPORT_FILE",
    "ExportConfig",
    "ExportResult",
    "GenaiCausalLM",
    "OnnxCausalLM",
    "export_checkpoint",
    "export_onnx",
    "text_stream",
]
