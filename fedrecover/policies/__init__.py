"""Assignment policies, one module each, registered by name: `--policy NAME` chooses one and its own
config class holds its settings. Adding a policy is one module defining `POLICY = MyPolicy` (a
`Policy` subclass with its `config_class`) and one `_register("module")` line below (or
`register(MyPolicy)` from your own code); nothing else in fedrecover names a policy
(docs/architecture.md)."""

from __future__ import annotations

import importlib

from .base import Policy, PolicyConfig, RoundOutcome

POLICIES: dict[str, type[Policy]] = {}


def register(policy: type[Policy]) -> type[Policy]:
    """Make `policy` choosable by its name; a name already taken is refused."""
    if not policy.name or policy.name in POLICIES:
        raise ValueError(f"policy name {policy.name!r} is empty or already registered")
    if any(p.config_class is policy.config_class for p in POLICIES.values()):
        raise ValueError(f"policy '{policy.name}' needs its own config class")
    policy.config_class.name = policy.name
    POLICIES[policy.name] = policy
    return policy


def get_policy(name: str) -> type[Policy]:
    """The registered policy of this name; an unknown name is a one-line error."""
    from llmprune.errors import LLMPruneError

    if name not in POLICIES:
        raise LLMPruneError(f"unknown --policy '{name}'", f"use one of {', '.join(POLICIES)}")
    return POLICIES[name]


def policy_of(config: PolicyConfig) -> type[Policy]:
    """The policy a config belongs to (by its exact class)."""
    for policy in POLICIES.values():
        if type(config) is policy.config_class:
            return policy
    raise ValueError(f"{type(config).__name__} is no registered policy's config")


def _register(module: str) -> None:
    register(importlib.import_module(f"{__name__}.{module}").POLICY)


# One line per policy (this order is the order of --help).
_register("plan")
_register("submodels")
_register("bandit")
_register("devft")
_register("prune_tune")
_register("split")

__all__ = ["POLICIES", "Policy", "PolicyConfig", "RoundOutcome", "get_policy", "policy_of", "register"]
