"""The Flower ClientApp: a device that trains LoRA on its own data and uploads only the adapter.

Messages it answers:
- query: which client it is (partition id, device name), how many windows it holds;
- train: `arrays` = the adapter for this client (its rank, its layers), `config` = steps, lr,
  seed...; replies with the trained adapter (same names and shapes) and metrics.

Where its data comes from: node config `data-path` (a device's own file, on a real fleet), or
the partition file `data-cache` that `llmprune recover` wrote for a simulation. Its model:
node config `model-path`, else the run config's `model`. Both are loaded once per process."""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.app import MessageType

from llmprune.errors import LLMPruneError
from llmprune.memory import current_rss_mb, reset_peak_rss, window_peak_rss_mb

from .config import RecoverConfig, RunSettings, parse_run_config
from .partition import ClientData
from .records import from_record, to_record
from .secagg import is_legacy_fit, secagg_train
from .task import train_lora

log = logging.getLogger(__name__)
KEY_CLIPPING_NORM = "clipping_norm"


# RSS of this process before it first loaded a model: what the model-dependent part of a peak is
# measured from (Python, torch, transformers, peft, flwr and the client's data are below it).
_RSS_BEFORE_MODEL: list[float] = []


@lru_cache(maxsize=2)
def _model(path: str):
    import llmprune

    if not _RSS_BEFORE_MODEL:
        _RSS_BEFORE_MODEL.append(current_rss_mb())
    model = llmprune.load_model(path)
    model.eval()
    return model


def rss_before_model() -> float:
    """The process's RSS before its first model load. (A module-level function: the ClientApp's
    closures reach module state through it, not through a global that cloudpickle would copy.)"""
    return _RSS_BEFORE_MODEL[0] if _RSS_BEFORE_MODEL else 0.0


def train_options(round_config, dropout: float) -> dict:
    """train_lora's keyword arguments from a round's config (both client kinds share them)."""
    return {"scale": float(round_config["scale"]), "steps": int(round_config["local-steps"]),
            "batch_size": int(round_config["batch-size"]), "lr": float(round_config["lr"]),
            "seed": int(round_config["seed"]), "dropout": dropout}


# What an emulated device's process needs besides the model (Python, torch, transformers, peft,
# flwr): a fresh ray worker's RSS before its first load, measured 395 MB (bench/submodels.py).
EMULATED_RUNTIME_MB = 400.0


class DeviceEmulation:
    """Simulation only (--emulate-speed): what makes a simulated client behave like its fleet
    entry's device. A device of speed s < 1 sleeps (1/s - 1) x each step's time, as a slower
    processor would take; a device with oom_mb (its true memory, never told to the server) fails
    with MemoryError once its model's measured memory plus the runtime's passes it, as the OS
    would kill it (the worker's own history is left out: a device runs one client)."""

    def __init__(self, speed: float = 1.0, oom_mb: float | None = None, baseline_mb: float = 0.0) -> None:
        self.speed, self.oom_mb, self.baseline_mb = speed, oom_mb, baseline_mb

    @classmethod
    def of(cls, cfg: RecoverConfig, pid: int, device: str | None, simulation: bool) -> DeviceEmulation:
        """This client's device as its fleet entry describes it; a real device (not a simulation)
        is what it is: nothing is emulated."""
        if not (cfg.emulate_speed and cfg.fleet and simulation):
            return cls()
        devices = _fleet_devices(cfg.fleet)
        dev = next((d for d in devices if d.name == device), None) or devices[pid % len(devices)]
        return cls(dev.speed, dev.oom_mb)

    def after_step(self, step: int, seconds: float) -> None:
        used = window_peak_rss_mb() - self.baseline_mb + EMULATED_RUNTIME_MB
        if self.oom_mb is not None and used > self.oom_mb:
            raise MemoryError(f"out of memory: training needed {used:.0f} MB at step {step + 1}, "
                              f"the device has {self.oom_mb:.0f} MB")
        if self.speed < 1.0:
            time.sleep(seconds * (1.0 / self.speed - 1.0))


def lean_training(path: str, arrays: dict, windows: torch.Tensor, round_config, dropout: float,
                  emulation: DeviceEmulation | None = None) -> tuple[dict, float, dict]:
    """A lean client's round: load only the submodel the server cut for this round (held layers
    and blocks, base weights in client-dtype, the vocabulary table as asked), train LoRA on it
    with the vocabulary-sliced loss, free it. The peak counts the load; the model-dependent part
    is the peak minus the RSS just before the load."""
    import gc

    from .client_model import chunked_vocab_loss, free_model, load_submodel, trim_heap
    from .fleet import vocab_chunk
    from .submodels import Submodel

    submodel = Submodel.from_json(str(round_config["submodel"]))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(round_config["client-dtype"])]
    options = train_options(round_config, dropout)
    gc.collect()
    trim_heap()             # what the last round freed goes back to the OS before the baseline is read
    before = current_rss_mb()
    reset_peak_rss()
    embedding = str(round_config["client-embedding"])
    if "stage" in round_config:   # DevFT: the stage's fused layers, one per group
        from .devft import Stage, load_stage_model

        model = load_stage_model(path, Stage.from_json(str(round_config["stage"])), dtype=dtype, embedding=embedding)
    else:
        model = load_submodel(path, submodel, dtype=dtype, embedding=embedding)
    chunk = vocab_chunk(options["batch_size"] * (windows.shape[1] - 1), model.config.hidden_size)
    emulation = emulation or DeviceEmulation()
    emulation.baseline_mb = before
    gain: dict = {}
    try:
        trained, loss = train_lora(model, submodel.to_local(arrays), windows, **options, on_step=emulation.after_step,
                                   gain=gain, loss_fn=lambda m, ids: chunked_vocab_loss(m, ids, vocab_chunk=chunk))
    finally:
        peak = window_peak_rss_mb()
        free_model(model)
        del model
    return submodel.to_global(trained), loss, {"peak-rss-mb": peak, "model-rss-mb": peak - before,
                                               "loss-first": gain["loss_first"], "loss-last": gain["loss_last"]}


@lru_cache(maxsize=2)
def _fleet_devices(path: str) -> tuple:
    """The fleet file's devices, read once per process (a client asks every round)."""
    from .fleet import load_fleet

    return tuple(load_fleet(path))


@lru_cache(maxsize=4)
def _own_windows(model_path: str, data_path: str, seq_len: int, max_windows: int | None) -> torch.Tensor:
    import llmprune

    tokenizer = llmprune.load_tokenizer(model_path)
    return llmprune.token_windows(tokenizer, llmprune.load_texts(data_path), seq_len, max_windows)


@lru_cache(maxsize=2)
def _cached_partitions(path: str) -> ClientData:
    return ClientData.load(path)


def client_windows(cfg: RecoverConfig, settings: RunSettings, context: Context) -> tuple[torch.Tensor, int]:
    """This client's training windows and its partition id."""
    node = context.node_config
    pid = int(node.get("partition-id", 0))
    if node.get("data-path"):
        return _own_windows(model_path(settings, context), str(node["data-path"]), cfg.seq_len, cfg.max_windows), pid
    cache = settings.data_cache
    if not cache:
        raise LLMPruneError("this SuperNode has no data", "start it with --node-config \"data-path='FILE'\"")
    data = _cached_partitions(str(cache))
    if pid >= len(data.partitions):
        raise LLMPruneError(f"partition {pid} does not exist ({len(data.partitions)} clients)", "match --clients to the SuperNodes")
    return data.client_windows(pid), pid


def model_path(settings: RunSettings, context: Context, round_config=None) -> str:
    """The checkpoint this client trains on: the round's (prune-tune re-prunes the global model
    between rounds; simulation only: on a fleet a server never names files on a device), else
    node config model-path, else the run config's model."""
    if round_config is not None and "model-path" in round_config:
        if not settings.data_cache:
            raise LLMPruneError("the server sent a model path, which only a simulation may do",
                                "run prune-tune (--target-ratio) with llmprune recover")
        return str(round_config["model-path"])
    return str(context.node_config.get("model-path") or settings.model)


def _inject_faults(spec: str, pid: int, server_round: int) -> None:
    """Failure injection for tests and drills: `crash:P` raises in client P, `delay:P:S` makes
    it S seconds late, `exit:P` kills its process (a device vanishing mid-round); `@R` limits a
    fault to round R (e.g. `crash:1@2`)."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        item, _, only_round = item.partition("@")
        kind, _, rest = item.partition(":")
        target, _, arg = rest.partition(":")
        if int(target) != pid or (only_round and int(only_round) != server_round):
            continue
        if kind == "crash":
            raise RuntimeError(f"injected crash in client {pid}")
        if kind == "delay":
            time.sleep(float(arg))
        if kind == "exit":
            os._exit(17)


def _dp_clip_if_asked(msg: Message, context: Context, call_next):
    """Flower's fixedclipping_mod, applied when the server's DP wrapper sent a clipping norm."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _secagg_if_asked(msg: Message, context: Context, call_next):
    """Flower's secaggplus_mod for the messages of a SecAgg+ round (they carry its config)."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def build_client_app(overrides: dict | None = None) -> ClientApp:
    """The ClientApp; `overrides` are run-config entries a simulation passes in directly."""
    app = ClientApp(mods=[_secagg_if_asked, _dp_clip_if_asked])

    def config_of(context: Context) -> tuple[RecoverConfig, RunSettings]:
        return parse_run_config({**dict(context.run_config), **(overrides or {})})

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        windows, pid = client_windows(*config_of(context), context)
        metrics = MetricRecord({"partition-id": pid, "num-examples": int(windows.shape[0])})
        reply = RecordDict({"metrics": metrics})
        if context.node_config.get("device"):
            reply["device"] = ConfigRecord({"name": str(context.node_config["device"])})
        return Message(reply, reply_to=msg)

    def local_training(cfg: RecoverConfig, settings: RunSettings, context: Context, arrays: dict,
                       round_config) -> tuple[dict, dict]:
        windows, pid = client_windows(cfg, settings, context)
        _inject_faults(cfg.inject_faults, pid, int(round_config["server-round"]))
        start = time.perf_counter()
        emulation = DeviceEmulation.of(cfg, pid, context.node_config.get("device"), simulation=bool(settings.data_cache))
        path = model_path(settings, context, round_config)
        if "submodel" in round_config:
            trained, loss, memory = lean_training(path, arrays, windows, round_config, cfg.lora_dropout, emulation)
        else:
            model = _model(path)
            reset_peak_rss()  # measure training, not the load (which briefly holds two copies)
            emulation.baseline_mb = rss_before_model()
            gain: dict = {}
            trained, loss = train_lora(model, arrays, windows, **train_options(round_config, cfg.lora_dropout),
                                       on_step=emulation.after_step, gain=gain)
            peak = window_peak_rss_mb()
            memory = {"peak-rss-mb": peak, "model-rss-mb": peak - rss_before_model(),
                      "loss-first": gain["loss_first"], "loss-last": gain["loss_last"]}
        metrics = {"num-examples": int(windows.shape[0]) if not round_config.get("uniform-weights") else 1,
                   "train-loss": loss, "partition-id": pid, "seconds": time.perf_counter() - start, **memory}
        return trained, metrics

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, settings = config_of(context)
        if is_legacy_fit(msg):  # a SecAgg+ round: the legacy fit protocol, masked by the mod
            return secagg_train(msg, lambda arrays, config: local_training(cfg, settings, context, arrays, config))
        trained, metrics = local_training(cfg, settings, context, from_record(msg.content["arrays"]),
                                          msg.content["config"])
        return Message(RecordDict({"arrays": to_record(trained), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = build_client_app()
