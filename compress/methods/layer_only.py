"""layer-only (ShortGPT): drop the layers with the lowest block influence; the part of the budget
smaller than one layer comes from MLP neurons by magnitude."""

from __future__ import annotations

from . import PruningMethod, magnitude

METHOD = PruningMethod(name="layer-only", summary="ShortGPT: whole layers by block influence, the rest by magnitude",
                       neuron_scores=magnitude.neuron_scores, head_scores=magnitude.head_scores, layer_share=1.0)
