"""The Flower ClientApp: a device that trains LoRA on its own data and uploads only the adapter.

Messages it answers (typed in messages.py):
- query: which client it is (partition id, device name), how many windows it holds;
- train: the adapter view for this client and its TrainInstruction; replies with the trained
  adapter (same names and shapes) and a TrainReply;
- train.split: one step of split training (SplitStep: this step's features, or the tail's
  gradient); replies with a SplitAnswer, and after the round's last step with the TrainReply.

Where its data comes from: node config `data-path` (a device's own file, on a real fleet), or
the partition file `data-cache` that `llmprune recover` wrote for a simulation. Its model: the
instruction's model path (simulation only), else node config `model-path`, else the run config's
`model`. Its teacher, when the server asks it to distil: node config `teacher-path`, else the
server's teacher spec. The round itself is device.py's; in a simulation it runs in a fresh process."""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from llmprune.errors import LLMPruneError

from . import policies  # noqa: F401  (the policies register their device-model kinds)
from .config import RecoverConfig, RunSettings, parse_run_config
from .device import DeviceEmulation, ModelCache, RoundJob, run_round
from .faults import inject
from .messages import (
    CONFIG,
    CountQuery,
    Coverage,
    CoverageQuery,
    Identity,
    SplitAnswer,
    SplitStep,
    TokenCounts,
    TrainInstruction,
    TrainReply,
    query_kind,
)
from .partition import ClientData
from .secagg import fit_config, is_legacy_fit, secagg_counts, secagg_train
from .split_device import SplitJob

SPLIT_ROUND, SPLIT_STATE = "split-round", "split-state"   # Context.state keys of a split round


class DeviceRuntime:
    """One ClientApp process's view of its device: the run's config, its windows, its fleet entry
    and (on a fleet) its model, each read once, and in a simulation its round server.

    Flower hands a simulation's ClientApp to its Ray workers anew with every message (a copy made by
    pickling), so what must outlive a message lives in the one per-process registry `of()` reads,
    keyed by the run's overrides."""

    _per_process: dict[str, DeviceRuntime] = {}

    @classmethod
    def of(cls, overrides: dict | None) -> DeviceRuntime:
        """This process's runtime for the run these overrides describe."""
        import json

        key = json.dumps(overrides or {}, sort_keys=True, default=str)
        if key not in cls._per_process:
            cls._per_process[key] = cls(overrides)
        return cls._per_process[key]

    def __init__(self, overrides: dict | None = None) -> None:
        self.overrides = overrides or {}
        self.cache: dict = {}
        self.models = ModelCache()
        self.server = None          # simulation: the RoundServer forking each round's process

    def start_round_server(self) -> None:
        """Start the simulation's round server now (it imports the training stack in the
        background while the run is still being planned), not at the first round."""
        from .round_server import RoundServer

        if self.server is None:
            self.server = RoundServer()

    def isolated(self, job: RoundJob):
        self.start_round_server()
        return self.server.run(job)

    def split(self, context: Context, msg: Message) -> Message:
        """One step's job of split training (split_device.py). The round's instruction and the device's
        state (its LoRA, optimiser moments, counters) live in Flower's Context.state between messages;
        the round's first message starts them. A fault injected for the round strikes at the device's
        first tail step: mid-round, after the server has its features."""
        from .records import from_record, to_record
        from .split_device import round_stats, run_split_job, start_state, trained_arrays

        step, instruction, arrays = SplitStep.from_message(msg)
        cfg, settings = self.config(context)
        if instruction is not None:
            context.state[SPLIT_ROUND] = ConfigRecord(instruction.to_config())
            state = start_state(instruction.device_model.held().to_local(arrays))
        else:
            instruction = TrainInstruction.from_config(context.state[SPLIT_ROUND])
            state = from_record(context.state[SPLIT_STATE])
        windows, pid = self.windows(cfg, settings, context, instruction.kept_ids)
        if step.kind == "tail" and step.step == 0:
            inject(cfg.inject_faults, pid, instruction.server_round)
        simulation = bool(settings.data_cache)
        job = SplitJob(step.kind, model_path(settings, context, instruction), instruction, state, windows, step.step,
                       step.tensor, self.emulation(cfg, pid, context.node_config.get("device"), simulation))
        if simulation:
            self.start_round_server()
        result = self.server.run_split(job, str(context.node_id)) if simulation else run_split_job(job)
        context.state[SPLIT_STATE] = to_record(result.state)
        if result.outgoing is not None:
            return SplitAnswer(pid, result.outgoing, result.seconds, result.peak_rss_mb, result.loss).reply_to(msg)
        stats = round_stats(result.state)          # the round's last message: the trained adapter
        trained = instruction.device_model.held().to_global(trained_arrays(result.state))
        return TrainReply(pid, 1 if instruction.uniform_weights else int(windows.shape[0]), stats["loss"],
                          stats["seconds"], stats["peak_rss_mb"], None, stats["loss_first"], stats["loss_last"],
                          trained).reply_to(msg)

    def _once(self, key, build):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def config(self, context: Context) -> tuple[RecoverConfig, RunSettings]:
        return parse_run_config({**dict(context.run_config), **self.overrides}, device=True)

    def windows(self, cfg: RecoverConfig, settings: RunSettings, context: Context,
                kept_ids: np.ndarray | None = None) -> tuple[torch.Tensor, int]:
        """This client's training windows and its partition id; with `kept_ids` (a fleet-chosen
        vocabulary) its text re-read by the trimmed tokenizer."""
        windows, pid = self._windows(cfg, settings, context)
        if kept_ids is None:
            return windows, pid
        import hashlib

        import llmprune

        from .fleet_vocab import retokenize

        path = model_path(settings, context)
        tokenizer = self._once(("tokenizer", path), lambda: llmprune.load_tokenizer(path))
        key = ("vocab", pid, path, hashlib.sha256(kept_ids.tobytes()).hexdigest())
        return self._once(key, lambda: retokenize(windows, tokenizer, kept_ids, cfg.data.seq_len, None)), pid

    def _windows(self, cfg: RecoverConfig, settings: RunSettings, context: Context) -> tuple[torch.Tensor, int]:
        import llmprune

        node = context.node_config
        pid = int(node.get("partition-id", 0))
        if node.get("data-path"):
            path, seq_len, limit = model_path(settings, context), cfg.data.seq_len, cfg.data.max_windows
            return self._once(("own", path, str(node["data-path"]), seq_len, limit), lambda: llmprune.token_windows(
                llmprune.load_tokenizer(path), llmprune.load_texts(str(node["data-path"])), seq_len, limit)), pid
        if not settings.data_cache:
            raise LLMPruneError("this SuperNode has no data", "start it with --node-config \"data-path='FILE'\"")
        data = self._once(("cache", settings.data_cache), lambda: ClientData.load(settings.data_cache))
        if pid >= len(data.partitions):
            raise LLMPruneError(f"partition {pid} does not exist ({len(data.partitions)} clients)",
                                "match --clients to the SuperNodes")
        return data.client_windows(pid), pid

    def counts(self, context: Context, query: CountQuery) -> TokenCounts:
        """Its token counts for a fleet-chosen vocabulary (with its share of the noise when asked)."""
        from .fleet_vocab import CountNoise, device_counts, released_counts

        cfg, settings = self.config(context)
        windows, pid = self.windows(cfg, settings, context)
        noise = CountNoise(query.noise_mechanism, query.noise_scale) if query.noise_mechanism else None
        counts = device_counts(windows, query.seq_len, query.size, noise is not None and noise.presence)
        return TokenCounts(pid, released_counts(counts, noise, query.devices))

    def coverage(self, context: Context, query: CoverageQuery) -> Coverage:
        """How much of its data the fleet's kept ids hold; re-tokenizes its text for the rounds."""
        from .fleet_vocab import coverage

        cfg, settings = self.config(context)
        windows, pid = self.windows(cfg, settings, context)
        kept = query.kept_ids
        after = self.windows(cfg, settings, context, kept)[0]
        return Coverage(pid, coverage(windows, query.seq_len, kept), int(windows.shape[0]), int(after.shape[0]))

    def emulation(self, cfg: RecoverConfig, pid: int, device: str | None, simulation: bool) -> DeviceEmulation:
        """This client's device as its fleet entry describes it; a real device is what it is."""
        from .fleet import load_fleet

        if not (cfg.fleet.emulate_speed and cfg.fleet.file and simulation):
            return DeviceEmulation()
        devices = self._once(("fleet", cfg.fleet.file), lambda: load_fleet(cfg.fleet.file))
        dev = next((d for d in devices if d.name == device), None) or devices[pid % len(devices)]
        return DeviceEmulation(dev.speed, dev.oom_mb)

    def train(self, context: Context, instruction: TrainInstruction, arrays: dict) -> TrainReply:
        cfg, settings = self.config(context)
        windows, pid = self.windows(cfg, settings, context, instruction.kept_ids)
        inject(cfg.inject_faults, pid, instruction.server_round)
        simulation = bool(settings.data_cache)
        start = time.perf_counter()
        job = RoundJob(model_path(settings, context, instruction), instruction, arrays, windows,
                       cfg.training.lora_dropout,
                       self.emulation(cfg, pid, context.node_config.get("device"), simulation),
                       teacher=str(context.node_config.get("teacher-path") or "") or None)
        result = self.isolated(job) if simulation else run_round(job, self.models)
        m = result.memory
        return TrainReply(pid, 1 if instruction.uniform_weights else int(windows.shape[0]), result.loss,
                          time.perf_counter() - start, m["peak-rss-mb"], m["model-rss-mb"], m["loss-first"],
                          m["loss-last"], result.trained)


def model_path(settings: RunSettings, context: Context, instruction: TrainInstruction | None = None) -> str:
    """The checkpoint this client trains on: the instruction's (prune-tune re-prunes the global
    model between rounds; simulation only: on a fleet a server never names files on a device),
    else node config model-path, else the run config's model."""
    if instruction is not None and instruction.model_path is not None:
        if not settings.data_cache:
            raise LLMPruneError("the server sent a model path, which only a simulation may do",
                                "run prune-tune with llmprune recover")
        return instruction.model_path
    return str(context.node_config.get("model-path") or settings.model)


def _dp_clip_if_asked(msg: Message, context: Context, call_next):
    """Flower's fixedclipping_mod, applied when the server's DP sent a clipping norm."""
    config = msg.content.config_records.get(CONFIG) if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _secagg_if_asked(msg: Message, context: Context, call_next):
    """Flower's secaggplus_mod for the messages of a SecAgg+ round (they carry its config)."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _counted(counts: TokenCounts) -> tuple[int, np.ndarray]:
    return counts.partition_id, counts.counts


def failed_reply(msg: Message, exc: BaseException) -> Message:
    """The reply of a round that failed in a way a device can (out of memory, a setting it cannot
    honour): the cause in one line for the server, instead of Flower logging the traceback on both
    sides and the server reading it from its last line."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def build_client_app(overrides: dict | None = None) -> ClientApp:
    """The ClientApp; `overrides` are run-config entries a simulation passes in directly."""
    app = ClientApp(mods=[_secagg_if_asked, _dp_clip_if_asked])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        device = DeviceRuntime.of(overrides)
        kind = query_kind(msg)
        if kind == "token-counts":
            return device.counts(context, CountQuery.from_config(msg.content[CONFIG])).reply_to(msg)
        if kind == "vocab-coverage":
            return device.coverage(context, CoverageQuery.from_config(msg.content[CONFIG])).reply_to(msg)
        cfg, settings = device.config(context)
        windows, pid = device.windows(cfg, settings, context)
        if settings.data_cache:          # a simulation: its rounds run in processes of their own
            device.start_round_server()
        name = context.node_config.get("device")
        return Identity(pid, int(windows.shape[0]), str(name) if name else None).reply_to(msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        device = DeviceRuntime.of(overrides)
        if is_legacy_fit(msg) and fit_config(msg).get("what") == "token-counts":   # SecAgg+ counting
            return secagg_counts(msg, lambda config: _counted(device.counts(context, CountQuery.from_config(config))))
        if is_legacy_fit(msg):  # a SecAgg+ round: the legacy fit protocol, masked by the mod
            return secagg_train(msg, lambda instruction, arrays: device.train(context, instruction, arrays))
        instruction, arrays = TrainInstruction.from_message(msg)
        try:
            return device.train(context, instruction, arrays).reply_to(msg)
        except (MemoryError, LLMPruneError) as exc:
            return failed_reply(msg, exc)

    @app.train("split")
    def split(msg: Message, context: Context) -> Message:
        try:
            return DeviceRuntime.of(overrides).split(context, msg)
        except (MemoryError, LLMPruneError) as exc:
            return failed_reply(msg, exc)

    return app


app = build_client_app()
