"""fluctuation (FLAP): var(x_j)·‖W_down[:, j]‖², with its bias compensation (the removed neurons'
mean output becomes an output bias)."""

from __future__ import annotations

from ..importance import fluctuation
from . import PruningMethod, column_scorers

neuron_scores, head_scores = column_scorers(fluctuation)


METHOD = PruningMethod(name="fluctuation", summary="FLAP: output fluctuation, with bias compensation",
                       neuron_scores=neuron_scores, head_scores=head_scores, intercept="always")
