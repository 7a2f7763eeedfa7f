"""`--policy plan` (the default): every device trains what the fleet plan gave it, every round —
the (LoRA rank, depth) its declared memory fits, or without a fleet file `--lora-rank` on every
layer. All of its behaviour is the base class's."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Policy, PolicyConfig


@dataclass
class PlanConfig(PolicyConfig):
    """The fixed plan has no settings of its own."""


class PlanPolicy(Policy):
    name = "plan"
    config_class = PlanConfig
    summary = "every device trains the (rank, depth) its memory_mb fits, every round (no fleet: all layers)"


POLICY = PlanPolicy
