"""Configuration of the compress stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmprune.errors import LLMPruneError

METHODS = ("comp", "layer-only", "wanda-sp", "magnitude", "fluctuation", "random", "taylor")
FIT_MODES = ("none", "scales", "refit")
SELECTIONS = ("energy", "pivot")
ALLOCATIONS = ("uniform", "error")


@dataclass
class CompressConfig:
    """What to remove and how.

    ratio: fraction of decoder-layer parameters removed (embeddings / LM head are not pruned).
    method: 'comp' (block-influence layer removal + condition-aware neuron selection + least-
        squares mask tuning) or a baseline: 'layer-only' (ShortGPT), 'wanda-sp', 'magnitude',
        'fluctuation' (FLAP, with its bias compensation), 'random', 'taylor' (LLM-Pruner's
        first-order gradient importance; needs gradients, the memory-hungry reference).
    layer_share: fraction of the removed parameters taken as whole layers, or 'auto' (comp: try
        every whole-layer count that fits the budget, keep the lowest calibration loss). None means
        'auto' for comp, 1 for layer-only and 0 for the neuron baselines.
    fit: how comp tunes each pruned output projection (down_proj, and o_proj when heads are
        pruned) by ridge least squares on the calibration statistics: 'refit' solves for the whole
        kept projection (the default: it measures best), 'scales' for one multiplier per kept
        neuron (mask tuning), 'none' skips tuning. The baselines never tune.
    prune_heads: also prune attention query heads (evenly within each KV group) when the model
        has more than one query head per KV head; head_ratio is the fraction of query heads removed
        per layer (default: ratio).
    selection: comp's neuron order: 'energy' (output energy ‖x_j‖·‖W_j‖, the diagonal of the
        weighted Gram; default: it measures best, out of domain too) or 'pivot' (greedy pivoted
        Cholesky on the weighted Gram: large and well conditioned on the calibration data).
    allocation: 'uniform' (every layer loses the same fraction of neurons) or 'error' (per-layer
        counts chosen to minimise the summed relative refit error of the layers, from each layer's
        pivoted-Cholesky error curve). None means 'error' for comp and 'uniform' for baselines.
    intercept: comp also fits an output bias (the mean of what was removed); FLAP always does.
    low_memory: load one decoder layer at a time from safetensors (needs a safetensors folder).
    """

    ratio: float = 0.2
    method: str = "comp"
    calib_samples: int = 32
    calib_seq_len: int = 512
    layer_share: float | str | None = None
    fit: str = "refit"
    selection: str = "energy"
    prune_heads: bool = False
    head_ratio: float | None = None
    allocation: str | None = None
    low_memory: bool = False
    seed: int = 0
    ridge: float = 1e-2
    intercept: bool = False
    min_keep: float = 0.25
    loss_windows: int = 4
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 < float(self.ratio) < 1.0:
            raise LLMPruneError(f"--ratio must be between 0 and 1, exclusive (got {self.ratio})", "pass e.g. --ratio 0.2")
        if self.method not in METHODS:
            raise LLMPruneError(f"unknown method '{self.method}'", f"choose one of: {', '.join(METHODS)}")
        if self.selection not in SELECTIONS:
            raise LLMPruneError(f"unknown selection '{self.selection}'", f"choose one of: {', '.join(SELECTIONS)}")
        if self.fit not in FIT_MODES:
            raise LLMPruneError(f"unknown fit '{self.fit}'", f"choose one of: {', '.join(FIT_MODES)}")
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise LLMPruneError(f"unknown allocation '{self.allocation}'", f"choose one of: {', '.join(ALLOCATIONS)}")
        share = self.layer_share
        if isinstance(share, str) and share != "auto":
            try:
                share = float(share)
            except ValueError:
                raise LLMPruneError(f"--layer-share must be 'auto' or a number in [0, 1] (got {share!r})", "pass --layer-share auto or e.g. 0.5") from None
            self.layer_share = share
        if isinstance(share, (int, float)) and not 0.0 <= float(share) <= 1.0:
            raise LLMPruneError(f"--layer-share must be in [0, 1] (got {share})", "pass --layer-share auto or e.g. 0.5")
        if self.head_ratio is not None and not 0.0 <= self.head_ratio < 1.0:
            raise LLMPruneError(f"--head-ratio must be in [0, 1) (got {self.head_ratio})", "pass e.g. --head-ratio 0.25")
        for name in ("calib_samples", "calib_seq_len", "loss_windows", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise LLMPruneError(f"--{name.replace('_', '-')} must be at least 1", "pass a positive number")

    @property
    def effective_layer_share(self) -> float | str:
        if self.layer_share is not None:
            return self.layer_share
        return {"comp": "auto", "layer-only": 1.0}.get(self.method, 0.0)

    @property
    def fit_mode(self) -> str:
        """Least-squares tuning of the output projections: only comp tunes."""
        return self.fit if self.method == "comp" else "none"

    @property
    def effective_allocation(self) -> str:
        if self.allocation is not None:
            return self.allocation
        return "error" if self.method == "comp" else "uniform"

    @property
    def uses_intercept(self) -> bool:
        """comp fits an output bias with its least squares; FLAP restores the removed mean."""
        return (self.method == "comp" and self.intercept) or self.method == "fluctuation"

    def to_dict(self) -> dict:
        return asdict(self)
