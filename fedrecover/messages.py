"""The messages between the ServerApp and the ClientApp, typed: each class owns its record keys, so
no other module writes or reads a key by its string.

- IdentityQuery / Identity: which client a node is (partition id, device name, windows held);
- TrainInstruction (+ the adapter view as arrays): what a device trains this round and how;
- TrainReply (+ the trained adapter): what it measured;
- CountQuery / TokenCounts, CoverageQuery / Coverage: the fleet-chosen vocabulary's counting round
  and each device's coverage of its own data by the kept ids (fleet_vocab.py).

A SecAgg+ round carries the same instruction as the flat config of Flower's legacy fit (to_config /
from_config) and the same reply metrics (to_metrics / from_metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from .device_models import DeviceModel
from .records import from_record, payload_bytes, to_record

Arrays = dict[str, np.ndarray]
CONFIG, ARRAYS, METRICS, DEVICE = "config", "arrays", "metrics", "device"


@dataclass(frozen=True)
class IdentityQuery:
    def to_message(self, node: int) -> Message:
        return Message(RecordDict({CONFIG: ConfigRecord({"what": "identity"})}), dst_node_id=node,
                       message_type=MessageType.QUERY)


@dataclass(frozen=True)
class Identity:
    partition_id: int
    num_examples: int
    device: str | None = None

    def reply_to(self, msg: Message) -> Message:
        content = RecordDict({METRICS: MetricRecord({"partition-id": self.partition_id,
                                                     "num-examples": self.num_examples})})
        if self.device:
            content[DEVICE] = ConfigRecord({"name": self.device})
        return Message(content, reply_to=msg)

    @classmethod
    def from_message(cls, reply: Message) -> Identity:
        metrics = reply.content[METRICS]
        device = reply.content.config_records.get(DEVICE)
        return cls(int(metrics["partition-id"]), int(metrics["num-examples"]), str(device["name"]) if device else None)


@dataclass(frozen=True)
class CountQuery:
    """Count the token ids of your windows (`size` ids, windows of `seq_len`); with a noise mechanism
    (fleet_vocab.CountNoise: laplace | gaussian, its scale on the sum), add your share of it for the
    `devices` that count."""

    size: int
    seq_len: int
    devices: int
    noise_mechanism: str | None = None
    noise_scale: float = 0.0

    def to_config(self) -> dict:
        out = {"what": "token-counts", "size": self.size, "seq-len": self.seq_len, "devices": self.devices}
        if self.noise_mechanism is not None:
            out.update({"noise": self.noise_mechanism, "noise-scale": float(self.noise_scale)})
        return out

    @classmethod
    def from_config(cls, config) -> CountQuery:
        noise = str(config["noise"]) if "noise" in config else None
        return cls(int(config["size"]), int(config["seq-len"]), int(config["devices"]), noise,
                   float(config.get("noise-scale", 0.0)))

    def to_message(self, node: int) -> Message:
        return Message(RecordDict({CONFIG: ConfigRecord(self.to_config())}), dst_node_id=node,
                       message_type=MessageType.QUERY)


@dataclass(frozen=True)
class CoverageQuery:
    """The kept ids (little-endian int32): what share of your tokens do they hold?"""

    kept: bytes
    seq_len: int

    def to_message(self, node: int) -> Message:
        config = {"what": "vocab-coverage", "kept": self.kept, "seq-len": self.seq_len}
        return Message(RecordDict({CONFIG: ConfigRecord(config)}), dst_node_id=node, message_type=MessageType.QUERY)

    @classmethod
    def from_config(cls, config) -> CoverageQuery:
        return cls(bytes(config["kept"]), int(config["seq-len"]))

    @property
    def kept_ids(self) -> np.ndarray:
        return ids_of_bytes(self.kept)


def ids_bytes(ids: np.ndarray) -> bytes:
    """Token ids as a message carries them: little-endian int32."""
    return np.asarray(ids, dtype="<i4").tobytes()


def ids_of_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i4").astype(np.int64)


def query_kind(msg: Message) -> str:
    """'identity', 'token-counts' or 'vocab-coverage': what a query message asks."""
    return str(msg.content[CONFIG].get("what", "identity"))


@dataclass(frozen=True)
class TokenCounts:
    partition_id: int
    counts: np.ndarray          # float64, one per id (noised when the query carried noise)

    def reply_to(self, msg: Message) -> Message:
        return Message(RecordDict({ARRAYS: to_record({"counts": self.counts}),
                                   METRICS: MetricRecord({"partition-id": self.partition_id})}), reply_to=msg)

    @classmethod
    def from_message(cls, reply: Message) -> TokenCounts:
        return cls(int(reply.content[METRICS]["partition-id"]), from_record(reply.content[ARRAYS])["counts"])


@dataclass(frozen=True)
class Coverage:
    partition_id: int
    coverage: float
    windows_before: int
    windows_after: int

    def reply_to(self, msg: Message) -> Message:
        return Message(RecordDict({METRICS: MetricRecord({
            "partition-id": self.partition_id, "coverage": self.coverage, "windows-before": self.windows_before,
            "windows-after": self.windows_after})}), reply_to=msg)

    @classmethod
    def from_message(cls, reply: Message) -> Coverage:
        m = reply.content[METRICS]
        return cls(int(m["partition-id"]), float(m["coverage"]), int(m["windows-before"]), int(m["windows-after"]))


@dataclass(frozen=True)
class TrainInstruction:
    """One device's round: steps and optimiser settings, its seed, and what it builds (a device
    model of a registered kind, in the lean dtypes; None: the checkpoint as it is)."""

    server_round: int
    seed: int
    local_steps: int
    scale: float
    batch_size: int
    lr: float
    uniform_weights: bool = False             # DP: every client weighs 1 (Flower's DP wrapper needs it)
    model_path: str | None = None             # the round's checkpoint when it is not the run's (simulation only)
    device_model: DeviceModel | None = None
    client_dtype: str = "float32"
    client_embedding: str = "same"
    teacher: str | None = None                # distil from this model on the device (its memory admits it)
    distill_alpha: float = 0.0
    distill_temperature: float = 1.0
    train_rows: bool = False                  # also train the embedding rows of its tokens (rows.py)
    rows_lr: float = 0.0                      # their learning rate
    vocabulary: bytes | None = None           # the fleet's kept ids (int32 LE): cut the checkpoint's rows to them
    extra: dict = field(default_factory=dict)  # entries a wrapper adds (Flower's DP clipping norm)

    def to_config(self) -> dict:
        out = {"server-round": self.server_round, "seed": self.seed, "local-steps": self.local_steps,
               "scale": self.scale, "batch-size": self.batch_size, "lr": self.lr,
               "uniform-weights": self.uniform_weights, **self.extra}
        if self.model_path is not None:
            out["model-path"] = self.model_path
        if self.device_model is not None:
            out.update({"device-model": self.device_model.kind, "device-model-spec": self.device_model.to_json(),
                        "client-dtype": self.client_dtype, "client-embedding": self.client_embedding})
        if self.teacher is not None:
            out.update({"teacher": self.teacher, "distill-alpha": self.distill_alpha,
                        "distill-temperature": self.distill_temperature})
        if self.train_rows:
            out.update({"train-rows": True, "rows-lr": self.rows_lr})
        if self.vocabulary is not None:
            out["vocabulary"] = self.vocabulary
        return out

    @property
    def kept_ids(self) -> np.ndarray | None:
        return None if self.vocabulary is None else ids_of_bytes(self.vocabulary)

    @classmethod
    def from_config(cls, config) -> TrainInstruction:
        config = dict(config)
        kind = config.get("device-model")
        known = {"server-round", "seed", "local-steps", "scale", "batch-size", "lr", "uniform-weights", "model-path",
                 "device-model", "device-model-spec", "client-dtype", "client-embedding", "teacher", "distill-alpha",
                 "distill-temperature", "train-rows", "rows-lr", "vocabulary"}
        return cls(int(config["server-round"]), int(config["seed"]), int(config["local-steps"]),
                   float(config["scale"]), int(config["batch-size"]), float(config["lr"]),
                   bool(config.get("uniform-weights", False)),
                   str(config["model-path"]) if "model-path" in config else None,
                   DeviceModel.from_message(str(kind), str(config["device-model-spec"])) if kind else None,
                   str(config.get("client-dtype", "float32")), str(config.get("client-embedding", "same")),
                   str(config["teacher"]) if "teacher" in config else None, float(config.get("distill-alpha", 0.0)),
                   float(config.get("distill-temperature", 1.0)), bool(config.get("train-rows", False)),
                   float(config.get("rows-lr", 0.0)),
                   bytes(config["vocabulary"]) if "vocabulary" in config else None,
                   {k: v for k, v in config.items() if k not in known})

    def to_message(self, node: int, arrays: Arrays) -> tuple[Message, int]:
        """The message to `node` and the bytes of the adapter it carries (what bytes_down counts)."""
        record = to_record(arrays)
        msg = Message(RecordDict({ARRAYS: record, CONFIG: ConfigRecord(self.to_config())}), dst_node_id=node,
                      message_type=MessageType.TRAIN)
        return msg, payload_bytes(record) + len(self.vocabulary or b"")

    @staticmethod
    def from_message(msg: Message) -> tuple[TrainInstruction, Arrays]:
        return TrainInstruction.from_config(msg.content[CONFIG]), from_record(msg.content[ARRAYS])


@dataclass
class TrainReply:
    """What a device measured in its round (and, outside SecAgg+, its trained adapter)."""

    partition_id: int
    num_examples: int
    train_loss: float
    seconds: float
    peak_rss_mb: float
    model_rss_mb: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    arrays: Arrays | None = None
    bytes_up: int | None = None

    def to_metrics(self) -> dict:
        out = {"partition-id": self.partition_id, "num-examples": self.num_examples, "train-loss": self.train_loss,
               "seconds": self.seconds, "peak-rss-mb": self.peak_rss_mb}
        for key, value in (("model-rss-mb", self.model_rss_mb), ("loss-first", self.loss_first),
                           ("loss-last", self.loss_last)):
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_metrics(cls, metrics, arrays: Arrays | None = None, bytes_up: int | None = None) -> TrainReply:
        m = dict(metrics)
        optional = {k: float(m[k]) if k in m else None for k in ("model-rss-mb", "loss-first", "loss-last")}
        return cls(int(m["partition-id"]), int(m["num-examples"]), float(m["train-loss"]), float(m["seconds"]),
                   float(m["peak-rss-mb"]), optional["model-rss-mb"], optional["loss-first"], optional["loss-last"],
                   arrays, bytes_up)

    def reply_to(self, msg: Message) -> Message:
        return Message(RecordDict({ARRAYS: to_record(self.arrays or {}), METRICS: MetricRecord(self.to_metrics())}),
                       reply_to=msg)

    @classmethod
    def from_message(cls, reply: Message) -> TrainReply:
        record = reply.content[ARRAYS]
        return cls.from_metrics(reply.content[METRICS], from_record(record), payload_bytes(record))


SPLIT, SPLIT_TENSOR = "split", "split-tensor"
SPLIT_MESSAGE_TYPE = f"{MessageType.TRAIN}.split"


@dataclass(frozen=True)
class SplitStep:
    """One step's message of split training (split_device.py): `front` asks for this step's features
    at the first cut (carrying the previous step's gradient there, if any; the round's first also
    carries the TrainInstruction and the adapter view), `tail` carries the features at the second cut.
    A `front` with step == the round's steps asks for no features: the device applies the last
    gradient and replies with its TrainReply."""

    kind: str
    step: int
    tensor: np.ndarray | None = None

    def to_message(self, node: int, start: Message | None = None) -> tuple[Message, int]:
        """The message and the bytes of the tensor it carries."""
        content = RecordDict(dict(start.content.items())) if start is not None else RecordDict()
        content[SPLIT] = ConfigRecord({"kind": self.kind, "step": self.step})
        size = 0
        if self.tensor is not None:
            record = to_record({"tensor": self.tensor})
            content[SPLIT_TENSOR] = record
            size = payload_bytes(record)
        return Message(content, dst_node_id=node, message_type=SPLIT_MESSAGE_TYPE), size

    @classmethod
    def from_message(cls, msg: Message) -> tuple[SplitStep, TrainInstruction | None, Arrays | None]:
        """The step, and for the round's first message the instruction and adapter view."""
        config = msg.content[SPLIT]
        tensor = from_record(msg.content[SPLIT_TENSOR])["tensor"] if SPLIT_TENSOR in msg.content else None
        step = cls(str(config["kind"]), int(config["step"]), tensor)
        if CONFIG in msg.content:
            return step, *TrainInstruction.from_message(msg)
        return step, None, None


@dataclass(frozen=True)
class SplitAnswer:
    """A device's answer to a SplitStep: the tensor for the server (features, or their gradient),
    the step's loss (tail), and what the job measured."""

    partition_id: int
    tensor: np.ndarray
    seconds: float
    peak_rss_mb: float
    loss: float | None = None

    def reply_to(self, msg: Message) -> Message:
        metrics = {"partition-id": self.partition_id, "seconds": self.seconds, "peak-rss-mb": self.peak_rss_mb}
        if self.loss is not None:
            metrics["loss"] = self.loss
        return Message(RecordDict({SPLIT_TENSOR: to_record({"tensor": self.tensor}), METRICS: MetricRecord(metrics)}),
                       reply_to=msg)

    @classmethod
    def from_message(cls, reply: Message) -> tuple[SplitAnswer, int]:
        """The answer and the bytes of its tensor."""
        m, record = reply.content[METRICS], reply.content[SPLIT_TENSOR]
        return cls(int(m["partition-id"]), from_record(record)["tensor"], float(m["seconds"]), float(m["peak-rss-mb"]),
                   float(m["loss"]) if "loss" in m else None), payload_bytes(record)
