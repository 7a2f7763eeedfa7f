"""Pruned checkpoints: a standard Hugging Face folder plus the per-layer shapes in config.json, a
`modeling_llmprune.py` (for `from_pretrained(..., trust_remote_code=True)` where llmprune is not
installed) and `pruning_report.json`. Written to a temporary folder beside the target and renamed
into place. With llmprune installed nothing from the folder runs: `llmprune.load_model` and, after
`register_pruned_classes()`, stock `AutoModelForCausalLM.from_pretrained(folder)` build the class
from this package (see docs/security.md)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .arch import adapter_for
from .errors import LLMPruneError
from .paths import check_writable_output, find_write_error, printable, write_error

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_llmprune.py"
REPORT_FILE = "pruning_report.json"
VOCAB_FILE = "vocabulary.json"     # a trimmed vocabulary: the original id of every kept id
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


def check_output_dir(out: str | os.PathLike, overwrite: bool, marker: str = REPORT_FILE) -> None:
    """Refuse, before any long work, an output path that cannot become the output folder: empty, a
    file, somewhere that cannot be written (read-only, under a file, /proc...), a non-empty folder
    without `overwrite`, or — even with `overwrite` — a non-empty folder that is not an earlier
    output of the same command (it holds no `marker`: compress and recover write
    pruning_report.json, export export_report.json), so --overwrite never deletes a folder of the user's."""
    if str(out).strip() == "":
        raise LLMPruneError("--out is empty", "pass the folder to write, e.g. --out pruned/")
    out = Path(out)
    shown = printable(out)
    if out.exists() and not out.is_dir():
        raise LLMPruneError(f"--out '{shown}' exists and is not a folder", "choose another --out")
    if not out.is_dir():
        check_writable_output(out)  # under a file, read-only, /proc, a name that is not UTF-8
        return
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError as exc:
        raise LLMPruneError(f"cannot read the existing --out folder '{shown}' ({exc.strerror or exc})",
                            "choose another --out") from exc
    if not entries:
        check_writable_output(out)
        return
    if not overwrite:
        raise LLMPruneError(f"--out '{shown}' exists and is not empty", "pass --overwrite or choose another folder")
    if marker not in entries:
        raise LLMPruneError(
            f"--out '{shown}' is not an earlier output of this command (it has no {marker}), so --overwrite will not"
            " delete it", "choose another --out, or empty or remove that folder yourself")
    check_writable_output(out)


# --- atomic output folders -------------------------------------------------------------------------
# The output is written into a hidden folder beside it, '.NAME.tmp-PID-XXXX', renamed into place at
# the end; the folder it replaces is moved to '.NAME.old-PID-XXXX' and removed. A process killed
# (SIGKILL, power loss) in between leaves them behind: the next write of the same target removes
# those whose process is gone. Each holds a small owner file naming the host and process.

_OWNER_FILE = ".llmprune-writer"


def _host() -> str:
    return socket.gethostname() or "?"


def _temp_dir(out: Path, kind: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    (tmp / _OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": _host(), "target": out.name}))
    return tmp


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # someone else's process, or cannot tell: keep its folder
    return True


def stale_temp_dirs(out: str | os.PathLike) -> list[Path]:
    """Temporary folders of earlier writes of `out` (beside it) whose process on this host is gone."""
    out = Path(out)
    stale = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[^/]*$")
    for path in siblings:
        match = pattern.match(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        try:
            owner = json.loads((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or not readable: leave it
        if not isinstance(owner, dict) or owner.get("host") != _host() or owner.get("target") != out.name:
            continue
        pid = owner.get("pid")
        if isinstance(pid, int) and pid == int(match.group(2)) and not _process_alive(pid):
            stale.append(path)
    return stale


def remove_stale_temp_dirs(out: str | os.PathLike) -> list[Path]:
    """Remove what killed earlier writes of `out` left beside it; returns the folders removed."""
    removed = stale_temp_dirs(out)
    for path in removed:
        log.info("removing '%s', left by an interrupted earlier run", printable(path))
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _is_under(path, folder: Path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(folder.resolve())
    except (TypeError, ValueError, OSError):
        return False


def _as_write_error(exc: BaseException, out: Path, tmp: Path) -> LLMPruneError | None:
    """One line for a failure to write the output (disk full, read-only) inside the block; None for
    anything else (a read error of the input stays what it is)."""
    if isinstance(exc, LLMPruneError) or not isinstance(exc, Exception):
        return None
    cause = find_write_error(exc)
    if cause is None:
        return None
    if cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) or _is_under(cause.filename or "", tmp):
        return write_error(out, cause)
    return None


@contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, marker: str = REPORT_FILE):
    """Yields a temporary folder beside `out`; on success it replaces `out`, on any error (or
    Ctrl-C) it is removed and `out` is untouched. A failure to write (disk full, read-only) becomes
    one LLMPruneError. `marker`: the file that marks an earlier output `overwrite` may replace
    (see `check_output_dir`); the block must write it."""
    check_output_dir(out, overwrite, marker)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)
        tmp = _temp_dir(out, "tmp")
    except OSError as exc:
        raise write_error(out, exc) from exc
    try:
        yield tmp
        (tmp / _OWNER_FILE).unlink(missing_ok=True)
        os.chmod(tmp, 0o755)
        if out.exists():
            trash = _temp_dir(out, "old")
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        clear = _as_write_error(exc, out, tmp)
        if clear is not None:
            raise clear from exc
        raise


# --- what we write ---------------------------------------------------------------------------------

def our_auto_map() -> dict:
    """The only auto_map we write: our own modeling file's class."""
    return {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{PRUNED_CLASS}"}


def scrub_foreign_code(folder: str | os.PathLike) -> None:
    """Make a folder we are writing carry no code but ours: remove every `.py` file except our
    modeling file, drop `auto_map` (code to import) from every JSON file but config.json (the
    tokenizer config of a model with custom code keeps it on save), and set config.json's to ours.
    `custom_pipelines` (code too) goes the same way."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*.py")):
        if path != folder / MODELING_FILE:
            path.unlink()
    for path in sorted(folder.glob("*.json")):
        if path.name == REPORT_FILE:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        before = dict(data)
        data.pop("auto_map", None)
        data.pop("custom_pipelines", None)
        if path.name == "config.json" and (folder / MODELING_FILE).is_file():
            data["auto_map"] = our_auto_map()
        if data != before:
            path.write_text(json.dumps(data, indent=2, sort_keys=path.name == "config.json") + "\n", encoding="utf-8")


def save_pruned(model: nn.Module, tokenizer, out: str | os.PathLike, report: dict | None = None,
                layer_map: list[int] | None = None, overwrite: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    """Write a pruned model as a loadable checkpoint folder (atomically); `extra_files` (name ->
    text) are written into it in the same atomic step. The folder always holds pruning_report.json
    (what marks it as ours for a later --overwrite), our modeling file, and no other code."""
    layers = adapter_for(model).decoder_layers(model)
    if layer_map is None:
        layer_map = (getattr(model.config, "llmprune", None) or {}).get("layer_map") or list(range(len(layers)))
    # The report has one row per layer of the model before pruning (dropped ones included).
    rows = (report or {}).get("layers")
    record_shapes(model, layer_map, original_num_layers=len(rows) if isinstance(rows, list) else None)
    model.config.auto_map = our_auto_map()  # scrub_foreign_code below removes any other code reference
    with atomic_output_dir(out, overwrite, REPORT_FILE) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MODELING_FILE).write_text(modeling_source(model))
        (tmp / REPORT_FILE).write_text(json.dumps(report if report is not None else {}, indent=2, default=_jsonable))
        if report:
            from .model_card import CARD_FILE, card_text

            (tmp / CARD_FILE).write_text(card_text(report, Path(out)), encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        scrub_foreign_code(tmp)
    return Path(out)


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# --- classes: loading without running code from the folder -----------------------------------------

_PRUNED: dict[type, type] = {}
_REGISTERED: dict[type, type] = {}


def stock_class(config_or_class) -> type:
    """The stock transformers *ForCausalLM class behind a config, or behind one of our classes."""
    if isinstance(config_or_class, type):
        cls = config_or_class
    else:
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping[type(config_or_class)]
    return getattr(cls, "_llmprune_stock", cls)


def check_modeling_file(folder, stock_cls: type, subfolder: str = "") -> None:
    """Refuse a local checkpoint folder whose modeling_llmprune.py is not exactly the file llmprune
    writes for its architecture. llmprune never runs that file (the class comes from the installed
    package), but an edited one is a red flag: anyone loading the folder with
    trust_remote_code=True would run it. A folder without the file is fine."""
    if folder is None or not isinstance(folder, (str, os.PathLike)):
        return
    path = Path(folder) / (subfolder or "") / MODELING_FILE
    try:
        if not path.is_file():
            return
        found = path.read_bytes()
    except OSError:
        return
    expected = modeling_source(stock_class(stock_cls)).encode("utf-8")
    if found != expected:
        raise LLMPruneError(
            f"'{printable(path)}' is not the modeling file llmprune writes for {stock_class(stock_cls).__name__}: it was"
            " edited or replaced and may hold foreign code (see docs/security.md)",
            "never load this folder with trust_remote_code=True; if you trust its weights, delete that file (llmprune"
            " loads without it) or re-create the checkpoint with llmprune")


def pruned_class(stock_cls: type) -> type:
    """A subclass of a stock *ForCausalLM that resizes its layers from config.llmprune (the same
    code the modeling file carries), built from the installed package: loading a folder with it
    runs no code from the folder, and its `from_pretrained` refuses a tampered modeling file."""
    stock_cls = stock_class(stock_cls)
    if stock_cls in _PRUNED:
        return _PRUNED[stock_cls]
    from .modeling_template import apply_pruned_shapes

    class Pruned(stock_cls):
        _llmprune_stock = stock_cls

        def __init__(self, config):
            stock_cls.__init__(self, config)
            apply_pruned_shapes(self, config)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            check_modeling_file(pretrained_model_name_or_path, stock_cls, kwargs.get("subfolder") or "")
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    Pruned.__name__ = Pruned.__qualname__ = PRUNED_CLASS
    Pruned.__module__ = __name__
    _PRUNED[stock_cls] = Pruned
    return Pruned


def _auto_class(stock_cls: type) -> type:
    """What `register_pruned_classes` puts in transformers' auto mapping for one architecture: it
    dispatches on the config — a pruned one builds `pruned_class(stock)`, any other the stock class
    itself, so unpruned models load exactly as before."""
    if stock_cls in _REGISTERED:
        return _REGISTERED[stock_cls]
    from transformers import PretrainedConfig

    def pick(config) -> type:
        return pruned_class(stock_cls) if is_pruned_config(config) else stock_cls

    class Dispatch(stock_cls):
        _llmprune_stock = stock_cls

        def __init__(self, config, *args, **kwargs):  # only reached when built directly: behave as pruned_class
            from .modeling_template import apply_pruned_shapes

            stock_cls.__init__(self, config, *args, **kwargs)
            apply_pruned_shapes(self, config)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            config = kwargs.get("config")
            if not isinstance(config, PretrainedConfig):
                config = stock_cls.config_class.from_pretrained(pretrained_model_name_or_path,
                                                                subfolder=kwargs.get("subfolder") or "")
                kwargs["config"] = config
            return pick(config).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

        @classmethod
        def _from_config(cls, config, **kwargs):
            return pick(config)._from_config(config, **kwargs)

    Dispatch.__name__ = Dispatch.__qualname__ = stock_cls.__name__
    Dispatch.__module__ = __name__
    _REGISTERED[stock_cls] = Dispatch
    return Dispatch


def register_pruned_classes() -> list[str]:
    """Let stock `AutoModelForCausalLM.from_pretrained(folder)` load llmprune checkpoints WITHOUT
    trust_remote_code: registers, for every supported architecture, a class from this installed
    package in transformers' auto mapping (pruned configs get the resized class, others the stock
    one). No code from the folder runs; a tampered modeling_llmprune.py is refused. Affects this
    process only; idempotent. Returns the model types registered."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .arch import SUPPORTED_ARCHITECTURES

    for model_type in SUPPORTED_ARCHITECTURES:
        config_cls = CONFIG_MAPPING[model_type]
        stock = stock_class(AutoModelForCausalLM._model_mapping[config_cls])
        AutoModelForCausalLM.register(config_cls, _auto_class(stock), exist_ok=True)
    return list(SUPPORTED_ARCHITECTURES)


def model_class(config) -> type:
    """The *ForCausalLM class that builds `config`: the stock one, resized when it is pruned."""
    stock = stock_class(config)
    return pruned_class(stock) if is_pruned_config(config) else stock


def is_pruned_config(config) -> bool:
    return bool(getattr(config, "llmprune", None))


def load_vocabulary_map(folder: str | Path) -> dict | None:
    """vocabulary.json of a checkpoint folder (None when the vocabulary was not pruned), checked:
    a JSON object whose kept_ids are strictly increasing non-negative ints."""
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        return None
    fix = "re-create the checkpoint with llmprune compress --vocab, or delete the file if the vocabulary is whole"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LLMPruneError(f"{path} is not readable JSON ({exc})", fix) from exc
    kept = data.get("kept_ids") if isinstance(data, dict) else None
    if not isinstance(kept, list) or not kept or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise LLMPruneError(f"{path} has no list of integer kept_ids", fix)
    if any(b <= a for a, b in zip(kept, kept[1:])) or kept[0] < 0:
        raise LLMPruneError(f"{path}: kept_ids are not strictly increasing non-negative ids", fix)
    size = data.get("original_vocab_size")
    if isinstance(size, int) and kept[-1] >= size:
        raise LLMPruneError(f"{path}: kept id {kept[-1]} is beyond original_vocab_size {size}", fix)
    rows = _config_vocab_size(Path(folder))
    if rows is not None and rows != len(kept):
        raise LLMPruneError(f"{path} lists {len(kept)} kept ids but the model's embedding has {rows} rows", fix)
    return data


def _config_vocab_size(folder: Path) -> int | None:
    """config.json's vocab_size (None where the folder has no readable one)."""
    try:
        size = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def carried_files(source: str | os.PathLike | None) -> dict[str, str]:
    """Files of a source checkpoint folder that a model derived from it keeps: its vocabulary map
    (a decoder-pruned or recovered trimmed checkpoint still has the trimmed vocabulary, and `info`,
    export and a later --vocab read the map)."""
    if source is None or not Path(source).is_dir() or load_vocabulary_map(source) is None:
        return {}
    return {VOCAB_FILE: (Path(source) / VOCAB_FILE).read_text(encoding="utf-8")}
