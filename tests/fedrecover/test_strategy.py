"""The strategy owns the round and asks its assignment policy every round; the aggregation
registry is the one place a method is described (no Flower run here: messages are only built)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import AGGREGATIONS, Aggregation, RecoverConfig, module_shapes, register
from llmprune.fedrecover.aggregations.base import truncate_view
from llmprune.fedrecover.fleet import check_ranks
from llmprune.fedrecover.policy import AssignmentPolicy, FleetPolicy, plan_fleet
from llmprune.fedrecover.records import from_record, to_record
from llmprune.fedrecover.strategy import LoraStrategy, RoundTransport
from llmprune.testing import tiny_model

FOUND = {11: {"partition-id": 0, "num-examples": 5, "device": None},
         22: {"partition-id": 1, "num-examples": 7, "device": None},
         33: {"partition-id": 2, "num-examples": 9, "device": None}}


class Recording(FleetPolicy):
    """The fleet plan, shallower for partition 1, remembering what it was asked."""

    def __init__(self, plan):
        super().__init__(plan)
        self.asked, self.seen = [], []

    def assign(self, server_round, nodes):
        self.asked.append((server_round, list(nodes)))
        out = super().assign(server_round, nodes)
        return {n: replace(a, depth=1, rank=2) if n == 22 else a for n, a in out.items()}

    def observe(self, server_round, result):
        self.seen.append(server_round)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def strategy_for(model, cfg, policy_cls=FleetPolicy):
    plan = plan_fleet(model, cfg, FOUND)
    policy = policy_cls(plan)
    return LoraStrategy(cfg, policy, plan.partitions, module_shapes(model, cfg.target_modules), plan.init, plan.rank,
                        transport=RoundTransport()), policy, plan


def fake_message(content, dst_node_id, message_type):
    """Flower's Message needs a running app; the test reads only content and destination."""
    return SimpleNamespace(content=content, metadata=SimpleNamespace(dst_node_id=dst_node_id))


def test_the_policy_is_asked_every_round_for_the_sampled_nodes(model, monkeypatch):
    monkeypatch.setattr("llmprune.fedrecover.strategy.Message", fake_message)
    cfg = RecoverConfig(clients=3, fraction=0.67, aggregation="hetlora", lora_rank=4)
    strategy, policy, plan = strategy_for(model, cfg, Recording)
    assert isinstance(policy, AssignmentPolicy)
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, to_record(plan.init), {}, grid=None))
        assert [m.metadata.dst_node_id for m in messages] == strategy.sample(server_round)
        for m in messages:
            view = from_record(m.content["arrays"])
            ranks = {v.shape[0] for k, v in view.items() if k.endswith(".A")}
            expected = (2, 7) if m.metadata.dst_node_id == 22 else (4, len(plan.modules[0]))
            assert (ranks.pop(), len(view) // 2) == expected
    assert [r for r, _ in policy.asked] == [1, 2] and all(len(nodes) == 2 for _, nodes in policy.asked)


def test_fleet_policy_gives_the_plan(model):
    cfg = RecoverConfig(clients=3)
    strategy, policy, plan = strategy_for(model, cfg)
    assert policy.assign(5, [33, 11]) == {33: plan.clients[33][1], 11: plan.clients[11][1]}
    assert plan.partitions == {11: 0, 22: 1, 33: 2} and strategy.rank == 8


def test_a_registered_aggregation_is_an_option_everywhere():
    def keep(updates, previous, rank):
        return dict(previous)

    register(Aggregation("keep", keep, client_view=truncate_view, mixed_ranks=False, secagg=False))
    try:
        assert RecoverConfig(aggregation="keep").aggregation == "keep"
        with pytest.raises(LLMPruneError, match="keep needs one rank"):
            check_ranks("keep", {2, 4})
        with pytest.raises(LLMPruneError, match="--secagg cannot be used with --aggregation keep"):
            RecoverConfig(aggregation="keep", secagg=True)
        from llmprune.fedrecover import aggregate

        prev = {"0.mlp.up_proj.A": np.ones((2, 3), np.float32)}
        assert aggregate("keep", [object()], prev, 2) == prev
    finally:
        del AGGREGATIONS["keep"]
