"""The strategy owns the round and asks its policy every round; the aggregation registry is the one
place a method is described (no Flower run here: messages are only built)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import AGGREGATIONS, Aggregation, RecoverConfig, register
from llmprune.fedrecover.aggregations.base import truncate_view
from llmprune.fedrecover.fleet import check_ranks
from llmprune.fedrecover.policies import RoundOutcome, get_policy
from llmprune.fedrecover.policies.plan import PlanPolicy
from llmprune.fedrecover.records import from_record
from llmprune.fedrecover.state import RoundState
from llmprune.fedrecover.strategy import LoraStrategy, RunContext
from llmprune.fedrecover.transport import Collected
from llmprune.testing import tiny_model

FOUND = {11: {"partition-id": 0, "num-examples": 5, "device": None},
         22: {"partition-id": 1, "num-examples": 7, "device": None},
         33: {"partition-id": 2, "num-examples": 9, "device": None}}


class Recording(PlanPolicy):
    """The fleet plan, shallower for partition 1, remembering what it was asked."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.asked, self.seen = [], []

    def assign(self, server_round, nodes):
        self.asked.append((server_round, list(nodes)))
        out = super().assign(server_round, nodes)
        return {n: replace(a, depth=1, rank=2) if n == 22 else a for n, a in out.items()}

    def observe(self, server_round, outcome):
        self.seen.append(server_round)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def run_for(model, cfg, policy_cls=PlanPolicy):
    run = RunContext(cfg, settings=None, grid=None, flower=None, model=model, nodes=FOUND)
    policy = policy_cls(cfg)
    policy.open(run)
    run.replan(policy)
    run.state = RoundState(0, dict(run.plan.init), [])
    policy.start(run)
    return run, policy


def fake_message(content, dst_node_id, message_type):
    """Flower's Message needs a running app; the test reads only content and destination."""
    return SimpleNamespace(content=content, metadata=SimpleNamespace(dst_node_id=dst_node_id))


def test_the_policy_is_asked_every_round_for_the_sampled_nodes(model, monkeypatch):
    monkeypatch.setattr("llmprune.fedrecover.messages.Message", fake_message)
    cfg = RecoverConfig.of(clients=3, fraction=0.67, aggregation="hetlora", lora_rank=4)
    run, policy = run_for(model, cfg, Recording)
    strategy = LoraStrategy(run, policy, transport=None)
    for server_round in (1, 2):
        sampled = strategy.sample(server_round)
        sent = strategy.instructions(server_round, policy.assign(server_round, sampled))
        assert [m.metadata.dst_node_id for m in sent.messages] == sampled
        for m in sent.messages:
            view = from_record(m.content["arrays"])
            ranks = {v.shape[0] for k, v in view.items() if k.endswith(".A")}
            expected = (2, 7) if m.metadata.dst_node_id == 22 else (4, len(run.plan.modules[0]))
            assert (ranks.pop(), len(view) // 2) == expected
            assert m.content["config"]["server-round"] == server_round
        assert sent.bytes_down and all(b > 0 for b in sent.bytes_down.values())
    assert [r for r, _ in policy.asked] == [1, 2] and all(len(nodes) == 2 for _, nodes in policy.asked)


def test_the_plan_policy_gives_the_plan(model):
    run, policy = run_for(model, RecoverConfig.of(clients=3))
    assert policy.assign(5, [33, 11]) == {33: run.plan.clients[33][1], 11: run.plan.clients[11][1]}
    assert run.plan.partitions == {11: 0, 22: 1, 33: 2} and run.plan.rank == 8


def test_a_round_that_too_few_devices_answered_leaves_the_adapter_and_dp_refuses_a_failed_device(model):
    from llmprune.fedrecover.messages import TrainReply

    cfg = RecoverConfig.of(clients=3, lora_rank=4, dp_clip=1.0, dp_noise=0.1)
    run, policy = run_for(model, cfg)
    strategy = LoraStrategy(run, policy, transport=None)
    previous = run.state.arrays
    reply = TrainReply(0, 1, 5.0, 1.0, 100.0, arrays=dict(previous))
    assert strategy.aggregate(1, Collected([reply]), 2, previous) == (None, None)         # 1 of 2 needed
    assert strategy.aggregate(1, Collected([reply], {1: "crash"}), 1, previous) == (None, None)   # DP: a failure
    new, loss = strategy.aggregate(1, Collected([reply], {1: "timeout"}), 1, previous)   # a timeout is no error
    assert loss == 5.0 and new.keys() == previous.keys()
    assert any(not np.array_equal(new[k], previous[k]) for k in new)                    # the noise
    again, _ = strategy.aggregate(1, Collected([reply]), 1, previous)
    assert all(np.array_equal(new[k], again[k]) for k in new)                          # seeded by (seed, round)
    policy.observe(1, RoundOutcome([reply], {}))


def test_leaving_one_device_out_is_the_aggregate_of_the_others_and_only_where_updates_are_seen(model):
    from llmprune.fedrecover.messages import TrainReply

    cfg = RecoverConfig.of(clients=3, lora_rank=4, aggregation="fedavg")
    run, policy = run_for(model, cfg)
    strategy = LoraStrategy(run, policy, transport=None)
    previous = run.state.arrays
    replies = [TrainReply(pid, n, 5.0, 1.0, 100.0, arrays={k: v + pid + 1 for k, v in previous.items()})
               for pid, n in ((0, 1), (1, 3), (2, 4))]
    new, _ = strategy.aggregate(1, Collected(replies), 1, previous)
    without = strategy.leave_one_out(Collected(replies), previous, new)
    alone, _ = strategy.aggregate(1, Collected([replies[0], replies[2]]), 1, previous)
    key = next(iter(previous))
    assert np.allclose(without(1)[key], alone[key]) and np.allclose(without(None)[key], new[key])
    assert np.allclose(without(None)[key], previous[key] + (1 * 1 + 3 * 2 + 4 * 3) / 8)
    assert strategy.leave_one_out(Collected(replies), previous, None) is None           # a round not applied
    summed = Collected(replies)
    summed.summed = True
    assert strategy.leave_one_out(summed, previous, new) is None                        # SecAgg+: only the sum
    dp_run, dp_policy = run_for(model, RecoverConfig.of(clients=3, lora_rank=4, dp_clip=1.0, dp_noise=0.1))
    assert LoraStrategy(dp_run, dp_policy, transport=None).leave_one_out(Collected(replies), previous, new) is None


def test_a_registered_aggregation_is_an_option_everywhere():
    def keep(updates, previous, rank):
        return dict(previous)

    register(Aggregation("keep", keep, client_view=truncate_view, mixed_ranks=False, secagg=False))
    try:
        assert RecoverConfig.of(aggregation="keep").training.aggregation == "keep"
        with pytest.raises(LLMPruneError, match="keep needs one rank"):
            check_ranks("keep", {2, 4})
        with pytest.raises(LLMPruneError, match="--secagg cannot be used with --aggregation keep"):
            RecoverConfig.of(aggregation="keep", secagg=True)
        from llmprune.fedrecover import aggregate

        prev = {"0.mlp.up_proj.A": np.ones((2, 3), np.float32)}
        assert aggregate("keep", [object()], prev, 2) == prev
    finally:
        del AGGREGATIONS["keep"]


def test_every_registered_policy_is_one_class_with_its_own_config():
    from llmprune.fedrecover.policies import POLICIES, Policy

    assert list(POLICIES) == ["plan", "submodels", "bandit", "devft", "prune-tune", "split"]
    for name, cls in POLICIES.items():
        assert issubclass(cls, Policy) and cls.name == name and cls.config_class.name == name and cls.summary
        assert get_policy(name) is cls
    with pytest.raises(LLMPruneError, match="unknown --policy 'greedy'"):
        get_policy("greedy")
