"""Device fleets: a file of devices with memory budgets, and for each device the LoRA rank and
depth (how many top layers carry LoRA) whose training fits its budget by an explicit estimate.

Fleet file (TOML or JSON):

    [[device]]                    # or JSON {"devices": [{...}, ...]}
    name = "pixel-6"
    memory_mb = 3000              # what training may use on the device (optional with --policy bandit:
                                  #   an undeclared device starts from the smallest arm)
    speed = 1.0                   # optional: relative speed, scales local steps
    count = 2                     # optional: that many identical devices
    oom_mb = 900                  # simulation only (--emulate-speed): the device's true limit, which
                                  #   the server is never told; the client fails past it

Clients take the devices in order (client i gets device i, cycling when there are fewer)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import tomllib
from torch import nn

from llmprune.errors import LLMPruneError

from .device_models import DeviceModel
from .lora import module_shapes, top_layer_modules

RUNTIME_OVERHEAD_MB = 500.0      # Python, torch, transformers, peft, flwr: ~430 MB measured, plus slack
LOSS_CHUNK = 64                  # positions whose full-vocabulary logits exist at once
ADAM_BYTES_PER_PARAM = 16        # fp32 weight + grad + two Adam moments
DEVICE_KEYS = ("name", "memory_mb", "speed", "count", "rank", "depth", "oom_mb")
# Bounds of a fleet file's numbers: past them a typo, not a device (a count of 1e9 would build a
# billion plans; a speed of 1e9 a billion local steps).
MAX_MEMORY_MB, MAX_SPEED, MAX_COUNT = 16 * 2**20, 100.0, 10_000


@dataclass
class Device:
    name: str
    memory_mb: float | None      # None: not declared (only the bandit can plan for it)
    speed: float = 1.0
    rank: int | None = None      # optional fixed choices instead of the estimate's
    depth: int | None = None
    oom_mb: float | None = None  # simulation: the true limit past which the client fails (never planned with)


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
    units: int | None = None          # submodels: how many units (layers or blocks) the device holds
    device_model: DeviceModel | None = None   # what it builds this round; None: the checkpoint as it is
    refused: str = ""                 # why the device is left out (--skip-unfit), else ""

    def to_dict(self) -> dict:
        out = asdict(replace(self, device_model=None))
        del out["device_model"]
        out["submodel"] = self.device_model.describe() if self.device_model is not None else None
        return out

    def modules(self, shapes: dict[str, tuple[int, int]]) -> list[str]:
        """The global adapter's modules this device trains: its device model's, else the top `depth` layers'."""
        if self.device_model is not None:
            return self.device_model.modules(shapes)
        return top_layer_modules(shapes, self.depth)


def _number(path: Path, name: str, key: str, value, high: float) -> float | None:
    """A device's number: an int or float (not text, not a boolean), finite, above 0 and at most
    `high`; None when the key is absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
        raise LLMPruneError(f"fleet file '{path}': device '{name}' has {key} = {value!r}",
                            f"give {key} as a number above 0 and at most {high:g}")
    return float(value)


def load_fleet(path: str | Path) -> list[Device]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LLMPruneError(f"cannot read fleet file '{path}': {exc.strerror}",
                            "pass an existing TOML or JSON file to --fleet") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LLMPruneError(f"fleet file '{path}' is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}",
                            "see docs/recover.md for the fleet format") from None
    rows = data if isinstance(data, list) else data.get("devices", data.get("device"))
    if not isinstance(rows, list) or not rows:
        raise LLMPruneError(f"fleet file '{path}' lists no devices", "add [[device]] entries with name and memory_mb")
    devices, names = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise LLMPruneError(f"fleet file '{path}': device {i + 1} is not a table", "see docs/recover.md for the format")
        name = row.get("name", f"device-{i + 1}")
        if not isinstance(name, str) or not name.strip():
            raise LLMPruneError(f"fleet file '{path}': device {i + 1} has name = {name!r}", "give each device a name as text")
        if name in names:
            raise LLMPruneError(f"fleet file '{path}': two devices are named '{name}'",
                                "give each device its own name (count = N makes N devices of one entry)")
        names.add(name)
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
        memory = _number(path, name, "memory_mb", row.get("memory_mb"), MAX_MEMORY_MB)
        oom = _number(path, name, "oom_mb", row.get("oom_mb"), MAX_MEMORY_MB)
        speed = _number(path, name, "speed", row.get("speed", 1.0), MAX_SPEED)
        count = row.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
            raise LLMPruneError(f"fleet file '{path}': device '{name}' has count = {count!r}",
                                f"give count as a whole number from 1 to {MAX_COUNT}")
        for k in range(count):
            devices.append(Device(name if count == 1 else f"{name}-{k + 1}", memory, speed, fixed["rank"], fixed["depth"],
                                  oom))
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
        q_out = shapes.get(f"{layer}.self_attn.q_proj", (config.num_attention_heads * _head_dim(config), hidden))[0]
        heads = q_out // _head_dim(config)
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
                   target_modules: tuple[str, ...], skip_unfit: bool = False) -> list[Assignment]:
    """For each device the (rank, depth) with the most LoRA parameters whose estimate fits its
    budget (ties: the deeper one). A device nothing fits on is an error naming the budget needed
    (with `skip_unfit`: an Assignment marked refused)."""
    num_layers = len({int(m.split(".", 1)[0]) for m in module_shapes(model, target_modules)})
    cache: dict[tuple[int, int], tuple[float, int]] = {}

    def estimate(rank: int, depth: int) -> tuple[float, int]:
        if (rank, depth) not in cache:
            cache[(rank, depth)] = training_memory_mb(model, rank, depth, batch_size, seq_len, target_modules)
        return cache[(rank, depth)]

    return _assign_rank_depth(devices, max_rank, num_layers, estimate, skip_unfit)


def _assign_rank_depth(devices: list[Device], max_rank: int, num_layers: int, estimate, skip_unfit: bool
                       ) -> list[Assignment]:
    """Per device the (rank, depth) with the most LoRA parameters whose `estimate(rank, depth)`
    -> (MB, LoRA parameters) fits its budget (ties: the deeper one); one nothing fits is an error
    naming the budget needed, or with `skip_unfit` an Assignment marked refused."""
    out = []
    for dev in devices:
        ranks = [dev.rank] if dev.rank else candidate_ranks(max_rank)
        depths = [min(dev.depth, num_layers)] if dev.depth else list(range(num_layers, 0, -1))
        best = None
        for rank in ranks:
            for depth in depths:
                mb, params = estimate(rank, depth)
                if _fits(mb, dev.memory_mb) and (best is None or (params, depth) > (best[3], best[1])):
                    best = (rank, depth, mb, params)
        if best is None:
            need = math.ceil(min(estimate(r, d)[0] for r in ranks for d in depths))  # rounded up: that budget fits
            out.append(_unfit(dev, need, f"the smallest LoRA setup (rank {min(ranks)}, {min(depths)} layer)", skip_unfit))
            continue
        rank, depth, mb, params = best
        out.append(Assignment(dev.name, dev.memory_mb, dev.speed, rank, depth, round(mb, 1), params))
    return out


def uniform_assignments(model: nn.Module, clients: int, rank: int, batch_size: int, seq_len: int,
                        target_modules: tuple[str, ...]) -> list[Assignment]:
    """No fleet file: every client trains rank `rank` on all layers (the estimate is still reported)."""
    depth = len({int(m.split(".", 1)[0]) for m in module_shapes(model, target_modules)})
    mb, params = training_memory_mb(model, rank, depth, batch_size, seq_len, target_modules)
    return [Assignment(f"client-{i}", None, 1.0, rank, depth, round(mb, 1), params) for i in range(clients)]


def fleet_devices(cfg) -> list[Device] | None:
    """The devices of the run's fleet file, or None without one."""
    return load_fleet(cfg.fleet.file) if cfg.fleet.file else None


def cycled(plans: list[Assignment], count: int) -> list[Assignment]:
    """At least `count` assignments: client i gets device i, cycling when the fleet lists fewer
    (every device of the fleet when it lists more)."""
    if all(p.refused for p in plans):
        raise LLMPruneError(f"no device of the fleet fits ({plans[0].refused})",
                            "raise the devices' memory_mb, or lower --batch-size/--seq-len")
    return [plans[i % len(plans)] for i in range(count)] if len(plans) < count else plans


def plan_rank_depth(model: nn.Module, cfg, count: int) -> list[Assignment]:
    """The fixed plan: the fleet file's devices get the (rank, depth) their budgets fit (with the
    lean memory model when devices load lean), or without a fleet file `lora-rank` on all layers
    for every client. `llmprune recover` runs it on the meta model before Flower starts, the
    ServerApp on the loaded model."""
    training = cfg.training
    devices = fleet_devices(cfg)
    if devices is None:
        return uniform_assignments(model, count, training.lora_rank, training.batch_size, cfg.data.seq_len,
                                   training.target_modules)
    if cfg.lean_clients:
        plans = assign_lean_devices(unit_costs(model, cfg), devices, training.lora_rank, cfg.fleet.skip_unfit)
    else:
        plans = assign_devices(model, devices, training.lora_rank, training.batch_size, cfg.data.seq_len,
                               training.target_modules, cfg.fleet.skip_unfit)
    return cycled(plans, count)


# -- lean clients: only held blocks, base weights in client_dtype, the loss a vocabulary slice at a time ---
# Fitted to measured peaks of lean Gemma-3-270M clients (bench/submodels.py; docs/recover.md):
LEAN_ACT_BYTES = 4.0             # bytes per activation float kept for backward (LoRA paths compute in fp32)
LEAN_LOGIT_ELEMENTS = 2**22      # logits that exist at once in the vocabulary-sliced loss (16 MB in fp32)
LEAN_LOSS_BUFFERS = 4            # logits, softmax, its gradient and the dequantized head rows, per slice
LEAN_OVERHEAD_MB = 130.0         # allocator and load transients: measured peaks exceed the sum above by 103-132 MB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def vocab_chunk(positions: int, hidden: int) -> int:
    """Vocabulary rows per slice of the lean loss: at most LEAN_LOGIT_ELEMENTS logits, and as many
    elements of dequantized head rows, at once."""
    return max(256, LEAN_LOGIT_ELEMENTS // max(1, positions, hidden))


@dataclass
class UnitCosts:
    """Per-unit memory of a lean client (bytes), from the model's shapes: the units are layers
    (granularity layer) or attention and MLP blocks (sublayer: unit 2i, 2i+1)."""

    granularity: str
    weights: list[float]          # frozen weights of the unit at client dtype
    activations: list[float]      # activations kept for backward per training step
    lora_per_rank: list[int]      # LoRA parameters of the unit's modules per unit of rank
    fixed: float                  # embedding / head / final norm, always loaded
    loss: float                   # the vocabulary-sliced loss buffers
    layer_of: list[int] = field(default_factory=list)


def unit_costs(model: nn.Module, cfg, granularity: str = "layer") -> UnitCosts:
    """What each unit (a layer, or at sublayer granularity an attention or MLP block) costs a lean
    client; `model` may be on the meta device."""
    from llmprune.arch import adapter_for

    config, adapter = model.config, adapter_for(model)
    seq_len, embedding = cfg.data.seq_len, cfg.fleet.client_embedding
    dtype_bytes = DTYPE_BYTES[cfg.fleet.client_dtype]
    hidden, tokens = config.hidden_size, cfg.training.batch_size * (seq_len + 1)
    shapes = module_shapes(model, cfg.training.target_modules)
    weights, acts, lora, layer_of = [], [], [], []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        attn_params = sum(p.numel() for p in adapter.attention(layer).parameters())
        mlp_params = sum(p.numel() for p in adapter.mlp(layer).parameters())
        norm_params = sum(p.numel() for p in layer.parameters()) - attn_params - mlp_params
        mlp_width = adapter.mlp_projections(layer)["down_proj"].in_features
        heads = adapter.attention_projections(layer)["q_proj"].out_features // _head_dim(config)
        attn_act = LEAN_ACT_BYTES * tokens * (12 * hidden + 2 * heads * (seq_len + 1))
        mlp_act = LEAN_ACT_BYTES * tokens * (12 * hidden + 6 * mlp_width)
        lora_attn = sum(a + b for m, (a, b) in shapes.items() if m.startswith(f"{i}.self_attn."))
        lora_mlp = sum(a + b for m, (a, b) in shapes.items() if m.startswith(f"{i}.mlp."))
        parts = [(attn_params + norm_params / 2, attn_act, lora_attn), (mlp_params + norm_params / 2, mlp_act, lora_mlp)]
        if granularity == "layer":
            parts = [tuple(sum(x) for x in zip(*parts))]
        for w, a, l in parts:
            weights.append(w * dtype_bytes)
            acts.append(a)
            lora.append(int(l))
            layer_of.append(i)
    vocab = config.vocab_size
    table = vocab * hidden * (1 if embedding == "int8" else dtype_bytes) + (vocab * 4 if embedding == "int8" else 0)
    tied = getattr(config, "tie_word_embeddings", True)
    fixed = table + (0 if tied else vocab * hidden * dtype_bytes) + hidden * 4
    loss = 4.0 * LEAN_LOGIT_ELEMENTS * LEAN_LOSS_BUFFERS + 4.0 * tokens * hidden * 3
    return UnitCosts(granularity, weights, acts, lora, fixed, loss, layer_of)


def lean_memory_mb(costs: UnitCosts, units: list[int], lora_units: list[int], rank: int) -> tuple[float, int]:
    """Estimated peak MB of a lean client holding `units` with LoRA of `rank` on `lora_units`
    (backward runs from the lowest LoRA unit up, so only those units keep activations), and its
    LoRA parameter count."""
    lowest = min(lora_units) if lora_units else len(costs.weights)
    lora_params = rank * sum(costs.lora_per_rank[u] for u in lora_units)
    total = (costs.fixed + costs.loss + sum(costs.weights[u] for u in units)
             + sum(costs.activations[u] for u in units if u >= lowest) + lora_params * ADAM_BYTES_PER_PARAM)
    return total / 2**20 + RUNTIME_OVERHEAD_MB + LEAN_OVERHEAD_MB, lora_params


def largest_units(costs: UnitCosts, count: int, rank: int) -> list[int]:
    """The `count` costliest units at `rank`: a submodel of `count` units costs at most this."""
    cost = [costs.weights[u] + costs.activations[u] + rank * costs.lora_per_rank[u] * ADAM_BYTES_PER_PARAM
            for u in range(len(costs.weights))]
    return sorted(sorted(range(len(cost)), key=lambda u: (-cost[u], u))[:count])


def submodel_memory_mb(costs: UnitCosts, count: int, rank: int) -> tuple[float, int]:
    """The bound a device budget is held to: `count` units, LoRA on all of them, the costliest."""
    units = largest_units(costs, count, rank)
    return lean_memory_mb(costs, units, units, rank)


def assign_submodels(costs: UnitCosts, devices: list[Device], max_rank: int, skip_unfit: bool,
                     correction: dict[str, float] | None = None) -> list[Assignment]:
    """For each device the most units, then the highest rank, whose bound (times the device's
    measured/estimated `correction`) fits its budget. One that nothing fits is an error naming
    the budget that would fit, or with `skip_unfit` an Assignment marked refused."""
    n_units = len(costs.weights)
    out = []
    for dev in devices:
        factor = (correction or {}).get(dev.name, 1.0)
        ranks = [dev.rank] if dev.rank else candidate_ranks(max_rank)
        best = None
        for count in range(n_units, 0, -1):
            for rank in ranks:
                mb, params = submodel_memory_mb(costs, count, rank)
                if _fits(mb * factor, dev.memory_mb):
                    best = (count, rank, mb, params)
                    break
            if best:
                break
        if best is None:
            need = math.ceil(submodel_memory_mb(costs, 1, min(ranks))[0] * factor)
            what = f"the smallest submodel (1 {'layer' if costs.granularity == 'layer' else 'block'}, rank {min(ranks)})"
            out.append(_unfit(dev, need, what, skip_unfit))
            continue
        count, rank, mb, params = best
        out.append(Assignment(dev.name, dev.memory_mb, dev.speed, rank, n_units, round(mb * factor, 1), params, units=count))
    return out


def _fits(mb: float, budget: float | None) -> bool:
    """An estimate within a declared budget; a device that declares none is planned as if
    everything fits (only the bandit policy learns its limit instead)."""
    return budget is None or mb <= budget


def _unfit(dev: Device, need: int, what: str, skip_unfit: bool) -> Assignment:
    reason = f"device '{dev.name}' has {dev.memory_mb:.0f} MB but {what} needs about {need} MB"
    if not skip_unfit:
        raise LLMPruneError(reason, f"raise its memory_mb to at least {need}, lower --batch-size/--seq-len, "
                                    "or pass --skip-unfit to leave it out")
    return Assignment(dev.name, dev.memory_mb, dev.speed, 0, 0, float(need), 0, refused=f"{reason}; {need} MB would fit")


def assign_lean_devices(costs: UnitCosts, devices: list[Device], max_rank: int, skip_unfit: bool) -> list[Assignment]:
    """Lean clients holding the whole model: per device the (rank, depth) with the most LoRA
    parameters whose estimate fits (as assign_devices, with the lean memory model)."""
    n_layers = len(set(costs.layer_of))
    every_unit = list(range(len(costs.weights)))

    def estimate(rank: int, depth: int) -> tuple[float, int]:
        lora_units = [u for u, layer in enumerate(costs.layer_of) if layer >= n_layers - depth]
        return lean_memory_mb(costs, every_unit, lora_units, rank)

    return _assign_rank_depth(devices, max_rank, n_layers, estimate, skip_unfit)
