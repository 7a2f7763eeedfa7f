"""Checks that a checkpoint folder is whole and self-consistent, so that a bad one is refused with
a line naming what is wrong instead of loading with random weights or failing deep inside torch:
config.json is a JSON object with sensible sizes, every safetensors file holds the bytes its
header promises, and the weights match the model the config describes (names and shapes)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LLMPruneError
from .paths import printable

# The index and header checks live in llmprune.reader; RECREATE and safetensors_files are re-exported.
from .reader import RECREATE, checkpoint_entries, meta_model, read_header, safetensors_files  # noqa: F401

# Sizes every supported config has; each must be a positive whole number.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "head_dim")
# Keys older checkpoints carry that current transformers classes no longer have (recomputed buffers).
_IGNORED_UNEXPECTED = ("rotary_emb.inv_freq",)


# The JSON files a checkpoint folder may hold besides config.json: each must be a JSON object, or the
# library reading it fails deep inside with a message that names neither the file nor the fix.
CHECKPOINT_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                         "vocabulary.json", "pruning_report.json", "export_report.json", "metrics.json")


def check_json_files(folder: str | Path, fix: str = RECREATE, names: tuple[str, ...] = CHECKPOINT_JSON_FILES) -> None:
    """Every JSON file of a checkpoint folder (`names`) that is present is whole."""
    for name in names:
        if (Path(folder) / name).is_file():
            read_config_json(folder, fix, name)


def read_config_json(folder: str | Path, fix: str = RECREATE, name: str = "config.json") -> dict:
    """config.json (or another JSON file) of a folder, which must be a JSON object."""
    path = Path(folder) / name
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
    types = config.get("layer_types") if raw else getattr(config, "layer_types", None)
    layers = config.get("num_hidden_layers") if raw else config.num_hidden_layers
    if types is None or layers is None:
        return
    if not isinstance(types, (list, tuple)) or len(types) != layers:  # (transformers 5 refuses it in its own words)
        count = len(types) if isinstance(types, (list, tuple)) else repr(types)
        raise LLMPruneError(f"config.json of '{printable(where)}' lists {count} layer_types for {layers} layers", fix)


def read_safetensors_header(path: str | Path, fix: str = RECREATE) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, after checking that the file holds
    exactly the bytes its header describes (a truncated or empty file is refused here)."""
    return {name: (entry.dtype, entry.shape) for name, entry in read_header(path, fix).items()}


def checkpoint_tensors(folder: str | Path, fix: str = RECREATE) -> dict[str, tuple[int, ...]] | None:
    """{name: shape} of every tensor in the folder's safetensors files (each checked whole), or
    None when the folder holds no safetensors."""
    entries = checkpoint_entries(folder, fix)
    return None if entries is None else {name: entry.shape for name, entry in entries.items()}


def _names(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_shapes(model_class, config, stored: dict[str, tuple[int, ...]], where: str, fix: str = RECREATE) -> None:
    """Tensors whose stored shape differs from the model that config.json describes (built on the
    meta device: no memory, no time)."""
    expected = {k: tuple(v.shape) for k, v in meta_model(config, model_class).state_dict().items()}
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
    model = meta_model(config, model_class)
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
