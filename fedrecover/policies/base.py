"""The assignment policy: who trains what each round. A policy is one class with its own small
config class; every hook it may need is declared here as a no-op (or the fixed plan's behaviour),
so a policy overrides only what it changes. The round loop (strategy.py) calls them in order:

    before Flower starts   check_config(cfg), check_model(meta model), plan_devices, adapter_modules/ranks
    on --resume, before    state_problem(saved state): its shape (state_schema) and the policy's rules
    on the server, once    open(run) -> [the fleet plan is made] -> start(run) -> load_state_dict(saved)
                           -> transport(run, plain, timeout)
    every round            begin_round -> assign -> [send, collect, aggregate] -> eval_view -> [evaluate]
                           -> observe -> client_report (per device row) -> state_dict (saved with the round)
    at the end             report() (entries of metrics.json)

What each hook may touch: `run` is the RunContext (strategy.py): its model, plan, state and
settings; a policy changes the run only in `open` and `begin_round`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..fleet import Assignment, plan_rank_depth
from ..lora import top_layer_modules

if TYPE_CHECKING:   # type names only: the policies never import the config or the loop at run time
    from torch import nn

Arrays = dict[str, np.ndarray]


@dataclass
class PolicyConfig:
    """A policy's own settings (fields declared with llmprune.options.option); `name` is the
    registered policy's name, set by the registry."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        from llmprune.options import coerce_fields

        coerce_fields(self)


@dataclass
class RoundOutcome:
    """What a round returned, as the policy sees it: each answering device's reply (TrainReply:
    partition id, losses, seconds, peak memory), why the others failed (oom, crash, timeout,
    dropped), the adapter bytes each device was sent (what it holds of the global adapter), the
    server's perplexity of the global model after the round (None without evaluation), and
    `without(pid)`: the round's aggregate with that device's update left out (`without(None)`: with
    every update; before central DP noise and the server's distillation step), or None where the
    server cannot take one update out (SecAgg+ shows it only the sum; central DP keeps a device's
    influence out of anything the devices are told)."""

    replies: list
    failures: dict[int, str]
    holdings: dict[int, int] = field(default_factory=dict)
    perplexity: float | None = None
    without: Callable[[int | None], Arrays] | None = None


class Policy:
    """The fixed fleet plan; subclasses override the hooks they change."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig
    summary: ClassVar[str] = ""                 # one line for `recover --help`
    needs_fleet: ClassVar[bool] = False         # plans from the fleet file's memory budgets
    lean_devices: ClassVar[bool] = False        # devices build their model with the lean loader
    secagg: ClassVar[bool] = True               # combines with --secagg
    fleet_deployable: ClassVar[bool] = True     # runs on a real fleet, not only in simulation
    fixed_rounds: ClassVar[bool] = False        # --resume must keep --rounds (steps are spread over them)
    learns_memory: ClassVar[bool] = False       # plans devices that declare no memory_mb itself
    fleet_vocabulary: ClassVar[bool] = True     # combines with --vocab (the devices' model stays one checkpoint)
    # settings of the other sections (by flag name) this policy is meant to run with, taken where the
    # user gave none (RecoverConfig.of, hence `llmprune recover`): a policy's defaults combine
    defaults: ClassVar[dict[str, Any]] = {}
    # the shape of state_dict()'s output (see schema_problem); None: the policy saves no state
    state_schema: ClassVar[Any] = None

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.config = cfg, cfg.policy
        self.run: Any = None

    # -- before Flower starts (and again on the server) -------------------------------------------
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse, in one line, settings of the rest of the config this policy cannot work with."""
        from llmprune.errors import LLMPruneError

        if cls.needs_fleet and not cfg.fleet.file:
            raise LLMPruneError(f"--policy {cls.name} needs --fleet",
                                "pass a fleet file of devices with memory_mb (see docs/recover.md)")
        if cfg.privacy.secagg and not cls.secagg:
            raise LLMPruneError(f"--policy {cls.name} cannot be combined with --secagg",
                                f"run {cls.name} without --secagg, then recover its result with it")

    def check_model(self, model: nn.Module, model_dir: str) -> None:
        """Refuse what the checkpoint does not allow (its module tree may be on the meta device)."""

    def plan_devices(self, model: nn.Module, count: int) -> list[Assignment]:
        """Each of at least `count` clients' assignment before round 1 (client i gets device i)."""
        return plan_rank_depth(model, self.cfg, count)

    def adapter_modules(self, shapes: dict[str, tuple[int, int]], assignment: Assignment) -> list[str]:
        """The global adapter's modules this device may ever train (their union is the adapter)."""
        return top_layer_modules(shapes, assignment.depth)

    def adapter_ranks(self, assignments: list[Assignment]) -> set[int]:
        """The ranks the global adapter must serve."""
        return {a.rank for a in assignments}

    def resume_model_dir(self, model_dir: str, state_dir: Any) -> str:
        """The checkpoint whose shapes the saved rounds' adapter has."""
        return model_dir

    # -- on the server, once -------------------------------------------------------------------------
    def open(self, run: Any) -> None:
        """The server's model is loaded, the fleet not yet planned: a policy may replace the model."""
        self.run = run

    def start(self, run: Any) -> None:
        """The fleet is planned; before round 1 (and before a resumed run's saved state is loaded)."""
        self.run = run

    def transport(self, run: Any, plain: Any, timeout: float | None) -> Any:
        """What carries the rounds (transport.py's `exchange` contract): the plain transport, unless
        the policy runs its own protocol (split training). Not asked under --secagg."""
        return plain

    # -- every round -------------------------------------------------------------------------------
    def begin_round(self, run: Any, server_round: int) -> dict:
        """Before the round is sent; returns entries for the round's metrics row."""
        return {}

    def assign(self, server_round: int, nodes: list[int]) -> dict[int, Assignment]:
        """What each sampled node trains this round."""
        return {node: self.run.plan.clients[node][1] for node in nodes}

    def observe(self, server_round: int, outcome: RoundOutcome) -> None:
        """The round's outcome, after aggregation and the server's evaluation (before the round is saved)."""

    def eval_view(self, server_round: int, arrays: Arrays) -> Arrays:
        """The adapter the server evaluates after the round."""
        return arrays

    def client_report(self, partition_id: int) -> dict:
        """Entries for this device's row of the round in metrics.json."""
        return {}

    # -- the end, and resume -----------------------------------------------------------------------
    def report(self) -> dict:
        """Entries of metrics.json (profiles, steps)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved round's state ({} for a fresh run)."""

    def state_problem(self, state: dict, model: nn.Module) -> str | None:
        """What makes a saved state impossible to continue on `model` (its module tree may be on the
        meta device), or None; checked on --resume before anything starts (a policy with rules
        beyond the shape extends it)."""
        if self.state_schema is None:
            return None
        if not state:
            return "is missing"
        return schema_problem(state, self.state_schema)


def schema_problem(value: Any, schema: Any, path: str = "") -> str | None:
    """Where `value` (parsed JSON) departs from `schema`, or None. A schema is int, float (finite)
    or str; [item] a list of items; {str: item} an object of any keys; a dict of fixed keys."""
    where = f"'{path}'" if path else "it"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where} is not an object"
        fields = [(k, schema[str]) for k in value] if set(schema) == {str} else list(schema.items())
        for key, item in fields:
            if key not in value:
                return f"{where} has no '{key}'"
            problem = schema_problem(value[key], item, f"{path}.{key}" if path else key)
            if problem:
                return problem
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} is not a list"
        return next((p for i, v in enumerate(value) if (p := schema_problem(v, schema[0], f"{path}[{i}]"))), None)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {int: numeric and isinstance(value, int), float: numeric and math.isfinite(value),
          str: isinstance(value, str)}[schema]
    return None if ok else f"{where} is {json_kind(value)}, not {'a finite number' if schema is float else schema.__name__}"


def json_kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
