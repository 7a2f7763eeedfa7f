"""Policies are plug-ins: a policy registered from a test (its own module here, its own config class)
runs a federated simulation without any other module knowing it; names are refused twice."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import RecoverConfig
from llmprune.fedrecover.policies import POLICIES, Policy, PolicyConfig, register
from llmprune.options import option, positive_int


@dataclass
class EveryOtherConfig(PolicyConfig):
    top: int = option(1, flag="--toy-top", parse=positive_int, help="toy: layers the odd rounds train")


class EveryOther(Policy):
    """Odd rounds train LoRA on the top `top` layers only, even rounds on every layer; it records
    what it observed and keeps it across --resume."""

    name = "toy-every-other"
    config_class = EveryOtherConfig
    summary = "a test's policy: odd rounds train only the top layers"

    def start(self, run):
        super().start(run)
        self.seen: list = []

    def assign(self, server_round, nodes):
        out = super().assign(server_round, nodes)
        return {n: replace(a, depth=self.config.top) if server_round % 2 else a for n, a in out.items()}

    def observe(self, server_round, outcome):
        self.seen.append([server_round, sorted(r.partition_id for r in outcome.replies)])

    def report(self):
        return {"toy": {"seen": self.seen}}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = list(state.get("seen", []))


@pytest.fixture
def toy_policy():
    register(EveryOther)
    try:
        yield EveryOther
    finally:
        del POLICIES[EveryOther.name]


def test_a_policy_registered_from_a_test_runs_a_simulation(toy_policy, pruned_ckpt, text_file, tmp_path):
    from .conftest import run_recover

    run = run_recover(pruned_ckpt, [text_file], tmp_path / "out", policy="toy-every-other", toy_top=1, rounds=2)
    m = run.metrics
    assert m["policy"] == "toy-every-other" and m["config"]["policy.toy-every-other.top"] == 1
    assert m["toy"]["seen"] == [[1, [0, 1]], [2, [0, 1]]]
    depths = [[c["depth"] for c in r["clients"]] for r in m["rounds"]]
    full = m["devices"][0]["depth"]
    assert depths == [[1, 1], [full, full]] and full > 1
    # the odd round trained (and sent) only the top layer's modules: less traffic than the full round
    assert m["rounds"][0]["bytes_down"] < m["rounds"][1]["bytes_down"]


def test_a_name_is_registered_once_and_a_policy_needs_its_own_config(toy_policy):
    with pytest.raises(ValueError, match="already registered"):
        register(EveryOther)

    class Copycat(Policy):
        name = "copycat"
        config_class = EveryOtherConfig

    with pytest.raises(ValueError, match="needs its own config class"):
        register(Copycat)
    assert RecoverConfig.of(policy="toy-every-other", toy_top=2).policy.top == 2
    with pytest.raises(LLMPruneError, match="--toy-top: 0 must be at least 1"):
        RecoverConfig.of(policy="toy-every-other", toy_top=0)
