"""RecoverConfig: every knob of federated LoRA recovery, validated once, and its mapping to the
flat `[tool.flwr.app.config]` keys the Flower apps read (the same keys in simulation and on a
real fleet)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from llmprune.errors import LLMPruneError

AGGREGATIONS = ("fedavg", "hetlora", "flexlora")
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RecoverConfig:
    """Federated LoRA recovery of a pruned checkpoint (see docs/recover.md)."""

    clients: int = 4                  # simulated SuperNodes (on a fleet: the nodes to wait for)
    rounds: int = 3
    partition: str = "iid"            # iid | dirichlet:ALPHA | domain
    aggregation: str = "fedavg"       # fedavg | hetlora | flexlora
    fraction: float = 1.0             # share of clients sampled per round
    min_clients: int | None = None    # replies needed to apply a round (default: half the sampled, at least 1)
    local_steps: int = 10             # optimizer steps per client per round (scaled by device speed)
    lora_rank: int = 8                # rank without a fleet file; the largest rank with one
    lora_alpha: float | None = None   # LoRA scale = alpha / lora_rank for every client (default alpha = 2 x rank)
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 256
    max_windows: int | None = None    # per data source, before partitioning
    eval_data: str | None = None      # default: windows held out of --data
    eval_windows: int = 4
    fleet: str | None = None          # JSON/TOML file of devices with memory budgets
    round_timeout: float = 600.0      # straggler timeout (seconds) for one round's replies
    node_timeout: float = 120.0       # how long the server waits for the SuperNodes to connect
    seed: int = 0
    secagg: bool = False
    dp_clip: float | None = None
    dp_noise: float = 0.0
    inject_faults: str = ""           # testing: "crash:PID,delay:PID:SECONDS,exit:PID"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.validate()

    @property
    def scale(self) -> float:
        """LoRA's alpha / r, the same for every client whatever its rank, so adapters of
        different ranks describe weight changes on one scale and can be averaged."""
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
        return alpha / self.lora_rank

    def partition_kind(self) -> tuple[str, float | None]:
        kind, _, arg = self.partition.partition(":")
        if kind == "dirichlet":
            try:
                return kind, float(arg)
            except ValueError:
                pass
        return kind, None

    def min_replies(self, sampled: int) -> int:
        if self.min_clients is not None:
            return min(self.min_clients, sampled)
        return max(1, math.ceil(sampled / 2))

    def validate(self) -> None:
        def bad(what: str, fix: str) -> LLMPruneError:
            return LLMPruneError(what, fix)

        if self.clients < 1:
            raise bad(f"--clients must be at least 1 (got {self.clients})", "pass --clients 2 or more")
        if self.rounds < 1:
            raise bad(f"--rounds must be at least 1 (got {self.rounds})", "pass a positive --rounds")
        if not 0.0 < self.fraction <= 1.0:
            raise bad(f"--fraction must be in (0, 1] (got {self.fraction})", "pass e.g. --fraction 0.5")
        if self.local_steps < 1:
            raise bad(f"--local-steps must be at least 1 (got {self.local_steps})", "pass a positive --local-steps")
        if self.lora_rank < 1:
            raise bad(f"--lora-rank must be at least 1 (got {self.lora_rank})", "pass e.g. --lora-rank 8")
        if self.aggregation not in AGGREGATIONS:
            raise bad(f"unknown --aggregation '{self.aggregation}'", f"use one of {', '.join(AGGREGATIONS)}")
        kind, alpha = self.partition_kind()
        if kind not in ("iid", "dirichlet", "domain") or (kind == "dirichlet" and (alpha is None or alpha <= 0)) \
                or (kind != "dirichlet" and self.partition != kind):
            raise bad(f"unknown --partition '{self.partition}'", "use iid, domain or dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.5)")
        if self.batch_size < 1 or self.seq_len < 8:
            raise bad("--batch-size must be at least 1 and --seq-len at least 8", "pass e.g. --batch-size 4 --seq-len 256")
        if self.lr <= 0:
            raise bad(f"--lr must be positive (got {self.lr})", "pass e.g. --lr 2e-4")
        if self.min_clients is not None and self.min_clients < 1:
            raise bad(f"--min-clients must be at least 1 (got {self.min_clients})", "pass a positive --min-clients")
        if self.round_timeout <= 0:
            raise bad(f"--round-timeout must be positive (got {self.round_timeout})", "pass seconds, e.g. --round-timeout 600")
        if self.dp_clip is not None and self.dp_clip <= 0:
            raise bad(f"--dp-clip must be positive (got {self.dp_clip})", "pass a clipping norm such as --dp-clip 1.0")
        if self.dp_noise < 0 or (self.dp_noise > 0 and self.dp_clip is None):
            raise bad("--dp-noise needs --dp-clip and must be non-negative", "pass --dp-clip C --dp-noise Z")
        if self.secagg and self.aggregation == "flexlora":
            raise bad("--secagg cannot be used with --aggregation flexlora",
                      "secure aggregation only sums uploads; flexlora needs each client's B·A product: use fedavg or hetlora")
        if self.secagg and self.dp_clip is not None:
            raise bad("--secagg and --dp-clip together are not supported", "choose one of them")

    # -- the Flower run config: flat, dash-separated keys of TOML scalar types -------------------
    def to_run_config(self) -> dict:
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if value is None:
                value = ""
            elif isinstance(value, tuple):
                value = ",".join(value)
            out[key] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_run_config(cls, run_config: dict) -> RecoverConfig:
        kwargs, extra = {}, {}
        known = {f.name: f for f in fields(cls)}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known or name == "extra":
                extra[key] = value
                continue
            if value == "" and name in _OPTIONAL:
                value = None
            elif name == "target_modules" and isinstance(value, str):
                value = tuple(v for v in value.split(",") if v)
            elif name in _INTS and value is not None:
                value = int(value)
            elif name in _FLOATS and value is not None:
                value = float(value)
            kwargs[name] = value
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        return asdict(self)


_OPTIONAL = {"min_clients", "lora_alpha", "max_windows", "eval_data", "fleet", "dp_clip"}
_INTS = {"clients", "rounds", "min_clients", "local_steps", "lora_rank", "batch_size", "seq_len", "max_windows",
         "eval_windows", "seed"}
_FLOATS = {"fraction", "lora_alpha", "lora_dropout", "lr", "round_timeout", "node_timeout", "dp_clip", "dp_noise"}
