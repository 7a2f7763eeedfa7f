"""DevFT (arXiv 2508.00041): federated LoRA trained in developmental stages of a growing model.

A schedule (`devft:4,8,all`) lists how many layers each stage's model has. A stage with S layers
splits the L layers of the global model into S contiguous groups of similar layers
(`segment_layers`, on the server's layer-similarity matrix) and fuses each group into one layer:
its anchor (`anchor_of`, the member most similar to the others) plus a damped sum of the other
members' differences (`fuse_parameters`). The device trains LoRA on the S fused layers only; at a
stage change each group's trained LoRA initialises every member of the group (`expand_lora`), so
the next stage starts where the last ended. The last stage is the whole model (singleton groups:
fusion is the identity).

Indices: a Stage's groups and anchors are global layer indices; the device's stack holds the
anchors in order, so `stage.submodel()` (the anchors as held layers) renames LoRA arrays between
the global model and the device (`to_local` / `to_global`), as for FedPruner submodels.

Layers of one group may have different shapes (a checkpoint pruned to per-layer widths): the
fused layer keeps the anchor's shapes and a member contributes its difference on the overlapping
leading block only (whole heads and MLP channels: the pruned dimensions are multiples of them)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmprune.arch import adapter_for, base_model, install_layers
from llmprune.errors import LLMPruneError
from llmprune.meta_init import prefix_of
from llmprune.reader import find_tensor, load_tensor

from .client_model import index_checkpoint, load_submodel
from .submodels import Submodel

log = logging.getLogger(__name__)

PREFIX = "devft:"
# The fused layer is anchor + beta * the members' differences (the paper's beta; --devft-beta). At
# beta = 1 it adds what the whole group adds to the residual stream (each member's update summed
# around the anchor), so the stage model stays closest to the whole one, and the LoRA it trains
# carries over best: bench/devft_transfer.py measured beta 1 ahead of 0, 0.2 and 0.5 at 4 and 8 of
# 18 layers (docs/benchmarks.md, "DevFT: what carries a stage over").
DEFAULT_BETA = 1.0
# How a group's LoRA reaches its members at a stage change: "split" gives each member the anchor's
# A and B / (group size), so the group adds once the update the stage learnt for it (one fused layer
# stood for all of them); "copy" (DevFT as published) gives each member the whole update, which the
# group then adds k times. Measured in bench/devft_transfer.py: split carried over better.
HANDOVERS = ("split", "copy")
DEFAULT_HANDOVER = "split"
# How much of a stage's update is handed over: the server tries these multiples of B on its own text
# and keeps the best (0: the stage's training is not handed over at all). Measured: a quarter of a
# 4-layer stage's update improved the whole model where the whole update harmed it.
HANDOVER_SCALES = (1.0, 0.5, 0.25, 0.0)
_TIE = 1e-9  # scores this close count as equal, so float noise in sums never decides a grouping
_INTEGER = re.compile(r"^[+-]?\d+$")
_FIX = "write --schedule devft:N1,N2,...,all with growing layer counts, e.g. devft:4,8,all"


# --- the schedule -----------------------------------------------------------------------------------

def _entries(text: str) -> list[int | None]:
    """Stage sizes as written ('all' -> None), with every check that needs no layer count."""
    text = str(text).strip()
    if not text.startswith(PREFIX):
        raise LLMPruneError(f"--schedule '{text}' is not a DevFT schedule (it must start with '{PREFIX}')", _FIX)
    items = [item.strip().lower() for item in text[len(PREFIX):].split(",")]
    if items == [""]:
        raise LLMPruneError(f"--schedule {text} lists no stage", _FIX)
    sizes: list[int | None] = []
    for item in items:
        if item == "all":
            sizes.append(None)
        elif _INTEGER.match(item) and int(item) >= 1:
            sizes.append(int(item))
        else:
            raise LLMPruneError(f"--schedule {text}: stage '{item}' is not a layer count of at least 1 or 'all'", _FIX)
    if None in sizes[:-1] or any(a >= b for a, b in zip(sizes, sizes[1:]) if a is not None and b is not None):
        raise LLMPruneError(f"--schedule {text} does not grow: each stage must hold more layers than the one before",
                            _FIX)
    return sizes


def check_schedule_text(text: str) -> None:
    """Validate a schedule's syntax (prefix, entries, growth) without knowing the model's depth:
    for config validation; `parse_schedule` checks the rest once the layer count is known."""
    _entries(text)


def parse_schedule(text: str, num_layers: int) -> list[int]:
    """Stage sizes of a schedule: "devft:4,8,all" -> [4, 8, num_layers]; a final full-model stage is
    appended when missing."""
    written = _entries(text)
    text = str(text).strip()
    too_big = [s for s in written if s is not None and s > num_layers]
    if too_big:
        raise LLMPruneError(f"--schedule {text}: stage {too_big[0]} exceeds the model's {num_layers} layers",
                            f"use stage sizes of at most {num_layers} (or 'all')")
    sizes = [num_layers if s is None else s for s in written]
    if any(a >= b for a, b in zip(sizes, sizes[1:])):  # e.g. devft:8,all on an 8-layer model
        raise LLMPruneError(f"--schedule {text} does not grow: on this {num_layers}-layer model each stage must "
                            "hold more layers than the one before", _FIX)
    if sizes[-1] < num_layers:
        sizes.append(num_layers)
    return sizes


def stage_of_rounds(stages: list[int], rounds: int) -> list[int]:
    """Stage index (0-based) of rounds 1..rounds: rounds split as evenly as possible, the extra
    rounds going to the LATER stages (the full model, trained last, matters most)."""
    count = len(stages)
    if count < 1:
        raise LLMPruneError("the DevFT schedule has no stage", _FIX)
    if rounds < count:
        raise LLMPruneError(f"--rounds {rounds} is fewer than the schedule's {count} stages",
                            f"pass --rounds {count} or more, or a schedule with fewer stages")
    base, extra = divmod(int(rounds), count)
    out: list[int] = []
    for s in range(count):
        out += [s] * (base + (1 if s >= count - extra else 0))
    return out


# --- grouping ---------------------------------------------------------------------------------------

def _square(similarity: np.ndarray) -> np.ndarray:
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 1:
        raise LLMPruneError(f"the layer similarity must be a non-empty square matrix, got shape {sim.shape}",
                            "pass cka_matrix(...) of the layers' features")
    if not np.all(np.isfinite(sim)):
        raise LLMPruneError("the layer similarity has non-finite entries", "check the layer features")
    return (sim + sim.T) / 2


def _group_scores(sim: np.ndarray) -> np.ndarray:
    """score[i, j] for the group of layers i..j-1: its size times the mean pairwise similarity of
    its members (1.0 for one member), from 2-D prefix sums of the matrix without its diagonal."""
    n = sim.shape[0]
    off = sim - np.diag(np.diag(sim))
    pre = np.zeros((n + 1, n + 1))
    pre[1:, 1:] = off.cumsum(0).cumsum(1)
    score = np.full((n + 1, n + 1), -np.inf)
    for i in range(n):
        for j in range(i + 1, n + 1):
            size = j - i
            total = pre[j, j] - pre[i, j] - pre[j, i] + pre[i, i]
            score[i, j] = 1.0 if size == 1 else total / (size - 1)  # size * total / (size * (size - 1))
    return score


def segment_layers(similarity: np.ndarray, k: int) -> list[list[int]]:
    """Contiguous groups of the L layers (contiguous: the fused layers are stacked in order), k of
    them, maximising the sum over groups of size x mean pairwise similarity (one member: 1.0) by
    dynamic programming. The size weight is the mean over LAYERS of how similar each is to its
    group: an unweighted sum of group means prefers k-1 singletons and one huge group on a
    realistic (smoothly decaying) similarity. Ties go to the earlier split."""
    sim = _square(similarity)
    n = sim.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise LLMPruneError(f"cannot split {n} layers into {k!r} groups", f"use a group count between 1 and {n}")
    score = _group_scores(sim)
    best = np.full((k + 1, n + 1), -np.inf)
    best[0, 0] = 0.0
    start = np.zeros((k + 1, n + 1), dtype=int)
    for g in range(1, k + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):  # the last group is i..j-1; ascending i: the earliest wins ties
                value = best[g - 1, i] + score[i, j]
                if value > best[g, j] + _TIE or best[g, j] == -np.inf:
                    best[g, j], start[g, j] = value, i
    groups, end = [], n
    for g in range(k, 0, -1):
        groups.append(list(range(start[g, end], end)))
        end = start[g, end]
    return groups[::-1]


def anchor_of(group: list[int], similarity: np.ndarray) -> int:
    """The member most similar to the others (highest sum of similarity to the other members);
    ties (within float noise) go to the lowest index."""
    sim = _square(similarity)
    members = sorted(int(m) for m in group)
    if not members:
        raise LLMPruneError("an empty layer group has no anchor", "group at least one layer")
    sums = [sum(sim[m, o] for o in members if o != m) for m in members]
    top = max(sums)
    return next(m for m, s in zip(members, sums) if s >= top - _TIE)


# --- stages -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One developmental stage: the global model's `num_layers` layers in contiguous `groups`, each
    fused into the layer of its anchor (global indices); `beta` damps the members' differences;
    `handover` says how a group's LoRA reaches its members (HANDOVERS)."""

    num_layers: int
    groups: tuple[tuple[int, ...], ...]
    anchors: tuple[int, ...]
    beta: float
    handover: str = "copy"     # a stage written before hand-overs were a choice was "copy"

    def __post_init__(self) -> None:
        flat = [m for g in self.groups for m in g]
        fix = "build stages with build_stages"
        if self.num_layers < 1 or flat != list(range(self.num_layers)) or any(not g for g in self.groups):
            raise LLMPruneError(f"stage groups {[list(g) for g in self.groups]} are not contiguous groups covering "
                                f"layers 0..{self.num_layers - 1} in order", fix)
        if len(self.anchors) != len(self.groups) or any(a not in g for a, g in zip(self.anchors, self.groups)):
            raise LLMPruneError(f"stage anchors {list(self.anchors)} are not one member of each group", fix)
        if not math.isfinite(self.beta) or self.beta < 0:
            raise LLMPruneError(f"DevFT beta must be a finite number >= 0 (got {self.beta})", "pass e.g. --devft-beta 1")
        if self.handover not in HANDOVERS:
            raise LLMPruneError(f"DevFT hand-over '{self.handover}' is not one of {', '.join(HANDOVERS)}",
                                "pass --devft-handover split or copy")

    @property
    def is_full(self) -> bool:
        """Every group a singleton: the stage is the whole model and fusion is the identity."""
        return all(len(g) == 1 for g in self.groups)

    def submodel(self) -> Submodel:
        """The layers the device builds: the anchors, in order (their LoRA names go local/global with it)."""
        return Submodel.of_layers(self.num_layers, self.anchors)

    def group_of(self) -> dict[int, tuple[int, ...]]:
        """Anchor -> its group."""
        return dict(zip(self.anchors, self.groups))

    def to_dict(self) -> dict:
        return {"num_layers": self.num_layers, "groups": [list(g) for g in self.groups],
                "anchors": list(self.anchors), "beta": self.beta, "handover": self.handover}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Stage:
        try:
            data = json.loads(text)
            return cls(int(data["num_layers"]), tuple(tuple(int(m) for m in g) for g in data["groups"]),
                       tuple(int(a) for a in data["anchors"]), float(data["beta"]), str(data.get("handover", "copy")))
        except (ValueError, KeyError, TypeError) as exc:
            raise LLMPruneError(f"malformed DevFT stage description ({exc})",
                                "the server sends it; check that server and clients run the same version") from None


def build_stages(similarity: np.ndarray, schedule: list[int], beta: float, handover: str = DEFAULT_HANDOVER) -> list[Stage]:
    """One Stage per schedule entry (growing layer counts ending at the model's depth)."""
    sim = _square(similarity)
    n = sim.shape[0]
    if not schedule or list(schedule) != sorted(set(schedule)) or schedule[-1] != n:
        raise LLMPruneError(f"DevFT schedule {list(schedule)} does not grow to the model's {n} layers",
                            "build it with parse_schedule")
    stages = []
    for size in schedule:
        groups = segment_layers(sim, int(size))
        anchors = tuple(anchor_of(g, sim) for g in groups)
        stages.append(Stage(n, tuple(tuple(g) for g in groups), anchors, float(beta), handover))
    return stages


# --- fusing layers ----------------------------------------------------------------------------------

def _overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[slice, ...]:
    return tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))


def _add_differences(anchor: dict[str, torch.Tensor], members: Iterable[tuple[int | str, dict]]) -> dict:
    """Sum over the members of (member - anchor) per parameter, in float32, one member at a time;
    a member parameter of another shape counts on the overlapping leading block only."""
    acc = {name: torch.zeros(t.shape, dtype=torch.float32) for name, t in anchor.items()}
    for label, state in members:
        if set(state) != set(anchor):
            odd = sorted(set(state) ^ set(anchor))
            raise LLMPruneError(f"layer {label} does not have the anchor's parameters (differing: {odd[:4]})",
                                "DevFT fuses layers of one architecture: group layers of the same model only")
        for name, a in anchor.items():
            m = state[name]
            if m.dim() != a.dim():
                raise LLMPruneError(f"layer {label}'s {name} has shape {list(m.shape)}, the anchor's {list(a.shape)}",
                                    "DevFT fuses layers of one architecture: group layers of the same model only")
            if m.shape != a.shape:
                log.debug("layer %s's %s %s fused with the anchor's %s on their overlap", label, name,
                          list(m.shape), list(a.shape))
            cut = _overlap(a, m)
            acc[name][cut] += m[cut].to(torch.float32) - a[cut].to(torch.float32)
        del state
    return acc


def fuse_parameters(anchor: dict[str, torch.Tensor], members: list[dict[str, torch.Tensor]],
                    beta: float) -> dict[str, torch.Tensor]:
    """theta_anchor + beta * sum_j (theta_j - theta_anchor) over the OTHER members, computed in
    float32 and returned in the anchor's dtypes (new tensors; the inputs are not changed)."""
    with torch.no_grad():
        acc = _add_differences(anchor, enumerate(members))
        return {name: (a.to(torch.float32) + beta * acc[name]).to(a.dtype) for name, a in anchor.items()}


def fuse_layers_in_place(layers: list[nn.Module], stage: Stage,
                         member_state: Callable[[int], dict[str, torch.Tensor]]) -> None:
    """Turn the device's stack (layer i = the anchor of group i, holding the anchor's weights) into
    the stage's fused layers. `member_state(j)` gives global layer j's parameters under the names of
    `layer.named_parameters()`; members are read one at a time, so besides the stack only one member
    layer and one float32 accumulator exist at once."""
    if len(layers) != len(stage.groups):
        raise LLMPruneError(f"the stack has {len(layers)} layers but the stage has {len(stage.groups)} groups",
                            "build the stack from stage.submodel()")
    with torch.no_grad():
        for layer, group, anchor in zip(layers, stage.groups, stage.anchors):
            others = [j for j in group if j != anchor]
            if not others:
                continue
            params = dict(layer.named_parameters())
            acc = _add_differences({n: p.detach() for n, p in params.items()},
                                   ((j, member_state(j)) for j in others))
            for name, p in params.items():
                p.copy_((p.detach().to(torch.float32) + stage.beta * acc.pop(name)).to(p.dtype))
            log.debug("layer %d fused with layers %s (beta %g)", anchor, others, stage.beta)


def fuse_model(model: nn.Module, stage: Stage) -> nn.Module:
    """A fully loaded model turned IN PLACE into the stage's model (returned): each group's anchor
    gets the fused weights, read from the member layers before they are dropped; the stack becomes
    the anchors. Call it before attaching LoRA (member and anchor parameters must match by name)."""
    layers = adapter_for(model).decoder_layers(model)
    if len(layers) != stage.num_layers:
        raise LLMPruneError(f"the stage is of a {stage.num_layers}-layer model but the model has {len(layers)} layers",
                            "build the stages from this model")
    if stage.is_full:
        return model
    kept = [layers[a] for a in stage.anchors]
    fuse_layers_in_place(kept, stage, lambda j: {n: p.detach() for n, p in layers[j].named_parameters()})
    install_layers(model, kept, stage.anchors)
    log.info("stage model: %d fused layers (anchors %s) of %d", len(kept), list(stage.anchors), stage.num_layers)
    return model


def load_stage_model(folder: str | os.PathLike, stage: Stage, *, dtype: torch.dtype = torch.bfloat16,
                     embedding: str = "same") -> nn.Module:
    """The device's model of a stage, read from the checkpoint: the anchors as `load_submodel`
    builds them, then fused with the members' tensors read from disk one layer at a time (in each
    parameter's dtype), so no member layer is ever held beside another."""
    model = load_submodel(folder, stage.submodel(), dtype=dtype, embedding=embedding)
    if stage.is_full:
        return model
    folder = Path(folder)
    entries = index_checkpoint(folder)
    head = f"{prefix_of(model, base_model(model))}layers."
    layers = list(adapter_for(model).decoder_layers(model))
    stack_of = {j: i for i, g in enumerate(stage.groups) for j in g}
    read = [0]

    def member_state(j: int) -> dict[str, torch.Tensor]:
        state = {}
        for name, param in layers[stack_of[j]].named_parameters():  # UpcastLinear keeps weight/bias names
            entry = find_tensor(entries, f"{head}{j}.{name}", folder)
            state[name] = load_tensor(entry, param.dtype)
            read[0] += entry.nbytes
        return state

    fuse_layers_in_place(layers, stage, member_state)
    log.info("stage model: %d fused layers (anchors %s), %.1f MB of member layers read", len(layers),
             list(stage.anchors), read[0] / 2**20)
    return model


# --- LoRA across stages -----------------------------------------------------------------------------

def _resized(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A copy of `array` cropped / zero-padded to `shape` (a member pruned to other widths)."""
    out = np.zeros(shape, dtype=array.dtype)
    cut = tuple(slice(0, min(a, b)) for a, b in zip(array.shape, shape))
    out[cut] = array[cut]
    return out


def _layer_of(key: str) -> tuple[int, str]:
    layer, _, rest = key.partition(".")
    if not layer.isdigit() or not rest:
        raise LLMPruneError(f"'{key}' is not a canonical LoRA name", "use names like '3.self_attn.q_proj.A'")
    return int(layer), rest


def expand_lora(arrays: dict[str, np.ndarray], stage: Stage, b_scale: float = 1.0) -> dict[str, np.ndarray]:
    """The full model's adapter from a stage's (global names): every member of a group, the anchor
    included, gets its anchor's arrays, B divided by the group's size under the "split" hand-over
    and times `b_scale` (how much of the stage's update the server hands over); entries of layers
    no anchor covers are kept (copied) as they are. Used at a stage change (the next stage starts
    from the last) and to evaluate a stage on the whole model. A member whose own entry has another
    shape gets the anchor's cropped / zero-padded."""
    group_of = stage.group_of()
    out = {key: np.array(value, copy=True) for key, value in arrays.items()}
    for key, value in arrays.items():
        layer, rest = _layer_of(key)
        group = group_of.get(layer, ())
        if not group or not key.endswith(".B"):
            share = value
        else:
            share = value * (b_scale if stage.handover == "copy" else b_scale / len(group))   # else split
        for member in group:
            name = f"{member}.{rest}"
            own = arrays.get(name)
            same = own is None or own.shape == share.shape
            out[name] = np.array(share, copy=True) if same else _resized(share, own.shape)
    return dict(sorted(out.items(), key=lambda item: _layer_of(item[0])))


def stage_modules(shapes: dict[str, tuple[int, int]], stage: Stage) -> list[str]:
    """The canonical LoRA modules (global names) the stage trains: those of its anchors."""
    anchors = set(stage.anchors)
    return [name for name in shapes if _layer_of(name)[0] in anchors]
