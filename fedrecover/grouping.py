"""Which units of the global pruned model each device holds (FedPruner-style submodels), server side.

A unit is a decoder layer (unit i = layer i) or, at sublayer granularity, an attention block
(unit 2i = layer i's attention) or an MLP block (unit 2i+1 = layer i's MLP). The server, on the
calibration windows it holds (nothing here ever runs on a device):

1. profiles every unit (`unit_profiles`): how much it changes the residual stream (block
   influence, the importance) and what it adds to it on a fixed sample of tokens (the features);
2. groups units that add similar things (`cka_matrix` → `group_units`): units in one group can
   stand in for each other, so a submodel that holds one unit of every group keeps every kind of
   function the model has;
3. each round, draws for every device the units it holds (`UnitSchedule.draw`): one unit of each
   group, then the rest, each draw weighted by importance and by how long nobody held the unit
   (`selection_weights`), so important units are trained often and every unit is trained eventually.

Everything is deterministic: token samples, tie-breaks and draws are seeded or ordered."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from llmprune.arch import adapter_for, base_model
from llmprune.errors import LLMPruneError

from .submodels import GRANULARITIES

# The norm whose INPUT is the residual stream after the attention block (and which the MLP reads
# from): a forward pre-hook on it sees the hidden state between the two blocks. Gemma-3 normalises
# the attention output with post_attention_layernorm *before* the residual add, so there the MLP's
# own pre-norm is the right one.
MLP_INPUT_NORMS: dict[str, str] = {
    "llama": "post_attention_layernorm",
    "mistral": "post_attention_layernorm",
    "qwen2": "post_attention_layernorm",
    "qwen3": "post_attention_layernorm",
    "gemma3_text": "pre_feedforward_layernorm",
}

# A floor on every selection weight, as a share of the mean importance: the least important units
# still get drawn now and then (and staleness makes that certain over rounds).
WEIGHT_FLOOR = 0.1


def mlp_input_norm(model: nn.Module) -> str:
    """The name of the decoder layer's norm that reads the post-attention residual stream."""
    model_type = getattr(getattr(model, "config", model), "model_type", None)
    if model_type not in MLP_INPUT_NORMS:
        raise LLMPruneError(f"no MLP-input norm is known for architecture '{model_type}'",
                            f"unit profiles support {', '.join(MLP_INPUT_NORMS)}")
    return MLP_INPUT_NORMS[model_type]


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")


def _token_sample(windows: int, seq_len: int, max_tokens: int, seed: int) -> np.ndarray:
    """Flat indices (window * (seq_len - 1) + position - 1) of at most `max_tokens` token
    positions, seeded and sorted; position 0 (BOS, an attention sink with outlier activations)
    is never sampled."""
    total = windows * (seq_len - 1)
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.choice(total, size=min(max_tokens, total), replace=False))


@torch.no_grad()
def unit_profiles(model: nn.Module, windows: torch.Tensor, granularity: str, max_tokens: int = 1024,
                  batch_size: int = 4, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Importance and contribution features of every unit, from one no-grad forward pass.

    `windows` are token ids [n, seq_len] (full windows, no padding). Hooks capture, per decoder
    layer, the hidden state entering it (h_in), the residual stream after attention (h_mid: the
    input of the MLP-input norm) and the layer output (h_out). A unit's before/after pair is
    (h_in, h_out) for a layer, (h_in, h_mid) for attention, (h_mid, h_out) for the MLP.

    Returns `(importance, features)`: importance[u] = 1 - mean cosine(before, after) over all
    tokens but position 0 (ShortGPT's block influence, as compress uses it: in [0, 2], low means
    the unit barely changes the stream); features[u] = after - before (what the unit adds to the
    residual stream) at the same seeded sample of at most `max_tokens` positions for every unit,
    float32 [tokens, hidden]. Only forwards the model, so LoRA forward hooks (`lora_applied`)
    count. The LM head is not run (Gemma's 262k-token vocabulary would dominate the cost)."""
    _check_granularity(granularity)
    if hasattr(model, "get_base_model"):  # a peft wrapper: profile the model it adapts
        model = model.get_base_model()
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be token ids [n, seq_len >= 2], got shape {tuple(windows.shape)}")
    layers = adapter_for(model).decoder_layers(model)
    n, seq_len = windows.shape
    recorder = _ProfileRecorder(len(layers) if granularity == "layer" else 2 * len(layers), granularity,
                                mlp_input_norm(model))
    sample = _token_sample(n, seq_len, max_tokens, seed)
    handles = recorder.attach(layers)
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        per_window = seq_len - 1
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            chosen = sample[(sample >= start * per_window) & (sample < stop * per_window)] - start * per_window
            # positions 1.. map to column 0.. of the stream without position 0
            recorder.rows = torch.as_tensor(chosen // per_window, device=device)
            recorder.cols = torch.as_tensor(chosen % per_window, device=device)
            base_model(model)(input_ids=windows[start:stop].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    importance = np.clip(1.0 - recorder.cos_sum / recorder.cos_count, 0.0, 2.0)  # float32 cosines can pass 1 by ~1e-7
    return importance, [np.concatenate(f).astype(np.float32, copy=False) for f in recorder.features]


class _ProfileRecorder:
    """The hooks of `unit_profiles` and what they accumulate: per unit the summed cosines and the
    contributions at the sampled positions of the current batch (`rows`, `cols`)."""

    def __init__(self, num_units: int, granularity: str, norm_name: str) -> None:
        self.granularity, self.norm_name = granularity, norm_name
        self.cos_sum, self.cos_count = np.zeros(num_units), np.zeros(num_units)
        self.features: list[list[np.ndarray]] = [[] for _ in range(num_units)]
        self.rows = self.cols = torch.zeros(0, dtype=torch.long)
        self.h_in: torch.Tensor | None = None
        self.h_mid: torch.Tensor | None = None

    def attach(self, layers) -> list:
        handles = []
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(self._on_layer_in, with_kwargs=True))
            handles.append(getattr(layer, self.norm_name).register_forward_pre_hook(self._on_mlp_in))
            handles.append(layer.register_forward_hook(self._on_layer_out(i), with_kwargs=True))
        return handles

    def record(self, unit: int, before: torch.Tensor, after: torch.Tensor) -> None:
        b, a = before[:, 1:].float(), after[:, 1:].float()
        cos = torch.nn.functional.cosine_similarity(b, a, dim=-1)
        self.cos_sum[unit] += float(cos.double().sum())
        self.cos_count[unit] += cos.numel()
        if len(self.rows):
            self.features[unit].append((a[self.rows, self.cols] - b[self.rows, self.cols]).cpu().numpy())

    def _on_layer_in(self, module, args, kwargs) -> None:
        self.h_in, self.h_mid = (args[0] if args else kwargs["hidden_states"]), None

    def _on_mlp_in(self, module, args) -> None:
        self.h_mid = args[0]

    def _on_layer_out(self, index: int):
        def hook(module, args, kwargs, output):
            h_out = output[0] if isinstance(output, tuple) else output
            if self.granularity == "layer":
                self.record(index, self.h_in, h_out)
                return
            if self.h_mid is None:
                raise RuntimeError(f"layer {index}: the MLP-input norm '{self.norm_name}' was not called")
            self.record(2 * index, self.h_in, self.h_mid)
            self.record(2 * index + 1, self.h_mid, h_out)
        return hook


def _centred_gram(x: np.ndarray) -> torch.Tensor:
    """K = Xc Xcᵀ with Xc the features centred over tokens (the same as H K H, H the centring
    matrix), float64. Computed with torch: numpy's OpenBLAS is ~200x slower on the 36 x 1M x 36
    product `cka_matrix` needs (measured: 33 s vs 0.15 s on 2 cores)."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"features must be [tokens, dims], got shape {tuple(x.shape)}")
    xc = x - x.mean(dim=0, keepdim=True)
    return xc @ xc.T


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two feature sets over the same tokens ([tokens, dims], dims may differ):
    <Kx, Ky>_F / (|Kx|_F |Ky|_F) with centred Gram matrices. 1 for features equal up to an
    orthogonal transform and isotropic scale; near 0 for unrelated features. A set of all-constant
    features (no signal) is similar to nothing: 0."""
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same tokens: {len(x)} vs {len(y)} rows")
    kx, ky = _centred_gram(x), _centred_gram(y)
    norm = float(torch.linalg.norm(kx) * torch.linalg.norm(ky))
    return float((kx * ky).sum()) / norm if norm > 0 else 0.0


def cka_matrix(features: Sequence[np.ndarray]) -> np.ndarray:
    """Pairwise linear CKA of all units' features: symmetric, diagonal 1, float64.

    Each unit's centred Gram matrix is built once and normalised to unit Frobenius norm, so all
    pairs are one product of the flattened Grams (36 units x 1024 tokens: 36 Grams of 8 MB,
    a few seconds on 2 cores, instead of one Gram product per pair). Units without signal get 0 off
    the diagonal."""
    if not len(features):
        return np.zeros((0, 0))
    tokens = {len(f) for f in features}
    if len(tokens) != 1:
        raise ValueError(f"all units need features on the same tokens, got row counts {sorted(tokens)}")
    grams = torch.empty((len(features), next(iter(tokens)) ** 2), dtype=torch.float64)
    for i, f in enumerate(features):
        k = _centred_gram(f).reshape(-1)
        norm = torch.linalg.norm(k)
        grams[i] = k / norm if norm > 0 else 0.0
    sim = (grams @ grams.T).numpy()
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    return sim


def group_units(similarity: np.ndarray, k: int) -> list[list[int]]:
    """Agglomerative clustering of units into `k` groups, average linkage on distance
    1 - similarity: start from singletons and merge the two closest groups (mean pairwise
    distance) until `k` are left. Ties go to the pair whose smallest members are lowest, so the
    result never depends on float noise in the order of operations; linkages are recomputed from
    the distance matrix (n is a few dozen units). Groups are sorted by smallest member, members
    ascending."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {sim.shape}")
    n = sim.shape[0]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}], got {k!r}")
    if not np.all(np.isfinite(sim)):
        raise ValueError("similarity has non-finite entries")
    dist = 1.0 - (sim + sim.T) / 2
    groups = [[i] for i in range(n)]
    while len(groups) > k:
        best = None
        for a in range(len(groups)):  # groups stay sorted by smallest member: (a, b) order is the tie-break
            for b in range(a + 1, len(groups)):
                d = dist[np.ix_(groups[a], groups[b])].mean()
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return groups


def selection_weights(importance: np.ndarray, staleness: np.ndarray) -> np.ndarray:
    """Unnormalised draw weights: (max(importance, 0) + floor) * (1 + staleness).

    The floor, WEIGHT_FLOOR (0.1) x mean importance (1 when all importances are 0), keeps every
    weight positive: with Gemma-like block influences (0.009 .. 0.82) the least important unit
    starts at ~1/20 of the most important one's weight. Staleness (rounds since anybody held the
    unit) multiplies it, so a unit nobody holds gains weight linearly each round until it is drawn
    and training covers every unit."""
    imp = np.clip(np.asarray(importance, dtype=np.float64), 0.0, None)
    stale = np.asarray(staleness, dtype=np.float64)
    if imp.shape != stale.shape or imp.ndim != 1:
        raise ValueError(f"importance {imp.shape} and staleness {stale.shape} must be equal-length vectors")
    if not (np.all(np.isfinite(imp)) and np.all(np.isfinite(stale)) and np.all(stale >= 0)):
        raise ValueError("importance must be finite and staleness finite and non-negative")
    mean = imp.mean() if len(imp) else 0.0
    floor = WEIGHT_FLOOR * mean if mean > 0 else 1.0
    return (imp + floor) * (1.0 + stale)


def _check_partition(groups: Sequence[Sequence[int]], n: int) -> None:
    members = sorted(int(u) for g in groups for u in g)
    if members != list(range(n)) or any(not len(g) for g in groups):
        raise ValueError(f"groups must split units 0..{n - 1} into non-empty groups, each unit once")


def draw_units(groups: Sequence[Sequence[int]], weights: np.ndarray, count: int, rng: np.random.Generator,
               must: Iterable[int] | None = None) -> list[int]:
    """`count` distinct units, sorted: the `must` units, then one unit of every group no `must`
    unit covers (drawn within the group, probability proportional to weight), then the rest
    without replacement over all units not yet chosen, proportional to weight. Every group is
    represented so each submodel keeps every kind of function; `count >= number of units` returns
    all units. Raises ValueError when `count` is below the number of groups (or below the
    `must` units plus the groups they leave uncovered)."""
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    _check_partition(groups, n)
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise ValueError("weights must be finite and positive (selection_weights guarantees it)")
    if count < len(groups):
        raise ValueError(f"a device holding {count} units cannot hold one of each of {len(groups)} groups")
    if count >= n:
        return list(range(n))
    chosen = sorted({int(u) for u in (must or ())})
    if any(not 0 <= u < n for u in chosen):
        raise ValueError(f"must units {chosen} are not all below {n}")
    uncovered = [list(g) for g in groups if not set(g) & set(chosen)]
    if len(chosen) + len(uncovered) > count:
        raise ValueError(f"{len(chosen)} must units and {len(uncovered)} uncovered groups exceed {count} units")
    for g in uncovered:
        p = w[g] / w[g].sum()
        chosen.append(int(g[rng.choice(len(g), p=p)]))
    rest = np.setdiff1d(np.arange(n), chosen)
    if count > len(chosen):
        p = w[rest] / w[rest].sum()
        chosen.extend(int(u) for u in rng.choice(rest, size=count - len(chosen), replace=False, p=p))
    return sorted(chosen)


class UnitSchedule:
    """The server's per-round unit draws: groups and importance fixed at the start of training,
    staleness (rounds since anybody held each unit) updated after every round.

    A device's draw depends only on (seed, round, device key) and the staleness at the round's
    start, never on which devices were asked before it: call `draw` for all of a round's devices,
    then `record` the union of what they held."""

    def __init__(self, groups: Sequence[Sequence[int]], importance: np.ndarray, granularity: str,
                 staleness: np.ndarray | None = None):
        _check_granularity(granularity)
        self.importance = np.asarray(importance, dtype=np.float64).copy()
        self.num_units = len(self.importance)
        _check_partition(groups, self.num_units)
        if granularity == "sublayer" and self.num_units % 2:
            raise ValueError(f"sublayer granularity needs an even number of units, got {self.num_units}")
        self.groups = sorted((sorted(int(u) for u in g) for g in groups), key=lambda g: g[0])
        self.granularity = granularity
        self.staleness = (np.zeros(self.num_units, dtype=np.int64) if staleness is None
                          else np.asarray(staleness, dtype=np.int64).copy())
        if self.staleness.shape != (self.num_units,) or np.any(self.staleness < 0):
            raise ValueError("staleness must be one non-negative count per unit")

    @classmethod
    def from_profiles(cls, importance: np.ndarray, features: Sequence[np.ndarray], granularity: str,
                      k: int) -> UnitSchedule:
        """Group the profiled units into `k` groups by CKA similarity of their contributions."""
        return cls(group_units(cka_matrix(features), k), importance, granularity)

    @property
    def num_layers(self) -> int:
        return self.num_units if self.granularity == "layer" else self.num_units // 2

    def weights(self) -> np.ndarray:
        return selection_weights(self.importance, self.staleness)

    def draw(self, server_round: int, device_key: int, count: int, seed: int) -> list[int]:
        """The sorted units device `device_key` holds in `server_round` (count clipped to the
        number of units)."""
        rng = np.random.default_rng([int(seed), int(server_round), int(device_key), 11])
        return draw_units(self.groups, self.weights(), count, rng)

    def record(self, held_units_this_round: Iterable[int]) -> None:
        """After a round: units anybody held go to staleness 0, the others age by one round."""
        held = np.zeros(self.num_units, dtype=bool)
        for u in held_units_this_round:
            if not 0 <= int(u) < self.num_units:
                raise ValueError(f"unit {u} is not below {self.num_units}")
            held[int(u)] = True
        self.staleness = np.where(held, 0, self.staleness + 1)

    def state_dict(self) -> dict:
        """JSON-able state (lists of ints and floats) for resuming."""
        return {"groups": [list(g) for g in self.groups], "importance": [float(x) for x in self.importance],
                "granularity": self.granularity, "staleness": [int(s) for s in self.staleness]}

    def load_state_dict(self, d: dict) -> None:
        restored = UnitSchedule(d["groups"], np.asarray(d["importance"]), d["granularity"], np.asarray(d["staleness"]))
        self.__dict__.update(restored.__dict__)

    @classmethod
    def from_state_dict(cls, d: dict) -> UnitSchedule:
        return cls(d["groups"], np.asarray(d["importance"]), d["granularity"], np.asarray(d["staleness"]))
