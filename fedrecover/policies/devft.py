"""`--policy devft --devft-stages 4,8,all` (DevFT, arXiv 2508.00041): staged growth. The layers are
profiled once on the server's text (linear CKA of what each layer adds to the residual stream)
and, per stage, split into contiguous groups of similar layers; every device trains the stage's
model, one fused layer per group (fedrecover/devft.py holds the fusion), built on the device from
the checkpoint. At a stage change each group's trained LoRA initialises its members; the server
evaluates a stage on the whole model with the stage's LoRA spread over the groups."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from llmprune.arch import adapter_for
from llmprune.errors import LLMPruneError
from llmprune.options import non_negative_float, one_of, option

from ..devft import (
    DEFAULT_BETA,
    DEFAULT_HANDOVER,
    HANDOVER_SCALES,
    HANDOVERS,
    Stage,
    build_stages,
    check_schedule_text,
    expand_lora,
    load_stage_model,
    parse_schedule,
    stage_of_rounds,
)
from ..device_models import DeviceModel, DeviceModelKind, register_device_model
from ..fleet import Assignment
from .base import Arrays, Policy, PolicyConfig

log = logging.getLogger(__name__)


def _stages(text) -> tuple[int | None, ...]:
    """'4,8,all' (or 'devft:4,8,all') -> (4, 8, None); checked for syntax and growth here, against
    the model's depth and the rounds before Flower starts."""
    if isinstance(text, tuple):
        text = ",".join("all" if s is None else str(s) for s in text)
    text = str(text).strip()
    if not text:
        return ()
    written = text if text.startswith("devft:") else f"devft:{text}"
    try:
        check_schedule_text(written)
    except LLMPruneError as exc:
        raise argparse.ArgumentTypeError(exc.problem.replace("--schedule", "stages")) from None
    return tuple(None if s.strip().lower() == "all" else int(s) for s in written[len("devft:"):].split(","))


@dataclass
class DevftConfig(PolicyConfig):
    stages: tuple[int | None, ...] = option((), flag="--devft-stages", parse=_stages, metavar="S1,S2,...,all",
                                            default_text="none: required with --policy devft",
                                            help="DevFT: representative layers per stage, growing, e.g. 4,8,all")
    beta: float = option(DEFAULT_BETA, flag="--devft-beta", parse=non_negative_float,
                         help="DevFT: weight of the members' differences in a fused layer (1: their sum)")
    handover: str = option(DEFAULT_HANDOVER, flag="--devft-handover", parse=one_of(*HANDOVERS),
                           help="DevFT: at a stage change each member gets its group's LoRA with B divided by "
                                "the group's size, times the share the server's text prefers (split), or whole "
                                "(copy, as published)")

    @property
    def schedule_text(self) -> str:
        return "devft:" + ",".join("all" if s is None else str(s) for s in self.stages)


register_device_model(DeviceModelKind("stage", Stage.from_json, Stage.submodel, load_stage_model))


class StagePolicy(Policy):
    name = "devft"
    config_class = DevftConfig
    summary = "DevFT: staged growth, devices train a model of fused representative layers that grows each stage"
    lean_devices = True
    fixed_rounds = True
    state_schema = {"stages": [str]}

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        if not cfg.policy.stages:
            raise LLMPruneError("--policy devft needs --devft-stages", "pass e.g. --devft-stages 4,8,all")

    def check_model(self, model, model_dir: str) -> None:
        """A schedule longer than the model or than the rounds is refused before Flower starts."""
        sizes = parse_schedule(self.config.schedule_text, len(adapter_for(model).decoder_layers(model)))
        stage_of_rounds(sizes, self.cfg.training.rounds)

    def adapter_modules(self, shapes, assignment: Assignment) -> list[str]:
        return list(shapes)   # any layer may be a stage's anchor

    def start(self, run) -> None:
        """Layers grouped by the similarity of what they add to the residual stream (linear CKA on
        the server's windows), contiguous groups per stage, each with its anchor."""
        from ..grouping import cka_matrix, unit_profiles

        super().start(run)
        if run.windows is None:
            raise LLMPruneError("--policy devft needs text on the server to group the layers",
                                "pass --eval-data FILE (the server's own text)")
        _, features = unit_profiles(run.model, run.windows, "layer")
        schedule = parse_schedule(self.config.schedule_text, len(features))
        self.stages = build_stages(cka_matrix(features), schedule, self.config.beta, self.config.handover)
        self.stage_of_round = stage_of_rounds(schedule, self.cfg.training.rounds)
        self.view_scales: dict[int, float] = {}     # round -> share of B its evaluation handed over
        log.info("DevFT stages: %s", [[list(g) for g in s.groups] for s in self.stages])

    def stage_at(self, server_round: int) -> Stage:
        return self.stages[self.stage_of_round[min(server_round, len(self.stage_of_round)) - 1]]

    def begin_round(self, run, server_round: int) -> dict:
        """At a stage change each group's trained LoRA initialises its members, at the share of the
        stage's update the server's text prefers."""
        if server_round > 1 and self.stage_at(server_round) is not self.stage_at(server_round - 1):
            # the last round's evaluation chose the share on these same arrays (not after --resume)
            run.state.arrays, scale = self.handed_over(run.state.arrays, self.stage_at(server_round - 1),
                                                       self.view_scales.get(server_round - 1))
            log.info("round %d: stage %d -> %d layers; each group's LoRA initialises its members (B x %g)",
                     server_round, len(self.stage_at(server_round - 1).anchors),
                     len(self.stage_at(server_round).anchors), scale)
            return {"devft_handover_scale": scale}
        return {}

    def handed_over(self, arrays: Arrays, stage: Stage, scale: float | None = None) -> tuple[Arrays, float]:
        """The whole model's adapter from a stage's, and the multiple of B (HANDOVER_SCALES) whose
        hand-over gives the lowest loss on the server's own text (unless `scale` is known): a
        stage's LoRA partly learns to make up for the layers the stage lacks, which the whole model
        does not need (bench/devft_transfer.py), so the server hands over only as much as helps."""
        if stage.is_full or stage.handover == "copy":     # "copy" is DevFT as published: the whole update
            return expand_lora(arrays, stage), 1.0
        if scale is not None:
            return expand_lora(arrays, stage, scale), scale
        candidates = [expand_lora(arrays, stage, s) for s in HANDOVER_SCALES]
        tried = [(self.run.evaluate(c, self.run.state.rows), i) for i, c in enumerate(candidates)]
        best = min(tried)[1]                              # ties keep the larger share (listed first)
        return candidates[best], HANDOVER_SCALES[best]

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        stage = self.stage_at(server_round)
        held = DeviceModel("stage", stage)
        return {node: replace(self.run.plan.clients[node][1], device_model=held, units=len(stage.anchors))
                for node in nodes}

    def eval_view(self, server_round: int, arrays: Arrays) -> Arrays:
        """The whole model as the stage would hand it over now (the same choice of B's share)."""
        view, self.view_scales[server_round] = self.handed_over(arrays, self.stage_at(server_round))
        return view

    def report(self) -> dict:
        return {"submodels": {"stages": [json.loads(s.to_json()) for s in self.stages],
                              "handover_scales": {str(r): v for r, v in sorted(self.view_scales.items())}}}

    def state_dict(self) -> dict:
        return {"stages": [s.to_json() for s in self.stages]}

    def state_problem(self, state: dict, model) -> str | None:
        problem = super().state_problem(state, model)
        if problem:
            return problem
        for i, text in enumerate(state["stages"]):
            try:
                Stage.from_json(text)
            except LLMPruneError:
                return f"'stages[{i}]' is not a stage description"
        return None if state["stages"] else "'stages' is empty"

    def load_state_dict(self, state: dict) -> None:
        if state and state.get("stages"):   # the saved grouping wins: a resumed run trains what it trained
            self.stages = [Stage.from_json(text) for text in state["stages"]]


POLICY = StagePolicy
