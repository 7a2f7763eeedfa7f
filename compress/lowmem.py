"""`--low-memory`: compress a safetensors checkpoint holding one decoder layer in memory at a time.

The model is built on the meta device; the embedding rows the calibration text uses, the final
norm and the rotary tables are materialised; each decoder layer is loaded from safetensors when
the stream reaches it, run, pruned, written to its own output shard and released. Two passes:
the first measures block influence (and the per-layer error curves for the 'error' allocation),
the second prunes. Peak memory is about one layer (in float32) plus its calibration statistics,
independent of depth."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from llmprune.arch import adapter_for, base_model
from llmprune.data import load_texts
from llmprune.errors import LLMPruneError
from llmprune.memory import peak_rss_mb
from llmprune.models import load_config, load_tokenizer, resolve_model_spec

from .budget import Plan, layer_params, make_plan
from .calibration import block_influence, capture_inputs, collect_grams, run_layer
from llmprune.checkpoint import MODELING_FILE, PRUNED_CLASS, REPORT_FILE, atomic_output_dir, modeling_source, pruned_class
from llmprune.checkpoint import layer_shape
from .config import CompressConfig
from .layer import LayerStats, prune_layer
from .safetensors_io import copy_tensors, read_header
from .pruner import CompressResult, calibration_windows, use_error_allocation

log = logging.getLogger(__name__)


class LazyCheckpoint:
    """Tensor name -> file for a (possibly sharded) safetensors folder; tensors read on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.files = {k: folder / "model.safetensors" for k in f.keys()}
        else:
            raise LLMPruneError(f"--low-memory needs safetensors weights in '{folder}'", "save the model with safe_serialization=True")

    def total_params(self) -> int:
        """Parameters stored in the checkpoint (a tied head is stored, and counted, once)."""
        total = 0
        for path in set(self.files.values()):
            header, _ = read_header(path)
            total += sum(int(torch.Size(v["shape"]).numel()) for k, v in header.items() if k != "__metadata__")
        return total

    def names(self, prefix: str) -> list[str]:
        return [k for k in self.files if k.startswith(prefix)]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Selected rows of a 2-D tensor without reading the whole tensor."""
        with safe_open(self.files[name], "pt") as f:
            view = f.get_slice(name)
            return torch.stack([view[int(i) : int(i) + 1][0] for i in ids])


def _materialise(module: nn.Module, ckpt: LazyCheckpoint, prefix: str, dtype: torch.dtype) -> None:
    """Allocate a meta module on the CPU and fill its parameters from the checkpoint (buffers are
    recomputed by _reset_buffers)."""
    module.to_empty(device="cpu")
    for name, param in module.named_parameters():
        tensor = ckpt.get(prefix + name).to(dtype)
        with torch.no_grad():
            param.data = tensor


def _reset_buffers(module: nn.Module, config) -> None:
    """Recompute the non-persistent buffers that to_empty leaves uninitialised: rotary inverse
    frequencies, and Gemma's embedding scale (√hidden_size)."""
    for child in module.modules():
        if hasattr(child, "inv_freq") and hasattr(child, "rope_init_fn"):
            inv_freq, scaling = child.rope_init_fn(child.config, torch.device("cpu"))
            child.inv_freq = inv_freq
            child.original_inv_freq = inv_freq
            child.attention_scaling = scaling
        if isinstance(getattr(child, "embed_scale", None), torch.Tensor):
            child.embed_scale = torch.tensor(config.hidden_size**0.5)


def _prefix_of(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("module not found")


def _head_loss(hidden: torch.Tensor, ids: torch.Tensor, norm: nn.Module, ckpt: LazyCheckpoint, head_name: str,
               softcap, vocab_chunk: int = 16384) -> float:
    """Mean next-token NLL from final hidden states, reading the LM head from the checkpoint a
    slice of the vocabulary at a time (running log-sum-exp), so the head never sits in memory."""
    with torch.inference_mode():
        h = norm(hidden)[:, :-1].reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float64)
        target_logit = torch.zeros(h.shape[0], dtype=torch.float64)
        with safe_open(ckpt.files[head_name], "pt") as f:
            view = f.get_slice(head_name)
            vocab = view.get_shape()[0]
            for lo in range(0, vocab, vocab_chunk):
                w = view[lo : lo + vocab_chunk].float()
                for t in range(0, h.shape[0], 512):
                    logits = h[t : t + 512] @ w.T
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    lse[t : t + 512] = torch.logaddexp(lse[t : t + 512], torch.logsumexp(logits.double(), dim=1))
                    local = targets[t : t + 512] - lo
                    hit = (local >= 0) & (local < w.shape[0])
                    rows = torch.nonzero(hit).flatten()
                    target_logit[t + rows] = logits[rows, local[rows]].double()
    return float((lse - target_logit).mean())


def compress_low_memory(spec, cfg: CompressConfig, calib="self", out=None, overwrite: bool = False,
                        versions: dict | None = None) -> CompressResult:
    """Compress the safetensors checkpoint `spec` into `out`, one decoder layer in memory at a time."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    if out is None:
        raise LLMPruneError("--low-memory writes the checkpoint as it goes", "pass --out")
    source = resolve_model_spec(spec)
    if source.kind != "folder":
        raise LLMPruneError(f"--low-memory needs a local safetensors folder, not a {source.kind} spec", "convert the model to a folder first (llmprune.load + save_pretrained)")
    if isinstance(calib, str) and calib == "self":
        raise LLMPruneError("--low-memory cannot generate its own calibration text (that needs the whole model)", "pass --calib with a text file or dataset")
    folder = Path(source.path)
    config = load_config(source)
    tokenizer = load_tokenizer(source)
    ckpt = LazyCheckpoint(folder)
    texts = calib if isinstance(calib, list) else load_texts(calib)
    calib_ids, held_out, held_out_ok = calibration_windows(tokenizer, texts, cfg)
    torch.manual_seed(cfg.seed)

    out_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(out_dtype, str):
        out_dtype = getattr(torch, out_dtype)
    config._attn_implementation = "sdpa"
    stock = AutoModelForCausalLM._model_mapping[type(config)]
    cls = pruned_class(stock) if getattr(config, "llmprune", None) else stock
    with torch.device("meta"):
        model = cls(config)
    model.eval()
    adapter = adapter_for(model)
    base = base_model(model)
    layers = adapter.decoder_layers(model)
    prefix = _prefix_of(model, base)
    n_layers = len(layers)

    # Only the embedding rows the calibration windows use are read (ids remapped onto them).
    all_ids = torch.cat([calib_ids, held_out])
    vocab, remapped = torch.unique(all_ids, return_inverse=True)
    embed = base.get_input_embeddings()
    embed.to_empty(device="cpu")
    embed.weight = nn.Parameter(ckpt.rows(prefix + "embed_tokens.weight", vocab).float(), requires_grad=False)
    for name, child in base.named_children():
        if name not in ("layers", "embed_tokens"):
            _materialise(child, ckpt, f"{prefix}{name}.", torch.float32)
    _reset_buffers(base, config)
    stream = capture_inputs(model, remapped, cfg.batch_size)
    n_calib = calib_ids.shape[0]
    hidden0 = stream.hidden
    embed.weight = nn.Parameter(torch.empty(0, 0), requires_grad=False)

    def load_layer(i: int) -> nn.Module:
        layer = layers[i]
        _materialise(layer, ckpt, f"{prefix}layers.{i}.", torch.float32)
        return layer

    def release(i: int) -> None:
        layers[i].to("meta")

    # Pass 1: block influence (and error curves), dense held-out hidden states.
    influence, curves = [], {}
    hidden, held = hidden0[:n_calib], hidden0[n_calib:]
    want_curves = use_error_allocation(cfg, calib_ids.numel(), layers)
    for i in tqdm(range(n_layers), desc="pass 1: block influence", unit="layer", leave=False):
        layer = load_layer(i)
        targets = {"mlp": layer.mlp.down_proj} if want_curves else {}
        with collect_grams(targets) as grams:
            out_hidden = run_layer(layer, hidden, stream.layer_kwargs[i], cfg.batch_size)
        influence.append(block_influence(hidden, out_hidden))
        held = run_layer(layer, held, stream.layer_kwargs[i], cfg.batch_size)
        hidden = out_hidden
        down = layer.mlp.down_proj.weight.detach().clone()
        release(i)  # the error curve needs only down_proj: free the layer first
        if want_curves:
            curves[i] = LayerStats(mlp=grams["mlp"]).pivots(down, cfg.selection)[1]
        del grams, down
    head_name = prefix + "embed_tokens.weight" if getattr(config, "tie_word_embeddings", False) else "lm_head.weight"
    softcap = getattr(config, "final_logit_softcapping", None)
    held_ids = held_out
    dense_loss = _head_loss(held, held_ids, base.norm, ckpt, head_name, softcap)

    share = cfg.effective_layer_share
    if share == "auto":
        log.info("--low-memory: the auto split would need a full pruned pass per candidate; dropping no whole "
                 "layers (pass --layer-share F to drop some)")
        share = 0.0
    total = sum(layer_params(l) for l in layers)
    n_drop = int(min(n_layers - 1, (float(share) * cfg.ratio * total) // layer_params(layers[-1])))
    head_ratio = (cfg.head_ratio if cfg.head_ratio is not None else cfg.ratio) if cfg.prune_heads else None
    plan: Plan = make_plan(list(layers), influence, cfg.ratio, n_drop, head_ratio, output_bias=cfg.uses_intercept,
                           curves=curves or None, min_keep=cfg.min_keep)
    kept = [i for i in range(n_layers) if i not in plan.drop]
    layer_map_in = (getattr(config, "llmprune", None) or {}).get("layer_map") or list(range(n_layers))

    # Pass 2: prune each kept layer from its dense inputs; write it; stream the pruned held-out text.
    rows, shapes, weight_map, total_size = [], [], {}, 0
    params_after_layers = 0
    with atomic_output_dir(out, overwrite) as tmp:
        hidden, held_p = hidden0[:n_calib], hidden0[n_calib:]
        for i in tqdm(range(n_layers), desc="pass 2: prune", unit="layer"):
            layer = load_layer(i)
            row = {"original_index": layer_map_in[i], "block_influence": influence[i], "dropped": i in plan.drop,
                   "neurons_before": layer.mlp.down_proj.in_features,
                   "heads_before": layer.self_attn.q_proj.out_features // layer.self_attn.head_dim}
            if i in plan.drop:
                hidden = run_layer(layer, hidden, stream.layer_kwargs[i], cfg.batch_size)
                release(i)
                rows.append(row)
                continue
            targets = {"mlp": layer.mlp.down_proj}
            if i in plan.keep_heads:
                targets["attn"] = layer.self_attn.o_proj
            with collect_grams(targets) as grams:
                out_hidden = run_layer(layer, hidden, stream.layer_kwargs[i], cfg.batch_size)
            stats = LayerStats(mlp=grams["mlp"], attn=grams.get("attn"))
            detail = prune_layer(layer, stats, cfg, i, plan.keep_neurons.get(i), plan.keep_heads.get(i), release_stats=True)
            detail.pop("kept_neuron_indices", None)
            new_idx = kept.index(i)
            layer.layer_idx = new_idx
            held_p = run_layer(layer, held_p, stream.layer_kwargs[i], cfg.batch_size)
            shapes.append(layer_shape(layer))
            row.update(neurons_after=layer.mlp.down_proj.in_features,
                       heads_after=layer.self_attn.q_proj.out_features // layer.self_attn.head_dim, **detail)
            rows.append(row)
            shard = f"model-layer-{new_idx:05d}.safetensors"
            tensors = {f"{prefix}layers.{new_idx}.{k}": v.detach().to(out_dtype).contiguous() for k, v in layer.state_dict().items()}
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
            for k, v in tensors.items():
                weight_map[k] = shard
                total_size += v.numel() * v.element_size()
            params_after_layers += sum(p.numel() for p in layer.parameters())
            hidden = out_hidden
            del layer, stats, grams, tensors, detail
            release(i)
        # Everything outside the decoder layers is streamed over byte for byte.
        rest = {k: ckpt.files[k] for k in ckpt.files if not k.startswith(f"{prefix}layers.")}
        total_size += copy_tensors(rest, tmp / "model-rest.safetensors")
        weight_map.update({k: "model-rest.safetensors" for k in rest})
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=1))
        pruned_loss = _head_loss(held_p, held_ids, base.norm, ckpt, head_name, softcap)
        # No before-tuning loss here: it would need an untuned copy of every layer in memory.
        untuned_loss = None
        before_total = ckpt.total_params()
        before_layers = total
        report = {
            "method": cfg.method, "config": cfg.to_dict(), "low_memory": True,
            "ratio_requested": cfg.ratio,
            "ratio_achieved": 1.0 - params_after_layers / before_layers,
            "params_before": {"decoder_layers": before_layers},
            "params_after": {"decoder_layers": params_after_layers},
            "layers_dropped": [layer_map_in[i] for i in plan.drop],
            "split_candidates": [{"layers_dropped": [layer_map_in[i] for i in plan.drop], "calibration_loss": pruned_loss}],
            "calibration": {"windows": n_calib, "seq_len": cfg.calib_seq_len, "loss_windows": int(held_out.shape[0]),
                            "loss_held_out": held_out_ok},
            "calibration_loss": {"dense": dense_loss, "pruned_before_tuning": untuned_loss, "pruned": pruned_loss},
            "layers": rows, "layer_map": [layer_map_in[i] for i in kept],
            "model": str(spec), "calibration_data": str(calib) if not isinstance(calib, list) else "texts",
            "seed": cfg.seed, "versions": versions or {},
        }
        _write_config(config, stock, kept, shapes, report["layer_map"], tmp, folder)
        removed_layers = before_layers - params_after_layers
        report["params_before"]["total"] = before_total
        report["params_after"]["total"] = before_total - removed_layers
        report["total_reduction"] = removed_layers / before_total
        tokenizer.save_pretrained(tmp)
        report["peak_rss_mb"] = peak_rss_mb()
        report["seconds"] = time.perf_counter() - start
        report["out"] = str(out)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    return CompressResult(model=None, report=report)


def _write_config(config, stock_cls, kept: list[int], shapes: list[dict], layer_map: list[int], tmp: Path, source: Path) -> None:
    """config.json of the pruned checkpoint, the modeling file and the generation config."""
    n_input_layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    previous = getattr(config, "llmprune", None) or {}
    config.num_hidden_layers = len(kept)
    if types:
        config.layer_types = [types[i] for i in kept]
    config.llmprune = {
        "format_version": 1, "layers": shapes, "layer_map": layer_map,
        "original_num_hidden_layers": previous.get("original_num_hidden_layers") or n_input_layers,
        "source": previous.get("source", str(source)),
    }
    config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{PRUNED_CLASS}"}
    config.architectures = [stock_cls.__name__]
    config.save_pretrained(tmp)
    (tmp / MODELING_FILE).write_text(modeling_source(stock_cls))
    if (source / "generation_config.json").is_file():
        (tmp / "generation_config.json").write_text((source / "generation_config.json").read_text())
