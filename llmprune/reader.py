"""The one safetensors reader: a checkpoint folder's index and its files' headers are parsed and
checked here, and tensor bytes are read here, for every stage (compress --low-memory, the lean
federated clients, the integrity checks before a load).

Why not safetensors' `safe_open`: it maps the file, and mapped pages count in the process's RSS,
so a client measured against its device's memory budget (or a --low-memory run) would appear to
hold every page it touched. Here bytes are read with plain file reads at the header's offsets, a
row chunk at a time: a large tensor is converted into its final dtype chunk by chunk (a 262k x
640 embedding never exists twice), and a few rows (the embedding rows a text uses, a vocabulary
slice of the LM head) are read without the rest. The format is an 8-byte header length, a JSON
header of dtype/shape/byte offsets, then raw bytes: nothing is ever unpickled, and a file that
does not hold exactly the bytes its header promises is refused with a one-line LLMPruneError.

`meta_model` builds the model those tensors fill, on the meta device: every stage that needs a
model's names and shapes without its weights builds it here."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import model_class
from .errors import LLMPruneError
from .paths import printable

RECREATE = "the checkpoint is incomplete or was edited; re-create or re-download it"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHUNK_BYTES = 16 * 1024 * 1024  # stored bytes read (and converted) at a time: a tensor's only transient copy

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100_000_000  # bytes; safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored tensor's bytes are: its file, the absolute offset of its first byte and
    its byte count, with the dtype code of the header ("BF16", "F32", ...) and its shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def rows(self) -> int:
        """Rows along the first dimension (a scalar is one row): the unit every read is cut in."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored bytes; a dtype torch cannot hold is refused in one line."""
        if self.dtype not in TORCH_DTYPES:
            raise LLMPruneError(f"tensor '{self.name}' in '{printable(self.path)}' is stored as {self.dtype!r},"
                                " which llmprune cannot read", "store the checkpoint in F32, BF16 or F16")
        return TORCH_DTYPES[self.dtype]


# --- the folder: index and files ------------------------------------------------------------------

def _weight_map(folder: Path, fix: str) -> dict[str, str] | None:
    """Tensor name -> file name of the folder's index, checked to be one; None without an index."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LLMPruneError(f"'{printable(index)}' is not a valid safetensors index", fix) from exc
    return weight_map


def _files(folder: Path, weight_map: dict[str, str] | None, fix: str) -> list[Path]:
    if weight_map is None:
        single = folder / SINGLE_FILE
        return [single] if single.is_file() else []
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise LLMPruneError(f"'{printable(folder)}' lacks the weight file(s) {', '.join(missing[:3])} listed in"
                            f" {INDEX_FILE}", fix)
    return [folder / n for n in names]


def safetensors_files(folder: str | Path, fix: str = RECREATE) -> list[Path]:
    """The safetensors files of a folder: the shards of model.safetensors.index.json, or
    model.safetensors; [] when it has none (e.g. only pytorch_model.bin)."""
    folder = Path(folder)
    return _files(folder, _weight_map(folder, fix), fix)


def checkpoint_entries(folder: str | Path, fix: str = RECREATE) -> dict[str, TensorEntry] | None:
    """Tensor name -> TensorEntry of every tensor in a (possibly sharded) safetensors folder, each
    file checked whole; None when the folder holds no safetensors. Only headers are read. Order:
    the index's (sharded), by name (one file) — the order the tools that wrote them present."""
    folder = Path(folder)
    weight_map = _weight_map(folder, fix)
    files = _files(folder, weight_map, fix)
    if not files:
        return None
    found: dict[str, TensorEntry] = {}
    for path in files:
        found.update(read_header(path, fix))
    if weight_map is None:
        return dict(sorted(found.items()))
    ordered = {name: found[name] for name in weight_map if name in found}
    ordered.update(found)  # a tensor the index does not list keeps its place at the end
    return ordered


def find_tensor(entries: dict[str, TensorEntry], name: str, folder: str | Path,
                shape: tuple[int, ...] | None = None) -> TensorEntry:
    """The entry of `name`, refused in one line when the checkpoint lacks it or (given `shape`)
    stores another shape: the checkpoint does not match the model its config builds."""
    if name not in entries:
        raise LLMPruneError(f"'{printable(folder)}' has no tensor '{name}'", "the checkpoint does not match its config")
    entry = entries[name]
    if shape is not None and entry.shape != tuple(shape):
        raise LLMPruneError(f"tensor '{name}' in '{printable(folder)}' has shape {list(entry.shape)}, the config says"
                            f" {list(shape)}", "the checkpoint does not match its config")
    return entry


# --- one file's header ----------------------------------------------------------------------------

def _corrupt(path: Path, detail: str, fix: str) -> LLMPruneError:
    return LLMPruneError(f"weight file '{printable(path)}' is truncated or corrupt ({detail})", fix)


def _header_json(path: Path, fix: str) -> tuple[dict, int, int]:
    """(header object, header length, file size) of a safetensors file, refusing a file too short
    for its header or whose header is not a JSON object."""

    def corrupt(detail: str) -> LLMPruneError:
        return _corrupt(path, detail, fix)

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
    return header, n, size


def read_header(path: str | Path, fix: str = RECREATE) -> dict[str, TensorEntry]:
    """Tensor name -> TensorEntry (absolute offsets) of one safetensors file, after checking that
    the file holds exactly the bytes its header describes: a truncated, padded or edited file is
    refused here, before any weight is read."""
    path = Path(path)
    header, n, size = _header_json(path, fix)

    def corrupt(detail: str) -> LLMPruneError:
        return _corrupt(path, detail, fix)

    data_bytes = size - 8 - n
    entries: dict[str, TensorEntry] = {}
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
        width = DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
        if width is not None and end - begin != math.prod(shape) * width:
            raise corrupt(f"tensor '{name}' has {end - begin} bytes for shape {list(shape)} {dtype}")
        if not isinstance(dtype, str) or not 0 <= begin <= end or any(d < 0 for d in shape):
            raise corrupt(f"bad header entry for '{name}'")
        covered = max(covered, end)
        entries[name] = TensorEntry(name, path, dtype, shape, 8 + n + begin, end - begin)
    if covered != data_bytes:
        raise corrupt(f"{data_bytes - covered} bytes beyond the last tensor")
    return entries


# --- reading bytes --------------------------------------------------------------------------------

def read_bytes(entry: TensorEntry, lo: int, hi: int) -> torch.Tensor:
    """The raw bytes of rows [lo, hi) of a stored tensor (uint8), read with plain file reads into
    one buffer: no mmap, no intermediate copy."""
    if not 0 <= lo <= hi <= entry.rows:
        raise ValueError(f"rows [{lo}, {hi}) are outside '{entry.name}' ({entry.rows} rows)")
    size = (hi - lo) * entry.row_bytes
    buf = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    try:
        with open(entry.path, "rb", buffering=0) as f:
            f.seek(entry.offset + lo * entry.row_bytes)
            done = 0
            while done < size:
                n = f.readinto(view[done:])
                if not n:
                    raise LLMPruneError(f"'{printable(entry.path)}' ends inside tensor '{entry.name}'",
                                        "the file is truncated: copy or write the checkpoint again")
                done += n
    except OSError as exc:
        raise LLMPruneError(f"cannot read '{printable(entry.path)}' ({exc.strerror or exc})",
                            "check the file's permissions") from exc
    return buf


def read_rows(entry: TensorEntry, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of a stored tensor in its stored dtype. Every weight byte that is loaded into
    a model passes through here (tests patch it to see what is read)."""
    data = read_bytes(entry, lo, hi)
    return data.view(entry.torch_dtype).reshape((hi - lo, *entry.shape[1:]) if entry.shape else ())


def row_ranges(entry: TensorEntry, rows: int | None = None) -> Iterator[tuple[int, int]]:
    """[lo, hi) row ranges covering the tensor, `rows` at a time (default: CHUNK_BYTES of it)."""
    step = rows or max(1, CHUNK_BYTES // max(1, entry.row_bytes))
    for lo in range(0, entry.rows, step):
        yield lo, min(entry.rows, lo + step)


def row_blocks(entry: TensorEntry, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows) blocks of a stored tensor in its stored dtype, `rows` at a time: an LM
    head a vocabulary slice at a time, or any tensor quantised while it is read."""
    for lo, hi in row_ranges(entry, rows):
        yield lo, read_rows(entry, lo, hi)


def load_tensor(entry: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor in `dtype`, converted a row chunk at a time into a preallocated tensor: no
    full copy in the stored dtype ever exists beside it."""
    if not entry.shape:
        return read_rows(entry, 0, 1).to(dtype)
    out = torch.empty(entry.shape, dtype=dtype)
    for lo, hi in row_ranges(entry):
        out[lo:hi] = read_rows(entry, lo, hi)
    return out


def gather_rows(entry: TensorEntry, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Rows `ids` (any order, repeats allowed) of a stored tensor in its stored dtype, reading
    each run of consecutive ids once and nothing else: the embedding rows a text uses, not the
    whole table."""
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= entry.rows):
        raise LLMPruneError(f"token ids up to {int(ids.max())} for '{entry.name}', which has {entry.rows} rows",
                            "use the checkpoint's own tokenizer")
    unique, inverse = torch.unique(ids, return_inverse=True)
    wanted = unique.tolist()
    step = max(1, CHUNK_BYTES // max(1, entry.row_bytes))
    blocks, start = [], 0
    for k in range(1, len(wanted) + 1):
        if k == len(wanted) or wanted[k] != wanted[k - 1] + 1:
            for lo in range(wanted[start], wanted[k - 1] + 1, step):
                blocks.append(read_rows(entry, lo, min(wanted[k - 1] + 1, lo + step)))
            start = k
    if not blocks:
        return torch.empty((0, *entry.shape[1:]), dtype=entry.torch_dtype)
    return torch.cat(blocks)[inverse]


# --- the model the tensors fill -------------------------------------------------------------------

def meta_model(config, cls: type | None = None) -> nn.Module:
    """The causal LM `config` describes, built on the meta device: its parameter names and shapes
    (the pruned per-layer shapes included) without allocating or initialising a weight, to check
    stored shapes against, plan a fleet on, or fill from the reader one part at a time. `cls`
    defaults to `model_class(config)` (the stock class, resized when the config is pruned)."""
    cls = model_class(config) if cls is None else cls
    with torch.device("meta"):
        return cls(config)
