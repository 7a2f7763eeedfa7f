"""Device fleets: a file of devices with memory budgets, and for each device the LoRA rank and
depth (how many top layers carry LoRA) whose training fits its budget by an explicit estimate.

Fleet file (TOML or JSON):

    [[device]]                    # or JSON {"devices": [{...}, ...]}
    name = "pixel-6"
    memory_mb = 3000              # what training may use on the device
    speed = 1.0                   # optional: relative speed, scales local steps
    count = 2                     # optional: that many identical devices

Clients take the devices in order (client i gets device i, cycling when there are fewer)."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from llmprune.errors import LLMPruneError

from .lora import module_shapes, top_layer_modules

RUNTIME_OVERHEAD_MB = 500.0      # Python, torch, transformers, peft, flwr: ~430 MB measured, plus slack
LOSS_CHUNK = 64                  # positions whose full-vocabulary logits exist at once
ADAM_BYTES_PER_PARAM = 16        # fp32 weight + grad + two Adam moments
DEVICE_KEYS = ("name", "memory_mb", "speed", "count", "rank", "depth")


@dataclass
class Device:
    name: str
    memory_mb: float
    speed: float = 1.0
    rank: int | None = None      # optional fixed choices instead of the estimate's
    depth: int | None = None


@dataclass
class Assignment:
    """What one device trains, and the estimate that justified it."""

    device: str
    memory_mb: float | None
    speed: float
    rank: int
    depth: int
    estimate_mb: float
    lora_params: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_fleet(path: str | Path) -> list[Device]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LLMPruneError(f"cannot read fleet file '{path}': {exc.strerror}", "pass an existing TOML or JSON file to --fleet")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LLMPruneError(f"fleet file '{path}' is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}",
                            "see docs/recover.md for the fleet format")
    rows = data if isinstance(data, list) else data.get("devices", data.get("device"))
    if not isinstance(rows, list) or not rows:
        raise LLMPruneError(f"fleet file '{path}' lists no devices", "add [[device]] entries with name and memory_mb")
    devices = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "memory_mb" not in row:
            raise LLMPruneError(f"fleet file '{path}': device {i + 1} has no memory_mb", "give every device a memory_mb")
        name = str(row.get("name", f"device-{i + 1}"))
        unknown = [k for k in row if k not in DEVICE_KEYS]
        if unknown:
            raise LLMPruneError(f"fleet file '{path}': device '{name}' has unknown key '{unknown[0]}'",
                                f"the keys of a device are {', '.join(DEVICE_KEYS)}")
        fixed = {}
        for key in ("rank", "depth"):
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LLMPruneError(f"fleet file '{path}': device '{name}' has {key} = {value!r}",
                                    f"give {key} as a whole number of at least 1, or leave it out to let the "
                                    "memory estimate choose")
            fixed[key] = value
        count = row.get("count", 1)
        if isinstance(count, bool) or isinstance(count, float) or (isinstance(count, str) and not count.strip().isdigit()):
            raise LLMPruneError(f"fleet file '{path}': device '{name}' has count = {count!r}",
                                "give count as a whole number of at least 1")
        try:
            memory, speed, count = float(row["memory_mb"]), float(row.get("speed", 1.0)), int(count)
        except (TypeError, ValueError):
            raise LLMPruneError(f"fleet file '{path}': device '{name}' has a non-numeric memory_mb, speed or count",
                                "use numbers") from None
        if memory <= 0 or speed <= 0 or count < 1:
            raise LLMPruneError(f"fleet file '{path}': device '{name}' needs memory_mb > 0, speed > 0, count >= 1",
                                "fix the device entry")
        for k in range(count):
            devices.append(Device(name if count == 1 else f"{name}-{k + 1}", memory, speed, fixed["rank"], fixed["depth"]))
    return devices


def training_memory_mb(model: nn.Module, rank: int, depth: int, batch_size: int, seq_len: int,
                       target_modules: tuple[str, ...]) -> tuple[float, int]:
    """Estimated peak MB of LoRA training on a device, and the LoRA parameter count.

    weights (all parameters, their dtype) + LoRA weights, grads and Adam state (16 B/param)
    + activations kept for backward, only in the `depth` top layers (nothing below the lowest
    LoRA layer needs a gradient): per token about 24 x hidden + 6 x MLP width floats per layer,
    plus the attention probabilities (2 x heads x seq_len floats per token) — coefficients fitted
    to measured training peaks of pruned Gemma-3-270M (4 settings, within 3%; docs/recover.md)
    + one chunk of full-vocabulary logits with its softmax and gradient (the loss is chunked)
    + the runtime floor."""
    config = model.config
    shapes = module_shapes(model, target_modules)
    modules = top_layer_modules(shapes, depth)
    lora_params = sum(rank * (shapes[m][0] + shapes[m][1]) for m in modules)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = config.hidden_size
    tokens = batch_size * (seq_len + 1)
    layers = sorted({int(m.split(".", 1)[0]) for m in modules})
    act = 0.0
    for layer in layers:
        mlp = shapes.get(f"{layer}.mlp.gate_proj", shapes.get(f"{layer}.mlp.up_proj", (4 * hidden, hidden)))[0]
        heads = shapes.get(f"{layer}.self_attn.q_proj", (config.num_attention_heads * _head_dim(config), hidden))[0] // _head_dim(config)
        act += 4.0 * tokens * (24 * hidden + 6 * mlp + 2 * heads * (seq_len + 1))
    logits = 4.0 * LOSS_CHUNK * config.vocab_size * 3
    total = weight_bytes + lora_params * ADAM_BYTES_PER_PARAM + act + logits
    return total / 2**20 + RUNTIME_OVERHEAD_MB, lora_params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_ranks(aggregation: str, ranks: set[int]) -> None:
    """Refuse different device ranks when the aggregation needs one rank (fedavg averages A and B
    as they are)."""
    from .aggregations.base import get_aggregation, mixed_rank_names, names_text

    if len(ranks) > 1 and not get_aggregation(aggregation).mixed_ranks:
        raise LLMPruneError(f"the fleet gives devices different LoRA ranks; {aggregation} needs one rank",
                            f"use --aggregation {names_text(mixed_rank_names())}")


def candidate_ranks(max_rank: int) -> list[int]:
    ranks, r = {max_rank}, 1
    while r < max_rank:
        ranks.add(r)
        r *= 2
    return sorted(ranks, reverse=True)


def assign_devices(model: nn.Module, devices: list[Device], max_rank: int, batch_size: int, seq_len: int,
                   target_modules: tuple[str, ...]) -> list[Assignment]:
    """For each device the (rank, depth) with the most LoRA parameters whose estimate fits its
    budget (ties: the deeper one). A device nothing fits on is an error naming the budget needed."""
    num_layers = len({int(m.split(".", 1)[0]) for m in module_shapes(model, target_modules)})
    cache: dict[tuple[int, int], tuple[float, int]] = {}

    def estimate(rank: int, depth: int) -> tuple[float, int]:
        if (rank, depth) not in cache:
            cache[(rank, depth)] = training_memory_mb(model, rank, depth, batch_size, seq_len, target_modules)
        return cache[(rank, depth)]

    out = []
    for dev in devices:
        ranks = [dev.rank] if dev.rank else candidate_ranks(max_rank)
        depths = [min(dev.depth, num_layers)] if dev.depth else list(range(num_layers, 0, -1))
        best = None
        for rank in ranks:
            for depth in depths:
                mb, params = estimate(rank, depth)
                if mb <= dev.memory_mb and (best is None or (params, depth) > (best[3], best[1])):
                    best = (rank, depth, mb, params)
        if best is None:
            need = math.ceil(min(estimate(r, d)[0] for r in ranks for d in depths))  # rounded up: that budget fits
            raise LLMPruneError(
                f"device '{dev.name}' has {dev.memory_mb:.0f} MB but the smallest LoRA setup "
                f"(rank {min(ranks)}, {min(depths)} layer) needs about {need} MB",
                f"raise its memory_mb to at least {need}, or lower --batch-size/--seq-len")
        rank, depth, mb, params = best
        out.append(Assignment(dev.name, dev.memory_mb, dev.speed, rank, depth, round(mb, 1), params))
    return out


def uniform_assignments(model: nn.Module, clients: int, rank: int, batch_size: int, seq_len: int,
                        target_modules: tuple[str, ...]) -> list[Assignment]:
    """No fleet file: every client trains rank `rank` on all layers (the estimate is still reported)."""
    depth = len({int(m.split(".", 1)[0]) for m in module_shapes(model, target_modules)})
    mb, params = training_memory_mb(model, rank, depth, batch_size, seq_len, target_modules)
    return [Assignment(f"client-{i}", None, 1.0, rank, depth, round(mb, 1), params) for i in range(clients)]


def plan_devices(model: nn.Module, cfg, count: int) -> list[Assignment]:
    """The assignments of `count` clients (at least; every device of the fleet file when it lists
    more): the fleet file's devices by their budgets, cycling when there are fewer, or without one
    `cfg.lora_rank` on all layers for every client. The one planner: `llmprune recover` runs it on
    the meta model before Flower starts, the ServerApp on the loaded model."""
    if cfg.fleet:
        plans = assign_devices(model, load_fleet(cfg.fleet), cfg.lora_rank, cfg.batch_size, cfg.seq_len,
                               cfg.target_modules)
        return [plans[i % len(plans)] for i in range(count)] if len(plans) < count else plans
    return uniform_assignments(model, count, cfg.lora_rank, cfg.batch_size, cfg.seq_len, cfg.target_modules)
