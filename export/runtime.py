"""ONNX Runtime generation with the KV cache, for the decoders this package exports (optimum's
`text-generation-with-past` layout: input_ids, attention_mask, [position_ids],
past_key_values.N.key/value in; logits, present.N.key/value out)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from llmprune.errors import LLMPruneError
from llmprune.paths import check_utf8_path, special_file_kind

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NLL_POSITIONS = 16   # positions whose logits are taken to float64 at once (a 262k vocabulary: 34 MB)
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def model_file(path: str | os.PathLike, prefer_ort: bool = False) -> Path:
    """The model file of an export folder: model.onnx (else model.ort), or model.ort when preferred
    (an error when the folder has none: a user who asked for the mobile format must not time the other)."""
    check_utf8_path(path, "ONNX path")
    path = Path(path)
    kind = special_file_kind(path)
    if kind:
        raise LLMPruneError(f"ONNX path '{path}' is {kind}, not a folder", "pass a folder written by `llmprune export`")
    if path.is_file():
        return path
    if not path.is_dir():
        raise LLMPruneError(f"ONNX path '{path}' does not exist", "pass a folder written by `llmprune export`")
    if prefer_ort and not (path / "model.ort").is_file():
        raise LLMPruneError(f"'{path}' holds no model.ort (--ort-format asked for it)",
                            "export with `llmprune export --ort`, or drop --ort-format to run model.onnx")
    names = ("model.ort", "model.onnx") if prefer_ort else ("model.onnx", "model.ort")
    for name in names:
        if (path / name).is_file():
            check_export_files(path)
            return path / name
    raise LLMPruneError(f"'{path}' holds no model.onnx", "pass a folder written by `llmprune export`")


# The JSON files of an export folder the runtimes read (besides the checkpoint's own kinds).
EXPORT_JSON_FILES = ("config.json", "genai_config.json")


def check_export_files(folder: Path) -> None:
    """Every JSON file of an export folder is whole: a truncated one is one line naming it, not an
    error deep inside the tokenizer, transformers or onnxruntime-genai."""
    from llmprune.integrity import CHECKPOINT_JSON_FILES, check_json_files

    check_json_files(folder, "export the model again with `llmprune export`", EXPORT_JSON_FILES + CHECKPOINT_JSON_FILES)


class OnnxCausalLM:
    """A decoder exported with KV cache, run by onnxruntime: forward passes and greedy generation."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, prefer_ort: bool = False,
                 prepack: bool = True):
        """`prepack=False`: ONNX Runtime keeps no repacked copy of the MatMul weights, so a model
        with external data runs from the mapped file without a second copy of its weights in
        memory (the export's fp32 check; slower per call only where packing pays off)."""
        import onnxruntime as ort

        self.path = model_file(path, prefer_ort)
        options = ort.SessionOptions()
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LLMPruneError(f"onnxruntime cannot load '{self.path}' ({first[:200]})", "re-run `llmprune export`") from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        layers: dict[int, dict[str, str]] = {}
        for name in inputs:
            m = _PAST.match(name)
            if m:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
        if "input_ids" not in inputs or "logits" not in {o.name for o in self.session.get_outputs()}:
            raise LLMPruneError(f"'{self.path}' is not a causal-LM decoder export (no input_ids/logits)",
                                "export with `llmprune export`")
        self.num_layers = len(layers)
        self.past_names = [(layers[i]["key"], layers[i]["value"]) for i in sorted(layers)]
        self.kv_shapes = []
        for key, _ in self.past_names:
            shape = inputs[key].shape  # [batch, kv_heads, past, head_dim]
            self.kv_shapes.append((int(shape[1]), int(shape[3])))
        first = inputs[self.past_names[0][0]] if self.past_names else None
        self.kv_dtype = _NP_TYPES.get(first.type, np.float32) if first is not None else np.float32
        self.uses_position_ids = "position_ids" in inputs

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.zeros((batch, h, 0, d), self.kv_dtype), np.zeros((batch, h, 0, d), self.kv_dtype)) for h, d in self.kv_shapes]

    def forward(self, input_ids, attention_mask=None, past=None) -> tuple[np.ndarray, list]:
        """Logits [batch, seq, vocab] (float32) and the new cache, given the cache of earlier tokens."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        batch, seq = ids.shape
        past = self.empty_past(batch) if past is None else past
        past_len = past[0][0].shape[2] if past else 0
        mask = np.ones((batch, past_len + seq), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if self.uses_position_ids:
            positions = np.cumsum(mask, axis=1) - 1
            positions[mask == 0] = 1
            feed["position_ids"] = positions[:, past_len:].astype(np.int64)
        for (k_name, v_name), (k, v) in zip(self.past_names, past):
            feed[k_name], feed[v_name] = k, v
        outputs = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        by_name = dict(zip(names, outputs))
        present = [(by_name[f"present.{i}.key"], by_name[f"present.{i}.value"]) for i in range(self.num_layers)]
        return by_name["logits"].astype(np.float32, copy=False), present

    def stream(self, input_ids, max_new_tokens: int = 32, eos_token_id=None) -> Iterator[int]:
        """Greedy decoding with the KV cache, one token id at a time (stops after an EOS id)."""
        ids = [int(t) for t in np.asarray(input_ids).reshape(-1)]
        if not ids:
            raise LLMPruneError("empty prompt", "give a prompt of at least one token")
        eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
        logits, past = self.forward(np.array([ids], np.int64))
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[0, -1]))
            yield token
            if token in eos:
                return
            logits, past = self.forward(np.array([[token]], np.int64), past=past)

    def generate(self, input_ids, max_new_tokens: int = 32, eos_token_id=None,
                 callback: Callable[[int], None] | None = None) -> list[int]:
        """The new token ids of a greedy continuation (EOS included when it ends the text)."""
        out = []
        for token in self.stream(input_ids, max_new_tokens, eos_token_id):
            out.append(token)
            if callback is not None:
                callback(token)
        return out

    def nll(self, windows) -> tuple[float, int]:
        """Summed NLL of tokens 1..n of every window (rows of ids, no cache) and the prediction count."""
        total, count = 0.0, 0
        for row in np.asarray(windows, np.int64):
            logits, _ = self.forward(row[None])
            for start in range(0, len(row) - 1, _NLL_POSITIONS):   # float64 a few positions at a time
                part = logits[0, start:min(start + _NLL_POSITIONS, len(row) - 1)].astype(np.float64)
                targets = row[start + 1:start + 1 + len(part)]
                top = part.max(axis=-1, keepdims=True)
                logz = top[:, 0] + np.log(np.exp(part - top).sum(axis=-1))
                total += float((logz - part[np.arange(len(targets)), targets]).sum())
            count += len(row) - 1
        return total, count

    def perplexity(self, windows) -> float:
        total, count = self.nll(windows)
        return math.exp(total / max(count, 1))

    def text_scores(self, windows, tokenizer=None) -> dict:
        """Perplexity of the windows and, given the tokenizer that cut them from text, bits per
        byte of the text their predicted tokens cover (summed NLL / ln 2 / UTF-8 bytes, as
        `llmprune eval` reports it; comparable across vocabularies). None without a tokenizer
        (windows of random ids cover no text)."""
        total, count = self.nll(windows)
        n_bytes = None
        if tokenizer is not None:
            import torch

            from llmprune.evaluate import text_measures

            n_bytes, _ = text_measures(tokenizer, torch.as_tensor(np.asarray(windows, np.int64)))
        mean = total / max(count, 1)
        return {"perplexity": math.exp(mean) if mean < 700 else float("inf"),  # exp overflows past ~709
                "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None, "bytes": n_bytes}


def text_stream(tokenizer, token_ids: Iterator[int], skip_special_tokens: bool = True) -> Iterator[str]:
    """Text pieces as tokens arrive (decodes the whole continuation each time, yields what is new;
    holds back an incomplete UTF-8 character)."""
    ids: list[int] = []
    shown = ""
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if text != shown and text.startswith(shown):
        yield text[len(shown):]
