"""RecoverConfig: every knob of federated LoRA recovery, declared once with its default, help,
parser and resume rule, in small sections (data, training, fleet, privacy) plus the chosen
policy's own config (policies/). From these fields come the CLI flags (grouped by section), the
Flower run config (dotted keys: `training.rounds`, `policy.bandit.arm-sizes`), the app's
pyproject.toml, and what `--resume` must match. RunSettings: where a run reads and writes."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from llmprune.errors import LLMPruneError
from llmprune.options import (
    coerce_fields,
    dest_of,
    flag_of,
    fraction,
    int_at_least,
    non_negative_float,
    non_negative_int,
    one_of,
    option,
    positive_float,
    positive_int,
    vocab_size,
)

from .aggregations import AGGREGATIONS, get_aggregation
from .aggregations.base import names_text, secagg_names
from .faults import Fault, parse_faults
from .partition import Partition
from .policies import POLICIES, PolicyConfig, get_policy, policy_of

FLEET_ROUND_TIMEOUT = 600.0   # seconds: a real fleet's default straggler timeout (simulation: none)
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
__all__ = ["AGGREGATIONS", "SECTIONS", "TARGET_MODULES", "DataConfig", "DistillConfig", "FleetConfig", "PrivacyConfig",
           "RecoverConfig", "RunSettings", "TrainingConfig", "VocabConfig", "parse_run_config"]


def _aggregation(text: str) -> str:
    if text not in AGGREGATIONS:
        import argparse

        raise argparse.ArgumentTypeError(f"unknown aggregation '{text}' (use one of {', '.join(AGGREGATIONS)})")
    return str(text)


@dataclass
class DataConfig:
    """Client data and the server's evaluation text."""

    partition: Partition = option(Partition(), parse=Partition.parse, metavar="iid|domain|dirichlet:ALPHA",
                                  help="how the data is split across clients: iid | domain | dirichlet:ALPHA")
    seq_len: int = option(256, parse=int_at_least(8), help="tokens per window")
    max_windows: int | None = option(None, parse=positive_int, default_text="all",
                                     help="at most this many windows per data source, before partitioning")
    eval_data: str | None = option(None, resume="free", default_text="windows held out of the data; none on a fleet",
                                   help="server-side evaluation text: a file, or a folder with a file per domain "
                                        "(windows taken from each file in turn)")
    eval_windows: int = option(4, parse=positive_int, resume="free", help="evaluation windows")

    def __post_init__(self) -> None:
        coerce_fields(self)


@dataclass
class TrainingConfig:
    """What each round trains: LoRA shape, optimiser, aggregation."""

    rounds: int = option(3, parse=positive_int, resume="grow", help="federated rounds")
    local_steps: int = option(10, parse=positive_int, help="optimizer steps per client per round (scaled by device speed)")
    lora_rank: int = option(8, parse=positive_int, help="LoRA rank; with a fleet file the largest rank")
    lora_alpha: float | None = option(None, parse=positive_float, default_text="2 x lora-rank",
                                      help="LoRA alpha: scale = alpha / lora-rank for every client")
    lora_dropout: float = option(0.0, parse=non_negative_float, cli=False, resume="free",
                                 help="LoRA dropout during client training")
    target_modules: tuple[str, ...] = option(default_factory=lambda: TARGET_MODULES, cli=False,
                                             help="linear layers that get LoRA (comma-separated)")
    lr: float = option(2e-4, parse=positive_float, help="client learning rate")
    batch_size: int = option(4, parse=positive_int, help="windows per optimizer step")
    train_rows: bool = option(False, help="also train the embedding rows (and tied LM-head rows) of the tokens each "
                              "device's windows hold: for a checkpoint with a trimmed vocabulary (compress --vocab), "
                              "whose new splits LoRA cannot teach; a device uploads only the rows it touched, each row "
                              "averaged over the devices that touched it")
    rows_lr: float | None = option(None, parse=positive_float, default_text="lr / 30",
                                   help="learning rate of the embedding rows with --train-rows (Adam moves every touched "
                                        "row by about this much per step, and a row's values are ~0.03 on Gemma-3)")
    aggregation: str = option("fedavg", parse=_aggregation, choices=lambda: tuple(AGGREGATIONS),
                              help="server aggregation: fedavg (equal ranks), hetlora or flexlora (mixed ranks)")

    def __post_init__(self) -> None:
        self.target_modules = tuple(str(m) for m in (self.target_modules.split(",") if isinstance(
            self.target_modules, str) else self.target_modules) if str(m).strip())
        coerce_fields(self)

    @property
    def scale(self) -> float:
        """LoRA's alpha / r, the same for every client whatever its rank, so adapters of
        different ranks describe weight changes on one scale and can be averaged."""
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
        return alpha / self.lora_rank


@dataclass
class FleetConfig:
    """Who takes part: the clients, their devices, sampling, waiting and the device-side storage."""

    clients: int = option(4, parse=positive_int, help="simulated devices (on a fleet: the SuperNodes the server waits "
                                                      "for and plans devices for)")
    file: str | None = option(None, flag="--fleet", default_text="none: every client trains lora-rank on all layers",
                              help="TOML/JSON fleet file of devices with memory_mb (and speed): what each device trains")
    fraction: float = option(1.0, parse=fraction, help="share of clients sampled per round")
    min_clients: int | None = option(None, parse=positive_int, resume="free", default_text="half the sampled, at least 1",
                                     help="replies needed to apply a round")
    skip_unfit: bool = option(False, help="leave out devices that nothing fits (listed in metrics.json 'refused') "
                                          "instead of stopping")
    client_dtype: Literal["float32", "bfloat16"] = option(
        "float32", parse=one_of("float32", "bfloat16"), choices=("float32", "bfloat16"),
        help="frozen base weights on the devices (bfloat16 halves them; LoRA stays float32)")
    client_embedding: Literal["same", "int8"] = option(
        "same", parse=one_of("same", "int8"), choices=("same", "int8"),
        help="the vocabulary table on the devices: as the layers, or int8 rows with a scale each")
    emulate_speed: bool = option(False, help="simulation: a device with speed s < 1 sleeps (1/s - 1) x each step's time, "
                                             "and one with oom_mb fails past it (its true, undeclared limit)")
    round_timeout: float | None = option(None, parse=positive_float, resume="free",
                                         default_text=f"none in simulation (every sampled client is waited for); "
                                                      f"{FLEET_ROUND_TIMEOUT:.0f} on a fleet",
                                         help="straggler timeout per round, seconds: replies later than this are left out")
    node_timeout: float = option(120.0, parse=positive_float, cli=False, resume="free",
                                 help="seconds the server waits for the SuperNodes to connect")

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.emulate_speed and not self.file:
            raise LLMPruneError("--emulate-speed needs --fleet (it emulates the speed and oom_mb of its devices)",
                                "pass --fleet FILE, or leave --emulate-speed out")

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


@dataclass
class PrivacyConfig:
    """Secure aggregation and central differential privacy."""

    secagg: bool = option(False, resume="free", help="Flower SecAgg+: the server only sees the sum of the uploads")
    dp_clip: float | None = option(None, parse=positive_float, default_text="no differential privacy",
                                   help="central DP: clip each client's update to this L2 norm")
    dp_noise: float = option(0.0, parse=non_negative_float, help="central DP: noise multiplier z")

    def __post_init__(self) -> None:
        coerce_fields(self)


def _weight(text) -> float:
    import argparse

    value = non_negative_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return value


SERVER_ONLY = ("data", "windows", "steps", "lr")     # DistillConfig fields of the server's step


@dataclass
class DistillConfig:
    """Distillation from a teacher (the dense model): on the server after each aggregation, and on
    the devices whose memory admits it."""

    teacher: str | None = option(None, default_text="none: plain next-token LoRA",
                                 help="model to distil from: a folder, .gguf, hub id or packaged name; 'source' is the "
                                      "model the checkpoint was pruned from")
    where: Literal["server", "device", "both"] = option(
        "server", flag="--distill", parse=one_of("server", "device", "both"), choices=("server", "device", "both"),
        help="server: after each aggregation the server distils the merged adapter on its own text (costs devices "
             "nothing); device: devices whose memory admits the teacher mix KL into their loss, the others train "
             "plain LoRA; both")
    alpha: float = option(0.5, flag="--distill-alpha", parse=_weight,
                          help="weight of the KL to the teacher in the loss (the rest is next-token loss); 0.5 "
                               "recovered most in domain in bench/distill_probe.py, 0.9 kept other text best")
    temperature: float = option(1.0, flag="--distill-temperature", parse=positive_float,
                                help="softmax temperature of teacher and student in the KL")
    data: str | None = option(None, flag="--distill-data", default_text="the evaluation text",
                              help="the server's distillation text file (--distill server/both)")
    windows: int = option(32, flag="--distill-windows", parse=positive_int, help="windows of the distillation text")
    steps: int = option(10, flag="--distill-steps", parse=positive_int,
                        help="the server's distillation steps after each aggregation")
    lr: float = option(2e-4, flag="--distill-lr", parse=positive_float, help="the server's distillation learning rate")

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.teacher is None:
            changed = [flag_of(f) for f in fields(self) if f.name != "teacher" and getattr(self, f.name) != _field_default(f)]
            if changed:
                raise LLMPruneError(f"{changed[0]} needs --teacher", "pass --teacher MODEL (e.g. --teacher source), "
                                    f"or leave {changed[0]} out")
        elif self.where == "device":       # the server's own step is off: its settings would be ignored
            server = [flag_of(f) for f in fields(self) if f.name in SERVER_ONLY and getattr(self, f.name) != _field_default(f)]
            if server:
                raise LLMPruneError(f"{server[0]} sets the server's distillation, but --distill device has none",
                                    f"pass --distill both, or leave {server[0]} out")

    @property
    def on_server(self) -> bool:
        return self.teacher is not None and self.where in ("server", "both")

    @property
    def on_devices(self) -> bool:
        return self.teacher is not None and self.where in ("device", "both")


@dataclass
class VocabConfig:
    """A vocabulary the fleet chooses: devices count token ids on their own data, the server trims
    the model to the ids the fleet uses most (compress's vocabulary step), recovery runs on it."""

    size: int | float | None = option(None, flag="--vocab", parse=vocab_size, metavar="K|FRACTION",
                                      default_text="the checkpoint's vocabulary",
                                      help="before round 1, trim the vocabulary to K token ids (a whole number) or to "
                                           "the fewest ids covering this share of the fleet's tokens, ranked by the "
                                           "devices' token counts (sent only as counts; summed under --secagg)")
    epsilon: float | None = option(None, flag="--vocab-epsilon", parse=positive_float, default_text="no noise",
                                   help="differential privacy of the counts: each device adds its share of Laplace "
                                        "noise so the summed counts are epsilon-DP per window of --seq-len tokens")
    noise: Literal["laplace", "gaussian"] = option(
        "laplace", flag="--vocab-noise", parse=one_of("laplace", "gaussian"), choices=("laplace", "gaussian"),
        help="the counts' noise with --vocab-epsilon: laplace (epsilon-DP, every occurrence counted) or gaussian "
             "((epsilon, delta)-DP, windows holding each id counted; less noise for the same epsilon)")
    delta: float = option(1e-5, flag="--vocab-delta", parse=fraction, help="delta of --vocab-noise gaussian")

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.epsilon is not None and self.size is None:
            raise LLMPruneError("--vocab-epsilon needs --vocab", "pass --vocab K, or drop --vocab-epsilon")
        if self.epsilon is None and (self.noise != "laplace" or self.delta != 1e-5):
            raise LLMPruneError("--vocab-noise and --vocab-delta need --vocab-epsilon", "pass --vocab-epsilon E")
        if self.noise == "laplace" and self.delta != 1e-5:
            raise LLMPruneError("--vocab-delta is for --vocab-noise gaussian (Laplace noise is epsilon-DP)",
                                "pass --vocab-noise gaussian, or drop --vocab-delta")
        if not self.delta < 1.0:
            raise LLMPruneError(f"--vocab-delta {self.delta} promises nothing", "pass a small delta such as 1e-5")
        if isinstance(self.size, float) and not 0.0 < self.size <= 1.0:
            raise LLMPruneError(f"--vocab fraction {self.size} is outside (0, 1]",
                                "pass a fraction such as 0.99, or a token count such as 32000")
        if isinstance(self.size, int) and self.size < 1:
            raise LLMPruneError(f"--vocab {self.size} keeps no ids", "pass a token count such as 32000")


# section attribute of RecoverConfig -> its class: the order of --help's groups and of the run config
SECTIONS: dict[str, type] = {"data": DataConfig, "training": TrainingConfig, "fleet": FleetConfig,
                             "privacy": PrivacyConfig, "distill": DistillConfig, "vocab": VocabConfig}


def _default_policy() -> PolicyConfig:
    return POLICIES["plan"].config_class()


@dataclass
class RecoverConfig:
    """Federated LoRA recovery of a pruned checkpoint (see docs/recover.md). Build it from the
    sections (`RecoverConfig(training=TrainingConfig(rounds=5))`) or from flag names
    (`RecoverConfig.of(rounds=5, policy="bandit", arm_sizes="0.5,1")`)."""

    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    policy: PolicyConfig = field(default_factory=_default_policy)
    seed: int = option(0, parse=non_negative_int, help="seed for sampling, partitions, LoRA init and training (0 or more)")
    inject_faults: tuple[Fault, ...] = option((), parse=parse_faults, cli=False, resume="free",
                                              help="testing only: crash:PID, delay:PID:SECONDS, exit:PID (@ROUND)")

    def __post_init__(self) -> None:
        coerce_fields(self)
        self.validate()

    @classmethod
    def of(cls, policy: str = "plan", **settings: Any) -> RecoverConfig:
        """The config that flags of these names describe (`clients=3, fleet="f.toml",
        policy="bandit", arm_sizes="0.5,1"`): each name goes to its section or to the policy's
        config; a name no section and not the policy has is a one-line error."""
        return _from_flat(cls, policy, settings)

    @property
    def scale(self) -> float:
        return self.training.scale

    @property
    def policy_class(self) -> type:
        return policy_of(self.policy)

    @property
    def lean_clients(self) -> bool:
        """Devices load their weights with the lean loader (client_model.py): only what they
        hold, in client_dtype, the vocabulary table as asked, the loss a vocabulary slice at a time."""
        return (self.policy_class.lean_devices or self.fleet.client_dtype != "float32"
                or self.fleet.client_embedding != "same")

    def validate(self) -> None:
        """What the sections cannot check alone: privacy against aggregation, and what the policy
        needs from the rest (its own class declares it)."""
        privacy, aggregation = self.privacy, self.training.aggregation
        if privacy.dp_noise > 0 and privacy.dp_clip is None:
            raise LLMPruneError("--dp-noise needs --dp-clip", "pass --dp-clip C --dp-noise Z")
        if privacy.secagg and not get_aggregation(aggregation).secagg:
            raise LLMPruneError(f"--secagg cannot be used with --aggregation {aggregation}",
                                f"secure aggregation only sums uploads, which cannot give {aggregation}'s average: "
                                f"use {names_text(secagg_names())}")
        if privacy.secagg and privacy.dp_clip is not None:
            raise LLMPruneError("--secagg and --dp-clip together are not supported", "choose one of them")
        if self.training.rows_lr is not None and not self.training.train_rows:
            raise LLMPruneError("--rows-lr needs --train-rows", "pass --train-rows, or drop --rows-lr")
        if self.training.train_rows and (privacy.secagg or privacy.dp_clip is not None):
            raise LLMPruneError("--train-rows cannot be used with --secagg or --dp-clip (a device's rows name the "
                                "tokens its data holds; the masked sum and the clipped average carry no ids)",
                                "drop --train-rows, or --secagg / --dp-clip")
        if self.training.train_rows and self.lean_clients:
            raise LLMPruneError("--train-rows needs devices that load the whole checkpoint (this run's devices load "
                                "lean models: its policy, --client-dtype or --client-embedding)",
                                "use --policy plan with the default --client-dtype and --client-embedding")
        self._check_vocabulary()
        self.policy_class.check_config(self)

    def _check_vocabulary(self) -> None:
        """A fleet-chosen vocabulary trims the model every device loads: it needs devices that load the
        whole checkpoint, one checkpoint for the run, and a teacher lined up with the untrimmed ids."""
        if self.vocab.size is None:
            return
        if self.lean_clients:
            raise LLMPruneError("--vocab needs devices that load the whole checkpoint (this run's devices load lean "
                                "models: its policy, --client-dtype or --client-embedding)",
                                "trim the vocabulary with `llmprune compress --vocab` first, then recover that")
        if not self.policy_class.fleet_vocabulary:
            raise LLMPruneError(f"--vocab cannot be used with --policy {self.policy.name} (it changes the model "
                                "between rounds)", "trim with `llmprune compress --vocab` first, then recover that")
        if self.distill.teacher is not None:
            raise LLMPruneError("--vocab and --teacher together are not supported (the teacher's vocabulary map is "
                                "read from the checkpoint, which the fleet's choice would change)",
                                "trim with `llmprune compress --vocab` first, then recover that with --teacher")

    # -- the Flower run config: dotted keys of TOML scalars, one per leaf field ---------------------
    def to_run_config(self) -> dict:
        """Every setting by its dotted run-config key (`policy.name` says which policy's keys apply)."""
        out = {key: run_config_value(getattr(owner, f.name)) for key, owner, f in _leaves(self)}
        return {"policy.name": self.policy.name, **out}

    @classmethod
    def from_run_config(cls, run_config: dict) -> RecoverConfig:
        """The config of a run config; RunSettings' keys are skipped, any other key is refused."""
        return parse_run_config(run_config)[0]

    def resume_identity(self) -> dict:
        """The settings a resumed run must share with the run it continues, by run-config key:
        every field declared `resume="match"`, and the rounds when the policy spreads its steps
        over them (its class says `fixed_rounds`)."""
        fixed_rounds = self.policy_class.fixed_rounds
        out = {key: run_config_value(getattr(owner, f.name)) for key, owner, f in _leaves(self)
               if f.metadata.get("resume", "match") == "match" or (fixed_rounds and f.metadata.get("resume") == "grow")}
        out["policy.name"] = self.policy.name
        return out


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
    def out_dir(self) -> Path:
        return Path(self.out or "recovered")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir or f"{self.out_dir}.rounds")

    def to_run_config(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


# -- flat names (flags) -> sections ---------------------------------------------------------------
def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """dest (the flag's name) -> (section attribute or None for RecoverConfig's own, field), for
    the sections and RecoverConfig's own fields (the policies' fields are looked up per policy)."""
    out = {dest_of(f): (None, f) for f in fields(RecoverConfig) if f.name not in (*SECTIONS, "policy")}
    for section, cls in SECTIONS.items():
        out.update({dest_of(f): (section, f) for f in fields(cls)})
    return out


def _from_flat(cls, policy: str, settings: dict) -> RecoverConfig:
    known, policy_class = flat_fields(), get_policy(policy)
    settings = {**policy_class.defaults, **settings}
    own = {dest_of(f): f for f in fields(policy_class.config_class)}
    parts: dict[str | None, dict] = {}
    for name, value in settings.items():
        if name in own:
            parts.setdefault("policy", {})[own[name].name] = value
        elif name in known:
            section, f = known[name]
            parts.setdefault(section, {})[f.name] = value
        else:
            raise LLMPruneError(f"'{name}' is not a recover setting{_owner_hint(name)}",
                                "see `llmprune recover --help` for the settings")
    kwargs = {section: SECTIONS[section](**values) for section, values in parts.items() if section in SECTIONS}
    kwargs.update(parts.get(None, {}))
    return cls(**kwargs, policy=policy_class.config_class(**parts.get("policy", {})))


def _owner_hint(name: str) -> str:
    owners = [p for p, c in POLICIES.items() if name in {dest_of(f) for f in fields(c.config_class)}]
    return f" of this policy (it belongs to --policy {' / '.join(owners)})" if owners else ""


def _leaves(cfg: RecoverConfig):
    """(run-config key, owning object, field) of every leaf setting, sections first."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            yield f"{section}.{f.name.replace('_', '-')}", obj, f
    for f in fields(cfg.policy):
        yield f"policy.{cfg.policy.name}.{f.name.replace('_', '-')}", cfg.policy, f
    for f in fields(cfg):
        if f.name not in (*SECTIONS, "policy"):
            yield f.name.replace("_", "-"), cfg, f


def key_flags(cfg: RecoverConfig) -> dict[str, str]:
    """run-config key -> the flag a user types for it (the key itself where there is no flag)."""
    return {key: flag_of(f) if f.metadata.get("cli", True) else key for key, _, f in _leaves(cfg)}


def run_config_value(value):
    """A setting as a TOML scalar: numbers and booleans as they are, None as '', a tuple as its
    items joined by commas, a typed value (a partition, a fault) as its text."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return ",".join(_item_text(v) for v in value)
    return str(value)


def _item_text(value) -> str:
    if value is None:
        return "all"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def parse_run_config(run_config: dict, *, device: bool = False) -> tuple[RecoverConfig, RunSettings]:
    """The typed config and settings of a Flower run config, parsed once; a bad value or an
    unknown key is a one-line error naming the key. Settings of a policy other than the chosen one
    must be at their defaults (the app's pyproject lists every policy's keys). `device`: a device
    reads no policy setting (its instructions say what to build), so the policy's keys are skipped
    and a policy the device does not know is no error."""
    if device:
        run_config = {k: v for k, v in run_config.items() if not k.startswith("policy.")}
    policy = str(run_config.get("policy.name", "plan"))
    if policy not in POLICIES:
        raise LLMPruneError(f"run-config key 'policy.name' has an unknown policy '{policy}'",
                            f"use one of {', '.join(POLICIES)}")
    parts: dict[str, dict] = {"settings": {}}
    targets = _run_config_targets(policy)
    for key, value in run_config.items():
        if key == "policy.name":
            continue
        if key not in targets:
            raise LLMPruneError(f"unknown run-config key '{key}'",
                                "see [tool.flwr.app.config] in llmprune/fedrecover/app/pyproject.toml for the keys")
        part, f, hint = targets[key]
        parsed = _parse_value(key, value, f, hint)
        if part == "other-policy":
            if parsed != _field_default(f):
                raise LLMPruneError(f"run-config key '{key}' is set, but policy.name is '{policy}'",
                                    f"set policy.name = '{key.split('.')[1]}', or leave {key} at its default")
            continue
        parts.setdefault(part, {})[f.name] = parsed
    settings = RunSettings(**parts.pop("settings"))
    try:
        kwargs = {s: SECTIONS[s](**parts.pop(s, {})) for s in SECTIONS}
        policy_config = get_policy(policy).config_class(**parts.pop("policy", {}))
        return RecoverConfig(**kwargs, policy=policy_config, **parts.pop("own", {})), settings
    except LLMPruneError as exc:
        raise LLMPruneError(f"in the run config: {exc.problem}", exc.fix) from None


def _run_config_targets(policy: str) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """run-config key -> (where it goes, field, type hint)."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out.update({f"{section}.{f.name.replace('_', '-')}": (section, f, hints[f.name]) for f in fields(cls)})
    for name, pcls in POLICIES.items():
        hints = typing.get_type_hints(pcls.config_class)
        part = "policy" if name == policy else "other-policy"
        out.update({f"policy.{name}.{f.name.replace('_', '-')}": (part, f, hints[f.name])
                    for f in fields(pcls.config_class)})
    for cls, part in ((RecoverConfig, "own"), (RunSettings, "settings")):
        hints = typing.get_type_hints(cls)
        out.update({f.name.replace("_", "-"): (part, f, hints[f.name]) for f in fields(cls)
                    if f.name not in (*SECTIONS, "policy")})
    return out


def _field_default(f: dataclasses.Field):
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    parse = f.metadata.get("parse")
    return parse(value) if parse is not None and value is not None else value


def _parse_value(key: str, value, f: dataclasses.Field, hint):
    """One run-config value as the field's value: '' is None for an optional field, booleans as
    TOML booleans or true/false text, everything else through the field's own parser."""
    import argparse

    optional = type(None) in typing.get_args(hint)
    if value == "" and optional:
        return None
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            raise argparse.ArgumentTypeError(f"'{value}' is not true or false")
        if typing.get_origin(hint) is tuple and f.metadata.get("parse") is None:
            return tuple(v.strip() for v in str(value).split(",") if v.strip())
        parse = f.metadata.get("parse")
        return parse(value) if parse is not None else str(value)
    except argparse.ArgumentTypeError as exc:
        raise LLMPruneError(f"run-config key '{key}' has a bad value {value!r} ({exc})",
                            f"pass {key}=<{flag_of(f).lstrip('-')}> in the run config") from None
