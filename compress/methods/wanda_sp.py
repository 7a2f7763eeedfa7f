"""wanda-sp (structured Wanda): ‖x_j‖·‖W_down[:, j]‖, uniform per layer; heads sum their o_proj columns."""

from __future__ import annotations

from ..importance import wanda_sp
from . import PruningMethod, column_scorers

neuron_scores, head_scores = column_scorers(wanda_sp)


METHOD = PruningMethod(name="wanda-sp", summary="structured Wanda: ‖x_j‖·‖W_down[:, j]‖",
                       neuron_scores=neuron_scores, head_scores=head_scores)
