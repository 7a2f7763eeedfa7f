"""RecoverConfig: every knob of federated LoRA recovery, declared once (default + help, from which
the CLI flags, the Flower app's run config and its pyproject.toml come), validated once; and
RunSettings: where this run reads and writes (model, out, state-dir, ...), which travel in the
same flat `[tool.flwr.app.config]` (the same keys in simulation and on a real fleet)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

from llmprune.errors import LLMPruneError
from llmprune.options import fraction, non_negative_float, non_negative_int, option, positive_float, positive_int

from .aggregations import AGGREGATIONS, get_aggregation
from .aggregations.base import names_text, secagg_names

FLEET_ROUND_TIMEOUT = 600.0   # seconds: a real fleet's default straggler timeout (simulation: none)


TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
__all__ = ["AGGREGATIONS", "TARGET_MODULES", "RecoverConfig", "RunSettings", "parse_run_config"]


@dataclass
class RecoverConfig:
    """Federated LoRA recovery of a pruned checkpoint (see docs/recover.md)."""

    clients: int = option(4, parse=positive_int, help="simulated devices (on a fleet: the SuperNodes the server waits "
                                                     "for and plans devices for)")
    rounds: int = option(3, parse=positive_int, help="federated rounds")
    partition: str = option("iid", help="how the data is split across clients: iid | dirichlet:ALPHA | domain")
    aggregation: str = option("fedavg", choices=lambda: tuple(AGGREGATIONS),
                              help="server aggregation: fedavg (equal ranks), hetlora or flexlora (mixed ranks)")
    fraction: float = option(1.0, parse=fraction, help="share of clients sampled per round")
    min_clients: int | None = option(None, parse=positive_int, default_text="half the sampled, at least 1",
                                     help="replies needed to apply a round")
    local_steps: int = option(10, parse=positive_int, help="optimizer steps per client per round (scaled by device speed)")
    lora_rank: int = option(8, parse=positive_int, help="LoRA rank; with a fleet file the largest rank")
    lora_alpha: float | None = option(None, parse=positive_float, default_text="2 x lora-rank",
                                      help="LoRA alpha: scale = alpha / lora-rank for every client")
    lora_dropout: float = option(0.0, cli=False, help="LoRA dropout during client training")
    target_modules: tuple[str, ...] = option(default_factory=lambda: TARGET_MODULES, cli=False,
                                             help="linear layers that get LoRA (comma-separated)")
    lr: float = option(2e-4, parse=positive_float, help="client learning rate")
    batch_size: int = option(4, parse=positive_int, help="windows per optimizer step")
    seq_len: int = option(256, parse=positive_int, help="tokens per window")
    max_windows: int | None = option(None, parse=positive_int, default_text="all",
                                     help="at most this many windows per data source, before partitioning")
    eval_data: str | None = option(None, default_text="windows held out of the data; none on a fleet",
                                   help="server-side evaluation text file")
    eval_windows: int = option(4, parse=positive_int, help="evaluation windows")
    fleet: str | None = option(None, default_text="none: every client trains lora-rank on all layers",
                               help="TOML/JSON fleet file of devices with memory_mb (and speed): rank and depth per device")
    submodels: bool = option(False, help="FedPruner: every device trains a submodel of the layers whose training fits "
                                         "its memory_mb, re-drawn each round (needs --fleet)")
    submodel_granularity: str = option("layer", choices=("layer", "sublayer"),
                                       help="what a submodel drops: whole layers, or attention and MLP blocks apart")
    client_dtype: str = option("float32", choices=("float32", "bfloat16"),
                               help="frozen base weights on the devices (bfloat16 halves them; LoRA stays float32)")
    client_embedding: str = option("same", choices=("same", "int8"),
                                   help="the vocabulary table on the devices: as the layers, or int8 rows with a scale each")
    skip_unfit: bool = option(False, help="leave out devices that nothing fits (listed in metrics.json 'refused') "
                                          "instead of stopping")
    policy: str = option("plan", choices=("plan", "bandit"),
                         help="who trains what each round: the fleet plan, or a per-device UCB bandit over "
                              "(submodel size, LoRA rank) arms learning from each round's loss gain per second (FedSpine)")
    arm_sizes: str = option("0.25,0.5,0.75,1", help="bandit arms: submodel sizes as shares of the model's units")
    arm_ranks: str = option("", default_text="lora-rank/4, lora-rank/2, lora-rank",
                            help="bandit arms: LoRA ranks (each at most --lora-rank)")
    bandit_exploration: float = option(0.5, parse=non_negative_float,
                                       help="bandit: weight of the UCB exploration bonus")
    straggler_weight: float = option(0.5, parse=non_negative_float,
                                     help="bandit: reward penalty per unit of round time beyond the round's median")
    target_ratio: float | None = option(None, parse=positive_float, default_text="no further pruning",
                                        help="prune-tune: the decoder ratio (of the dense model) the run ends at")
    prune_every: int | None = option(None, parse=positive_int, default_text="once, before the first round",
                                     help="prune-tune: rounds between pruning steps toward --target-ratio")
    prune_data: str | None = option(None, default_text="--eval-data",
                                    help="prune-tune: the server's calibration text for each pruning step")
    schedule: str = option("", default_text="none: every round trains the whole model",
                           help="staged growth (DevFT): devft:S1,S2,... representative layers per stage, e.g. devft:4,8,all")
    devft_beta: float = option(0.2, parse=non_negative_float,
                               help="DevFT: damping of the members' differences in a fused layer")
    emulate_speed: bool = option(False, help="simulation: a device with speed s < 1 sleeps (1/s - 1) x each step's time, "
                                             "and one with oom_mb fails past it (its true, undeclared limit)")
    round_timeout: float | None = option(None, parse=positive_float,
                                         default_text=f"none in simulation (every sampled client is waited for); "
                                                      f"{FLEET_ROUND_TIMEOUT:.0f} on a fleet",
                                         help="straggler timeout per round, seconds: replies later than this are left out")
    node_timeout: float = option(120.0, cli=False, help="seconds the server waits for the SuperNodes to connect")
    seed: int = option(0, parse=non_negative_int, help="seed for sampling, partitions, LoRA init and training (0 or more)")
    secagg: bool = option(False, help="Flower SecAgg+: the server only sees the sum of the uploads")
    dp_clip: float | None = option(None, parse=positive_float, default_text="no differential privacy",
                                   help="central DP: clip each client's update to this L2 norm")
    dp_noise: float = option(0.0, parse=non_negative_float, help="central DP: noise multiplier z")
    inject_faults: str = option("", cli=False, help="testing only: crash:PID, delay:PID:SECONDS, exit:PID (@ROUND)")

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

    def round_deadline(self, simulation: bool) -> float | None:
        """Seconds a round waits for replies: --round-timeout when given; else none in simulation
        (a busy machine makes clients slow, not lost: their work is waited for) and
        FLEET_ROUND_TIMEOUT on a fleet (a device that vanished must not stall the run)."""
        if self.round_timeout is not None:
            return self.round_timeout
        return None if simulation else FLEET_ROUND_TIMEOUT

    def validate(self) -> None:
        bad = LLMPruneError
        for name, flag, fix in (("clients", "--clients", "pass --clients 2 or more"),
                                ("rounds", "--rounds", "pass a positive --rounds"),
                                ("local_steps", "--local-steps", "pass a positive --local-steps"),
                                ("lora_rank", "--lora-rank", "pass e.g. --lora-rank 8")):
            if getattr(self, name) < 1:
                raise bad(f"{flag} must be at least 1 (got {getattr(self, name)})", fix)
        if not 0.0 < self.fraction <= 1.0:
            raise bad(f"--fraction must be in (0, 1] (got {self.fraction})", "pass e.g. --fraction 0.5")
        if self.aggregation not in AGGREGATIONS:
            raise bad(f"unknown --aggregation '{self.aggregation}'", f"use one of {', '.join(AGGREGATIONS)}")
        self._validate_partition()
        if self.batch_size < 1 or self.seq_len < 8:
            raise bad("--batch-size must be at least 1 and --seq-len at least 8", "pass e.g. --batch-size 4 --seq-len 256")
        if self.lr <= 0:
            raise bad(f"--lr must be positive (got {self.lr})", "pass e.g. --lr 2e-4")
        if self.min_clients is not None and self.min_clients < 1:
            raise bad(f"--min-clients must be at least 1 (got {self.min_clients})", "pass a positive --min-clients")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise bad(f"--seed must be a whole number, 0 or more (got {self.seed})", "pass e.g. --seed 0")
        if self.round_timeout is not None and self.round_timeout <= 0:
            raise bad(f"--round-timeout must be positive (got {self.round_timeout})", "pass seconds, e.g. --round-timeout 600")
        self._validate_privacy()
        if self.submodels and not self.fleet:
            raise bad("--submodels needs --fleet", "pass a fleet file of devices with memory_mb (see docs/recover.md)")
        if self.submodel_granularity not in ("layer", "sublayer"):
            raise bad(f"unknown --submodel-granularity '{self.submodel_granularity}'", "use layer or sublayer")
        if self.submodel_granularity == "sublayer" and not self.submodels:
            raise bad("--submodel-granularity sublayer needs --submodels", "add --submodels")
        for name, allowed in (("client_dtype", ("float32", "bfloat16")), ("client_embedding", ("same", "int8"))):
            if getattr(self, name) not in allowed:
                raise bad(f"unknown --{name.replace('_', '-')} '{getattr(self, name)}'", f"use {' or '.join(allowed)}")
        self._validate_adaptive()

    def _validate_adaptive(self) -> None:
        """--policy bandit, prune-tune and --schedule: what each needs and what they cannot share."""
        bad = LLMPruneError
        if self.policy not in ("plan", "bandit"):
            raise bad(f"unknown --policy '{self.policy}'", "use plan or bandit")
        if self.policy == "bandit":
            if not self.submodels:
                raise bad("--policy bandit needs --submodels (its arms are submodel sizes)", "add --submodels --fleet FILE")
            from .bandit import arm_grid

            arm_grid(self.bandit_sizes, self.bandit_ranks)
            if len(self.bandit_ranks) > 1 and not get_aggregation(self.aggregation).mixed_ranks:
                raise bad(f"--policy bandit with ranks {self.bandit_ranks} needs an aggregation of mixed ranks",
                          "pass --aggregation hetlora (or flexlora), or a single --arm-ranks")
            if max(self.bandit_ranks) > self.lora_rank:
                raise bad(f"--arm-ranks {self.arm_ranks} has a rank above --lora-rank {self.lora_rank}",
                          f"use ranks of at most {self.lora_rank}, or raise --lora-rank")
        if self.prune_every is not None and self.target_ratio is None:
            raise bad("--prune-every needs --target-ratio", "pass --target-ratio R (e.g. 0.2)")
        if self.target_ratio is not None and not 0.0 < self.target_ratio < 1.0:
            raise bad(f"--target-ratio must be in (0, 1) (got {self.target_ratio})", "pass e.g. --target-ratio 0.2")
        if self.target_ratio is not None and (self.submodels or self.schedule or self.secagg):
            raise bad("--target-ratio (prune-tune) cannot be combined with --submodels, --schedule or --secagg",
                      "run prune-tune with the fleet plan, then recover the result with those")
        if self.schedule:
            from .devft import check_schedule_text

            check_schedule_text(self.schedule)
            if self.submodels:
                raise bad("--schedule and --submodels cannot be combined", "choose staged growth or submodels")

    @property
    def bandit_sizes(self) -> list[float]:
        from .bandit import parse_numbers

        return parse_numbers(self.arm_sizes, float, "--arm-sizes")

    @property
    def bandit_ranks(self) -> list[int]:
        from .bandit import parse_numbers

        if not self.arm_ranks.strip():
            return sorted({max(1, self.lora_rank // 4), max(1, self.lora_rank // 2), self.lora_rank})
        return parse_numbers(self.arm_ranks, int, "--arm-ranks")

    @property
    def lean_clients(self) -> bool:
        """Devices load their weights with the lean loader (client_model.py): only what they
        hold, in client_dtype, the vocabulary table as asked, the loss a vocabulary slice at a time."""
        return self.submodels or bool(self.schedule) or self.client_dtype != "float32" or self.client_embedding != "same"

    def _validate_partition(self) -> None:
        kind, alpha = self.partition_kind()
        if kind not in ("iid", "dirichlet", "domain") or (kind == "dirichlet" and (alpha is None or alpha <= 0)) \
                or (kind != "dirichlet" and self.partition != kind):
            raise LLMPruneError(f"unknown --partition '{self.partition}'",
                                "use iid, domain or dirichlet:ALPHA with ALPHA > 0 (e.g. dirichlet:0.5)")

    def _validate_privacy(self) -> None:
        if self.dp_clip is not None and self.dp_clip <= 0:
            raise LLMPruneError(f"--dp-clip must be positive (got {self.dp_clip})", "pass a clipping norm such as --dp-clip 1.0")
        if self.dp_noise < 0 or (self.dp_noise > 0 and self.dp_clip is None):
            raise LLMPruneError("--dp-noise needs --dp-clip and must be non-negative", "pass --dp-clip C --dp-noise Z")
        if self.secagg and not get_aggregation(self.aggregation).secagg:
            raise LLMPruneError(f"--secagg cannot be used with --aggregation {self.aggregation}",
                                f"secure aggregation only sums uploads, which cannot give {self.aggregation}'s average: "
                                f"use {names_text(secagg_names())}")
        if self.secagg and self.dp_clip is not None:
            raise LLMPruneError("--secagg and --dp-clip together are not supported", "choose one of them")

    # -- the Flower run config: flat, dash-separated keys of TOML scalar types -------------------
    def to_run_config(self) -> dict:
        return _to_run_config(self)

    @classmethod
    def from_run_config(cls, run_config: dict) -> RecoverConfig:
        """The config of a run config; RunSettings' keys are skipped, any other key is refused."""
        return parse_run_config(run_config)[0]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunSettings:
    """Where a run reads and writes: run-config keys beside RecoverConfig's (the simulation's
    `llmprune recover` fills them; on a fleet, `flwr run --run-config`)."""

    model: str = option("", cli=False, help="checkpoint folder on the server (devices use it too unless node config "
                                            "model-path)")
    out: str = option("", cli=False, default_text="./recovered",
                      help="folder the ServerApp writes: merged model + metrics.json")
    state_dir: str = option("", cli=False, default_text="OUT.rounds", help="per-round checkpoints")
    resume: bool = option(False, cli=False, help="continue after the last round saved in state-dir")
    overwrite: bool = option(False, cli=False, help="replace an existing out folder")
    data_cache: str = option("", cli=False, default_text="none",
                             help="simulation only (llmprune recover writes it); fleet devices use node config data-path")

    @property
    def out_dir(self):
        from pathlib import Path

        return Path(self.out or "recovered")

    @property
    def state_path(self):
        from pathlib import Path

        return Path(self.state_dir or f"{self.out_dir}.rounds")

    def to_run_config(self) -> dict:
        return _to_run_config(self)


def _to_run_config(obj) -> dict:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            value = ""
        elif isinstance(value, tuple):
            value = ",".join(value)
        out[f.name.replace("_", "-")] = value
    return out


def parse_run_config(run_config: dict) -> tuple[RecoverConfig, RunSettings]:
    """The typed config and settings of a Flower run config, parsed once; a bad value or an
    unknown key is a one-line error naming the key."""
    parsed: dict[type, dict] = {RecoverConfig: {}, RunSettings: {}}
    known = {f.name: (cls, f) for cls in parsed for f in fields(cls)}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name not in known:
            raise LLMPruneError(f"unknown run-config key '{key}'",
                                "see [tool.flwr.app.config] in llmprune/fedrecover/app/pyproject.toml for the keys")
        cls, field_ = known[name]
        parsed[cls][name] = _parse_value(key, value, _TYPES[name])
    return RecoverConfig(**parsed[RecoverConfig]), RunSettings(**parsed[RunSettings])


def _parse_value(key: str, value, kind: str):
    if value == "" and kind.endswith("?"):
        return None
    kind = kind.rstrip("?")
    try:
        if kind == "bool":
            if isinstance(value, bool) or str(value).lower() in ("true", "1", "false", "0", ""):
                return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
            raise ValueError
        if kind == "tuple":
            return tuple(v for v in value.split(",") if v) if isinstance(value, str) else tuple(value)
        if kind in ("int", "float") and isinstance(value, bool):
            raise ValueError
        if kind == "int":
            return int(value) if not isinstance(value, float) or value.is_integer() else int("x")
        return float(value) if kind == "float" else str(value)
    except (TypeError, ValueError):
        raise LLMPruneError(f"run-config key '{key}' has a bad value {value!r} (expected {kind})",
                            f"pass {key}=<{kind}> in the run config") from None


def _kinds() -> dict[str, str]:
    """Each field's run-config value kind from its annotation: int, float, str, bool, tuple; '?'
    when '' stands for None."""
    import typing

    out = {}
    for cls in (RecoverConfig, RunSettings):
        for name, hint in typing.get_type_hints(cls).items():
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = type(None) in typing.get_args(hint)
            base = typing.get_origin(hint) if typing.get_origin(hint) is tuple else (args[0] if optional else hint)
            out[name] = base.__name__ + ("?" if optional else "")
    return out


_TYPES = _kinds()
