"""Pruned checkpoints: a standard Hugging Face folder plus the per-layer shapes in config.json, a
`modeling_llmprune.py` (so stock `from_pretrained(..., trust_remote_code=True)` loads it) and
`pruning_report.json`. Written to a temporary folder beside the target and renamed into place."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .arch import adapter_for
from .errors import LLMPruneError

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_llmprune.py"
REPORT_FILE = "pruning_report.json"
PRUNED_CLASS = "PrunedCausalLM"
FORMAT_VERSION = 1


def modeling_source(model_or_class) -> str:
    """The modeling file for this model's architecture: the template with its base-class import."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for klass in cls.__mro__:  # a model loaded from a pruned folder is a subclass of the stock one
        if klass.__module__.startswith("transformers.models."):
            cls = klass
            break
    template = resources.files("llmprune").joinpath("modeling_template.py").read_text()
    line = f"from {cls.__module__} import {cls.__name__} as _Base  # LLMPRUNE_BASE_IMPORT"
    return template.replace("from transformers import PreTrainedModel as _Base  # LLMPRUNE_BASE_IMPORT", line)


def layer_shape(layer: nn.Module) -> dict:
    """The per-layer record stored in config.llmprune['layers']."""
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "intermediate_size": int(mlp.down_proj.in_features),
        "num_attention_heads": int(attn.q_proj.out_features // attn.head_dim),
        "mlp_out_bias": mlp.down_proj.bias is not None,
        "attn_out_bias": attn.o_proj.bias is not None,
    }


def pruned_spec(shapes: list[dict], layer_map: list[int], previous: dict | None = None, source: str | None = None,
                original_num_layers: int | None = None) -> dict:
    """config.llmprune from per-layer shapes (`layer_shape` records): the streamed --low-memory
    writer has shapes, not a model. `previous`: the config.llmprune of a model pruned before (it
    keeps its original layer count and source)."""
    previous = previous or {}
    spec = {
        "format_version": FORMAT_VERSION,
        "layers": list(shapes),
        "layer_map": list(layer_map),
        "original_num_hidden_layers": previous.get("original_num_hidden_layers") or original_num_layers,
        "source": previous.get("source", source),
    }
    if spec["original_num_hidden_layers"] is None:
        spec["original_num_hidden_layers"] = max(layer_map) + 1 if layer_map else len(shapes)
    return spec


def record_shapes(model: nn.Module, layer_map: list[int], source: str | None = None,
                  original_num_layers: int | None = None) -> dict:
    """config.llmprune: per-layer shapes and the original index of each kept layer.
    `original_num_layers`: the layer count of the model before this pruning (a model pruned
    before keeps the count recorded then)."""
    layers = adapter_for(model).decoder_layers(model)
    spec = pruned_spec([layer_shape(l) for l in layers], layer_map, getattr(model.config, "llmprune", None), source,
                       original_num_layers)
    model.config.llmprune = spec
    return spec


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LLMPruneError(f"--out '{out}' exists and is not a folder", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LLMPruneError(f"--out '{out}' exists and is not empty", "pass --overwrite or choose another folder")


@contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary folder beside `out`; on success it replaces `out`, on any error (or
    Ctrl-C) it is removed and `out` is untouched."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pruned(model: nn.Module, tokenizer, out: str | os.PathLike, report: dict | None = None,
                layer_map: list[int] | None = None, overwrite: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    """Write a pruned model as a loadable checkpoint folder (atomically); `extra_files` (name ->
    text) are written into it in the same atomic step."""
    layers = adapter_for(model).decoder_layers(model)
    if layer_map is None:
        layer_map = (getattr(model.config, "llmprune", None) or {}).get("layer_map") or list(range(len(layers)))
    # The report has one row per layer of the model before pruning (dropped ones included).
    rows = (report or {}).get("layers")
    record_shapes(model, layer_map, original_num_layers=len(rows) if isinstance(rows, list) else None)
    model.config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{PRUNED_CLASS}"}
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(modeling_source(model))
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=_jsonable))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def pruned_class(stock_cls: type) -> type:
    """A subclass of a stock *ForCausalLM that resizes its layers from config.llmprune (the same
    code the modeling file carries)."""
    from .modeling_template import apply_pruned_shapes

    def __init__(self, config):
        stock_cls.__init__(self, config)
        apply_pruned_shapes(self, config)

    return type(PRUNED_CLASS, (stock_cls,), {"__init__": __init__, "__module__": __name__})


def model_class(config) -> type:
    """The *ForCausalLM class that builds `config`: the stock one, resized when it is pruned."""
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM._model_mapping[type(config)]
    return pruned_class(stock) if is_pruned_config(config) else stock


def is_pruned_config(config) -> bool:
    return bool(getattr(config, "llmprune", None))
