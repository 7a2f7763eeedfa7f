"""Checks that a checkpoint folder is whole and self-consistent, so that a bad one is refused with
a line naming what is wrong instead of loading with random weights or failing deep inside torch:
config.json is a JSON object with sensible sizes, every safetensors file holds the bytes its
header promises, and the weights match the model the config describes (names and shapes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import LLMPruneError
from .paths import printable

RECREATE = "the checkpoint is incomplete or was edited; re-create or re-download it"

# Sizes every supported config has; each must be a positive whole number.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "head_dim")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
# Keys older checkpoints carry that current transformers classes no longer have (recomputed buffers).
_IGNORED_UNEXPECTED = ("rotary_emb.inv_freq",)


def read_config_json(folder: str | Path, fix: str = RECREATE) -> dict:
    """config.json of a folder, which must be a JSON object."""
    path = Path(folder) / "config.json"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LLMPruneError(f"cannot read '{printable(path)}' ({exc.strerror or exc})", "check the file's permissions") from exc
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise LLMPruneError(f"'{printable(path)}' is not UTF-8 text", fix) from exc
    except json.JSONDecodeError as exc:
        raise LLMPruneError(f"'{printable(path)}' is not valid JSON (line {exc.lineno}: {exc.msg})", fix) from exc
    if not isinstance(data, dict):
        raise LLMPruneError(f"'{printable(path)}' holds a JSON {type(data).__name__}, not an object of settings", fix)
    return data


def check_config_values(config, where: str, fix: str = RECREATE) -> None:
    """Sizes in a config (a loaded one, or the dict of config.json) that are not positive whole
    numbers (a string, a negative count)."""
    raw = isinstance(config, dict)
    for name in SIZE_FIELDS:
        if raw and name not in config:
            continue
        value = config.get(name) if raw else getattr(config, name, None)
        if value is None and (name == "head_dim" or raw):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LLMPruneError(
                f"config.json of '{printable(where)}' has {name} = {value!r}, not a positive whole number", fix)
    if raw:
        return
    types = getattr(config, "layer_types", None)
    if types is not None and (not isinstance(types, (list, tuple)) or len(types) != config.num_hidden_layers):
        count = len(types) if isinstance(types, (list, tuple)) else repr(types)
        raise LLMPruneError(
            f"config.json of '{printable(where)}' lists {count} layer_types for {config.num_hidden_layers} layers", fix)


def safetensors_files(folder: str | Path, fix: str = RECREATE) -> list[Path]:
    """The safetensors files of a folder: the shards of model.safetensors.index.json, or
    model.safetensors; [] when it has none (e.g. only pytorch_model.bin)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LLMPruneError(f"'{printable(index)}' is not a valid safetensors index", fix) from exc
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise LLMPruneError(f"'{printable(folder)}' lacks the weight file(s) {', '.join(missing[:3])} listed in"
                                f" {index.name}", fix)
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def read_safetensors_header(path: str | Path, fix: str = RECREATE) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, after checking that the file holds
    exactly the bytes its header describes (a truncated or empty file is refused here)."""
    path = Path(path)

    def corrupt(detail: str) -> LLMPruneError:
        return LLMPruneError(f"weight file '{printable(path)}' is truncated or corrupt ({detail})", fix)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise corrupt(f"the header says {n} bytes, the file has {size}")
            raw = f.read(n)
    except OSError as exc:
        raise LLMPruneError(f"cannot read '{printable(path)}' ({exc.strerror or exc})", "check the file's permissions") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise corrupt("its header is not valid JSON") from exc
    data_bytes = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    covered = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise corrupt(f"bad header entry for '{name}'") from exc
        if end > data_bytes:
            raise corrupt(f"tensor '{name}' ends at byte {8 + n + end}, the file has {size}")
        width = _DTYPE_BYTES.get(dtype)
        if width is not None and end - begin != math.prod(shape) * width:
            raise corrupt(f"tensor '{name}' has {end - begin} bytes for shape {list(shape)} {dtype}")
        covered = max(covered, end)
        tensors[name] = (dtype, shape)
    if covered != data_bytes:
        raise corrupt(f"{data_bytes - covered} bytes beyond the last tensor")
    return tensors


def checkpoint_tensors(folder: str | Path, fix: str = RECREATE) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of every tensor in the folder's safetensors files (each checked whole), or
    None when the folder holds no safetensors."""
    files = safetensors_files(folder, fix)
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        shapes.update({k: shape for k, (_, shape) in read_safetensors_header(path, fix).items()})
    return shapes


def _names(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_shapes(model_class, config, stored: dict[str, tuple[int, ...]], where: str, fix: str = RECREATE) -> None:
    """Tensors whose stored shape differs from the model that config.json describes (built on the
    meta device: no memory, no time)."""
    import torch

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    wrong = {k: (stored[k], expected[k]) for k in stored.keys() & expected.keys() if tuple(stored[k]) != expected[k]}
    if wrong:
        first = min(wrong)
        raise LLMPruneError(
            f"the weights in '{printable(where)}' do not match its config.json: {len(wrong)} tensor(s) have other shapes"
            f" ({_names(wrong)}; e.g. {first} is {list(wrong[first][0])} in the weights, {list(wrong[first][1])} in the config)",
            fix)


def check_loading_info(info: dict, where: str, fix: str = RECREATE) -> None:
    """Refuse a load that left tensors of the model uninitialised (missing from the weights) or
    did not use tensors of the weights (not in the model): the config and weights disagree."""
    missing = list(info.get("missing_keys") or [])
    unexpected = [k for k in info.get("unexpected_keys") or [] if not k.endswith(_IGNORED_UNEXPECTED)]
    mismatched = [k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys") or []]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from the weights ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the weights that the config has no place for ({_names(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} tensor(s) of another shape ({_names(mismatched)})")
    raise LLMPruneError(f"the weights in '{printable(where)}' do not match its config.json: {'; '.join(parts)}", fix)


def check_tensor_names(model_class, config, stored: dict[str, tuple[int, ...]], where: str, fix: str = RECREATE) -> None:
    """The weights hold every tensor the config's model needs (a tied head may be absent) and none
    it has no place for — the same verdict as a load's loading info, without loading."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    expected = set(model.state_dict())
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - stored.keys() - tied)
    unexpected = sorted(k for k in stored.keys() - expected if not k.endswith(_IGNORED_UNEXPECTED))
    check_loading_info({"missing_keys": missing, "unexpected_keys": unexpected}, where, fix)



def tokenizer_id_count(tokenizer) -> int:
    """How many ids a tokenizer can emit: its highest id (vocabulary or added token) + 1."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.get_vocab(with_added_tokens=True) if backend is not None else tokenizer.get_vocab()
    return max(vocab.values()) + 1 if vocab else 0


def check_tokenizer_fits(tokenizer, config, where: str | None = None,
                         fix: str = "use the checkpoint's own tokenizer, or re-create the checkpoint with llmprune compress"
                         ) -> None:
    """Refuse a tokenizer that can emit ids the embedding has no row for: the model would fail
    deep inside torch (an index error) on the first such token. A model with *more* rows than
    the tokenizer has ids (stock Qwen checkpoints pad their tables) is fine."""
    n = tokenizer_id_count(tokenizer)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = int(text.vocab_size)
    if n > rows:
        place = f", in '{printable(where)}'" if where is not None else ""
        raise LLMPruneError(f"the tokenizer has {n} ids but the embedding only {rows} rows{place}", fix)
