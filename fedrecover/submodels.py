"""Submodels (FedPruner): which decoder layers — or, at sublayer granularity, which attention and
MLP blocks — of the global pruned model one device holds in a round.

A held unit keeps its weights and gets LoRA; a dropped unit is skipped (the residual stream
passes through it unchanged) and its weights never reach the device. Layer indices are the
global model's; `to_local` / `to_global` rename canonical LoRA names ("{layer}.{path}.A") between
the global model and the device's smaller stack, whose layers are the held ones in order."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from llmprune.errors import LLMPruneError

PARTS = ("attn", "mlp")
GRANULARITIES = ("layer", "sublayer")


@dataclass(frozen=True)
class Submodel:
    """The held units of a `num_layers`-layer global model: global layer indices whose attention
    (`attn`) and whose MLP (`mlp`) the device keeps. A layer in neither is dropped."""

    num_layers: int
    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    def __post_init__(self) -> None:
        for part in PARTS:
            held = getattr(self, part)
            if list(held) != sorted(set(held)) or any(not 0 <= i < self.num_layers for i in held):
                raise LLMPruneError(f"submodel {part} layers {list(held)} are not distinct indices below "
                                    f"{self.num_layers}", "build submodels with Submodel.of_layers / of_units")
        if not self.layers:
            raise LLMPruneError("a submodel must hold at least one layer", "hold at least one attention or MLP block")

    @classmethod
    def of_layers(cls, num_layers: int, layers) -> Submodel:
        held = tuple(sorted({int(i) for i in layers}))
        return cls(num_layers, held, held)

    @classmethod
    def full(cls, num_layers: int) -> Submodel:
        return cls.of_layers(num_layers, range(num_layers))

    @classmethod
    def of_units(cls, num_layers: int, units, granularity: str) -> Submodel:
        """From unit indices: layers (unit i = layer i), or sublayers (unit 2i = layer i's
        attention, 2i+1 its MLP)."""
        units = [int(u) for u in units]
        if granularity == "layer":
            return cls.of_layers(num_layers, units)
        attn = tuple(sorted({u // 2 for u in units if u % 2 == 0}))
        mlp = tuple(sorted({u // 2 for u in units if u % 2 == 1}))
        return cls(num_layers, attn, mlp)

    @property
    def layers(self) -> tuple[int, ...]:
        """Global indices of the layers the device builds (holding at least one block), in order."""
        return tuple(sorted(set(self.attn) | set(self.mlp)))

    @property
    def is_full(self) -> bool:
        return len(self.attn) == len(self.mlp) == self.num_layers

    def units(self, granularity: str) -> list[int]:
        if granularity == "layer":
            return list(self.layers)
        return sorted([2 * i for i in self.attn] + [2 * i + 1 for i in self.mlp])

    def holds(self, module: str) -> bool:
        """Whether the canonical module ("12.self_attn.q_proj", "3.mlp.up_proj") is held."""
        layer, _, path = module.partition(".")
        return int(layer) in (self.attn if path.startswith("self_attn.") else self.mlp)

    def modules(self, shapes: dict[str, tuple[int, int]]) -> list[str]:
        """The held LoRA modules among `shapes` (canonical names, global indices)."""
        return [m for m in shapes if self.holds(m)]

    def local_index(self) -> dict[int, int]:
        """Global layer index -> index in the device's stack."""
        return {g: i for i, g in enumerate(self.layers)}

    def to_local(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = self.local_index()
        return {_renamed(k, index): v for k, v in arrays.items()}

    def to_global(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = {i: g for g, i in self.local_index().items()}
        return {_renamed(k, index): v for k, v in arrays.items()}

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "attn": list(self.attn), "mlp": list(self.mlp)}

    def to_json(self) -> str:
        return json.dumps({"num_layers": self.num_layers, "attn": list(self.attn), "mlp": list(self.mlp)})

    @classmethod
    def from_json(cls, text: str) -> Submodel:
        try:
            data = json.loads(text)
            return cls(int(data["num_layers"]), tuple(int(i) for i in data["attn"]), tuple(int(i) for i in data["mlp"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise LLMPruneError(f"malformed submodel description ({exc})", "the server sends it; check the versions") from None


def _renamed(key: str, index: dict[int, int]) -> str:
    layer, _, rest = key.partition(".")
    if int(layer) not in index:
        raise LLMPruneError(f"adapter module '{key}' is not in the submodel", "send only the submodel's modules")
    return f"{index[int(layer)]}.{rest}"
