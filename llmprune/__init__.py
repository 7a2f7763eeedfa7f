"""llmprune: post-training compression of Hugging Face causal LMs for edge devices.

Stages live in sub-packages: `llmprune.compress`, `llmprune.fedrecover`, `llmprune.export`;
this root package holds the shared model and data plumbing re-exported here."""

from .arch import SUPPORTED_ARCHITECTURES, ArchAdapter, adapter_for
from .checkpoint import register_pruned_classes
from .data import load_texts, token_windows
from .errors import LLMPruneError
from .evaluate import PerplexityResult, perplexity
from .models import DEFAULT_MODEL, load, load_config, load_model, load_tokenizer, resolve_model_spec
from .params import model_info, parameter_breakdown

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "SUPPORTED_ARCHITECTURES",
    "ArchAdapter",
    "LLMPruneError",
    "PerplexityResult",
    "__version__",
    "adapter_for",
    "load",
    "load_config",
    "load_model",
    "load_texts",
    "load_tokenizer",
    "model_info",
    "parameter_breakdown",
    "perplexity",
    "register_pruned_classes",
    "resolve_model_spec",
    "token_windows",
]
