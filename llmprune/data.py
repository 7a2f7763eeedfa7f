"""Text loading and the standard tokenization into evaluation / calibration windows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .errors import LLMPruneError
from .paths import printable, special_file_kind

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".md")
JSON_SUFFIXES = (".json", ".jsonl")
DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
DEFAULT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n{output}"


def load_texts(
    spec: str | os.PathLike,
    *,
    model=None,
    tokenizer=None,
    seed: int = 0,
    self_tokens: int = 8192,
    template: str | None = None,
) -> list[str]:
    """Documents from a data spec.

    `spec` is a .txt/.raw/.tokens file, a .json/.jsonl file (a `text` field, or
    instruction/input/output records rendered with `template`), a folder of those, an HF dataset
    spec `name[:config][:split]` (e.g. `wikitext:wikitext-2-raw-v1:test`), `python-docs` (the
    Python language reference this interpreter carries: real English text on every machine), or
    `self`: text the model generates itself from its BOS token (seeded)."""
    spec = str(spec)
    if spec == PYTHON_DOCS:
        return python_docs_texts()
    if spec == "self":
        if model is None or tokenizer is None:
            raise LLMPruneError("data 'self' needs the model and its tokenizer", "pass model= and tokenizer=")
        return [self_generated_text(model, tokenizer, self_tokens, seed)]
    path = Path(spec).expanduser()
    kind = special_file_kind(path)
    if kind:
        raise LLMPruneError(f"data path '{printable(spec)}' is {kind}, not a text file or folder",
                            "point --data at a .txt/.json/.jsonl file or a folder of them")
    if path.is_dir():
        texts = [t for f in folder_files(path) for t in _read_file(f, template)]
    elif path.is_file():
        texts = _read_file(path, template)
    elif _looks_like_path(spec):
        raise LLMPruneError(f"data path '{spec}' does not exist",
                            "check the path, or use an HF dataset name like wikitext:wikitext-2-raw-v1:test")
    else:
        texts = _load_hf_dataset(spec, template)
    texts = [t for t in texts if t]
    if not texts or not any(t.strip() for t in texts):
        raise LLMPruneError(f"data '{spec}' is empty", "give a file or dataset with text in it")
    return texts


def folder_files(path: Path) -> list[Path]:
    """The text files of a data folder (.txt/.raw/.tokens/.json/.jsonl, at any depth), sorted."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
    if not files:
        raise LLMPruneError(f"data folder '{printable(str(path))}' holds no .txt/.json/.jsonl files",
                            "point --data at text files")
    return files


PYTHON_DOCS = "python-docs"


def python_docs_texts() -> list[str]:
    """The Python language reference every CPython install carries (`pydoc_data.topics`, the text
    `help()` shows, under the PSF licence): about 465,000 characters of English prose and grammar,
    one document per topic in a fixed order. Offline calibration text that is real writing, not
    the model's own samples."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise LLMPruneError("this Python install has no pydoc_data (its documentation was left out)",
                            "pass --calib FILE (text of the domain the model will see), or --calib self") from None
    return [topics[name] for name in sorted(topics)]


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or Path(spec).suffix in TEXT_SUFFIXES + JSON_SUFFIXES


def _read_file(path: Path, template: str | None) -> list[str]:
    try:
        if path.suffix in JSON_SUFFIXES:
            return [render_record(r, template) for r in _read_json_records(path)]
        # Text mode with universal newlines: CRLF files read as LF (the reference tokenization
        # of wiki.test.raw is of its LF text).
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as exc:
        raise LLMPruneError(f"data file '{path}' is not UTF-8 text ({exc.reason})", "convert it to UTF-8") from exc
    except OSError as exc:
        raise LLMPruneError(f"cannot read data file '{path}' ({exc.strerror})", "check the file's permissions") from exc


def _read_json_records(path: Path) -> list:
    raw = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in raw.splitlines() if line.strip()]
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LLMPruneError(f"data file '{path}' is not valid JSON (line {exc.lineno}: {exc.msg})",
                            "fix the file or use .txt") from exc
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", [data]))
    return data if isinstance(data, list) else [data]


def render_record(record, template: str | None = None) -> str:
    """One JSON record as text: its `text` field, or an instruction record through a template."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise LLMPruneError(f"unsupported JSON record {str(record)[:60]!r}",
                            "use objects with a 'text' field or instruction/input/output")
    if "text" in record:
        return str(record["text"])
    if "instruction" in record:
        fields = {"instruction": "", "input": "", "output": "", **{k: str(v) for k, v in record.items()}}
        chosen = template or (DEFAULT_TEMPLATE if fields["input"] else DEFAULT_TEMPLATE_NO_INPUT)
        return chosen.format(**fields)
    raise LLMPruneError(
        f"JSON record has neither 'text' nor 'instruction' (keys: {', '.join(sorted(record))})",
        "add a 'text' field, or instruction/input/output fields",
    )


def _load_hf_dataset(spec: str, template: str | None) -> list[str]:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many types for offline / unknown names
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LLMPruneError(
            f"data '{spec}' is not a local file and could not be loaded as a Hugging Face dataset ({first[:160]})",
            "check the path, or the dataset name name[:config][:split] and your network",
        ) from exc
    columns = ds.column_names
    if "text" in columns:
        return [str(t) for t in ds["text"]]
    if "instruction" in columns:
        return [render_record(r, template) for r in ds]
    string_cols = [c for c in columns if ds.features[c].dtype == "string"]
    if not string_cols:
        raise LLMPruneError(f"dataset '{spec}' has no text column (columns: {', '.join(columns)})",
                            "use a dataset with a 'text' column")
    return [str(t) for t in ds[string_cols[0]]]


def join_documents(texts: list[str]) -> str:
    """Documents joined for the stream protocol; a single document is used as it is."""
    return texts[0] if len(texts) == 1 else "\n\n".join(texts)


def tokenize_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts tokenized once, without special tokens, as one 1-D id stream."""
    ids = tokenizer(join_documents(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None, bos_id: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `seq_len` ids, each prefixed with BOS when given."""
    if seq_len < 1:
        raise LLMPruneError(f"--seq-len must be at least 1 (got {seq_len})", "pass a positive sequence length")
    if max_windows is not None and max_windows < 1:
        raise LLMPruneError(f"--max-windows must be at least 1 (got {max_windows})", "pass a positive number of windows")
    available = stream.numel() // seq_len
    if available == 0:
        raise LLMPruneError(
            f"data too short: {stream.numel()} tokens, fewer than one window of {seq_len}",
            "use more text or a smaller --seq-len",
        )
    count = available if max_windows is None else min(available, max_windows)
    if max_windows is not None and max_windows > available:
        log.warning("only %d windows of %d tokens available (asked for %d)", available, seq_len, max_windows)
    windows = stream[: count * seq_len].view(count, seq_len)
    if bos_id is not None:
        windows = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def token_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int | None = None,
                  add_bos: bool = True) -> torch.Tensor:
    """The standard protocol: tokenize once, cut into windows of `seq_len`, prefix BOS if any."""
    bos = tokenizer.bos_token_id if add_bos else None
    return cut_windows(tokenize_stream(tokenizer, texts), seq_len, max_windows, bos)


def domain_windows(tokenizer, spec: str | os.PathLike, seq_len: int, count: int, add_bos: bool = True) -> torch.Tensor:
    """`count` evaluation windows of a data spec that may span domains: a folder's files are one
    domain each and give windows in turn (the first window of each file, then the second, ...), so
    that the first few windows already cover every domain; any other spec is one stream, as in
    `token_windows`. An evaluation folder holding a file per domain is how a server text weighs the
    fleet's domains equally instead of by which file sorts first."""
    path = Path(spec).expanduser()
    files = folder_files(path) if path.is_dir() and not special_file_kind(path) else []
    if len(files) < 2:
        return token_windows(tokenizer, load_texts(spec), seq_len, count, add_bos)
    per_file = -(-count // len(files))
    parts = [token_windows(tokenizer, load_texts(f), seq_len, per_file, add_bos) for f in files]
    turns = [part[i] for i in range(per_file) for part in parts if i < part.shape[0]]
    return torch.stack(turns[:count])


def self_generated_text(model, tokenizer, n_tokens: int = 8192, seed: int = 0, chunk: int = 256) -> str:
    """Text the model samples itself from BOS (temperature 1, seeded): offline calibration data.

    Sequences of `chunk` tokens are sampled as one batch, which is far faster on a CPU than one
    long sequence; about 10% extra is generated because decoded text re-tokenizes a little shorter."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Progress(StoppingCriteria):  # a progress bar, one tick per generated position
        def __init__(self, bar):
            self.bar = bar

        def __call__(self, input_ids, scores, **kwargs):
            self.bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    n_seq = max(1, -(-int(n_tokens * 1.1) // chunk))
    saved = torch.random.get_rng_state()
    torch.manual_seed(seed)
    bar = tqdm(total=chunk, desc=f"self text ({n_seq}×{chunk} tokens)", unit="tok", leave=False)
    try:
        with torch.inference_mode():
            out = model.generate(
                torch.full((n_seq, 1), bos, dtype=torch.long),
                attention_mask=torch.ones((n_seq, 1), dtype=torch.long),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=chunk, min_new_tokens=chunk,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos,
                stopping_criteria=StoppingCriteriaList([_Progress(bar)]),
            )
    finally:
        bar.close()
        torch.random.set_rng_state(saved)
    return "\n\n".join(tokenizer.decode(row[1:], skip_special_tokens=True) for row in out)
