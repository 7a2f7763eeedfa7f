"""Embedding rows that train beside LoRA (`--train-rows`), for checkpoints whose vocabulary was
trimmed (`compress --vocab`): a word whose tokens were dropped is now spelt by other tokens, in a
way the model never saw, and what it needs to learn lives in those tokens' embedding rows (and,
when tied, in the LM head's rows of the same tokens) — which LoRA on the decoder's projections
cannot reach.

Device: `TrainableRows` adds a trained delta to the rows of the tokens its windows hold — in the
embedding lookup and, for a tied table, in the logits of those tokens — as one [rows, hidden]
parameter, never a copy of the table. It uploads the rows' ids, their deltas and how often its
windows held each token (`REPLY_KEYS`): only rows its data touched.
Server: `merge_rows` moves every touched row by the mean of the deltas of the devices that touched
it, weighted by how often each saw the token; rows nobody touched keep their value. The global
rows (`GLOBAL_KEYS`: the ids changed so far and their values) go to every device with its
instruction and into the recovered checkpoint's table (`set_rows`)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

Arrays = dict[str, np.ndarray]
GLOBAL_KEYS = ("rows.ids", "rows.values")             # the rows changed so far (instruction, round state)
REPLY_KEYS = ("rows.ids", "rows.delta", "rows.count")  # what one device changed this round


def split_rows(arrays: Arrays) -> tuple[Arrays, Arrays]:
    """(the LoRA arrays, the rows' entries) of an instruction's or a reply's arrays."""
    rows = {k: v for k, v in arrays.items() if k.startswith("rows.")}
    return {k: v for k, v in arrays.items() if not k.startswith("rows.")}, rows


def token_counts(windows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The token ids the windows hold (sorted) and how many times each occurs."""
    ids, counts = np.unique(np.asarray(windows, dtype=np.int64), return_counts=True)
    return ids, counts.astype(np.float32)


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


class TrainableRows:
    """A trained delta on the rows `ids` of the input embedding (and of the tied LM head) while the
    block runs: lookup(t) + delta[t] · embed_scale for t in ids, and logits[..., ids] += h · deltaᵀ.
    The table itself is untouched; `delta` is the only new parameter."""

    def __init__(self, model: nn.Module, ids: np.ndarray, counts: np.ndarray | None = None) -> None:
        self.model = model
        self.counts = np.ones(len(ids), np.float32) if counts is None else np.asarray(counts, np.float32)
        embedding = model.get_input_embeddings()
        weight = embedding.weight
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        self.delta = nn.Parameter(torch.zeros(len(self.ids), weight.shape[1], dtype=weight.dtype))
        self.slot = torch.full((weight.shape[0],), -1, dtype=torch.long)
        self.slot[self.ids] = torch.arange(len(self.ids))
        scale = getattr(embedding, "embed_scale", None)     # Gemma scales the lookup by √hidden
        self.embed_scale = float(scale) if scale is not None else 1.0
        self.tied = _tied(model)
        self.handles: list = []

    def _lookup(self, module, inputs, output):
        slots = self.slot[inputs[0]]
        held = (slots >= 0).unsqueeze(-1).to(output.dtype)
        return output + self.delta[slots.clamp(min=0)].to(output.dtype) * held * self.embed_scale

    def _logits(self, module, inputs, output):
        extra = (inputs[0] @ self.delta.T.to(inputs[0].dtype)).to(output.dtype)
        return output.index_add(output.dim() - 1, self.ids, extra)

    def __enter__(self) -> TrainableRows:
        self.handles.append(self.model.get_input_embeddings().register_forward_hook(self._lookup))
        if self.tied:
            self.handles.append(self.model.get_output_embeddings().register_forward_hook(self._logits))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def reply(self) -> Arrays:
        """What the device uploads (`REPLY_KEYS`): the rows' ids, deltas and token counts."""
        return {"rows.ids": self.ids.numpy().copy(), "rows.delta": self.delta.detach().float().numpy().copy(),
                "rows.count": self.counts}


def merge_rows(base: torch.Tensor, current: Arrays, updates: list[Arrays]) -> Arrays:
    """The new global rows (`GLOBAL_KEYS`): each row a device touched moves from its value at the
    round's start (`current`, else `base`: the checkpoint's table) by the count-weighted mean of
    the deltas of the devices that touched it; the rows changed earlier and untouched now stay."""
    values = {int(i): v for i, v in zip(current.get("rows.ids", []), current.get("rows.values", []))}
    if updates:
        ids = np.concatenate([u["rows.ids"] for u in updates]).astype(np.int64)
        weights = np.concatenate([u["rows.count"] for u in updates]).astype(np.float64)
        deltas = np.concatenate([u["rows.delta"] for u in updates]).astype(np.float64)
        touched, where = np.unique(ids, return_inverse=True)
        sums = np.zeros((len(touched), deltas.shape[1]))
        np.add.at(sums, where, deltas * weights[:, None])
        total = np.bincount(where, weights=weights, minlength=len(touched))
        for k, token in enumerate(touched.tolist()):
            start = values[token] if token in values else base[token].detach().double().numpy()
            values[token] = (start + sums[k] / total[k]).astype(np.float32)
    order = sorted(values)
    hidden = base.shape[1]
    return {"rows.ids": np.asarray(order, dtype=np.int64),
            "rows.values": np.stack([values[i] for i in order]).astype(np.float32) if order
            else np.zeros((0, hidden), np.float32)}


@torch.no_grad()
def set_rows(model: nn.Module, rows: Arrays) -> None:
    """Write the global rows into the model's embedding table (the tied LM head shares it)."""
    if rows is None or not len(rows.get("rows.ids", ())):
        return
    weight = model.get_input_embeddings().weight
    ids = torch.as_tensor(rows["rows.ids"], dtype=torch.long)
    weight.index_copy_(0, ids, torch.as_tensor(rows["rows.values"]).to(weight.dtype))


@contextmanager
def rows_applied(model: nn.Module, rows: Arrays | None):
    """The model computes with the global rows until the block ends (its table restored after)."""
    if rows is None or not len(rows.get("rows.ids", ())):
        yield model
        return
    weight = model.get_input_embeddings().weight
    ids = torch.as_tensor(rows["rows.ids"], dtype=torch.long)
    saved = weight.detach()[ids].clone()
    set_rows(model, rows)
    try:
        yield model
    finally:
        with torch.no_grad():
            weight.index_copy_(0, ids, saved)
