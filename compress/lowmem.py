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
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from llmprune.arch import adapter_for, base_model
from llmprune.checkpoint import (
    MODELING_FILE,
    REPORT_FILE,
    atomic_output_dir,
    carried_files,
    check_modeling_file,
    is_pruned_config,
    layer_shape,
    modeling_source,
    our_auto_map,
    pruned_spec,
    scrub_foreign_code,
    stock_class,
)
from llmprune.errors import LLMPruneError
from llmprune.meta_init import prefix_of as _prefix_of
from llmprune.meta_init import reset_buffers as _reset_buffers
from llmprune.models import load_config, load_tokenizer, resolve_model_spec
from llmprune.params import parameter_breakdown
from llmprune.paths import printable
from llmprune.reader import (
    TensorEntry,
    checkpoint_entries,
    find_tensor,
    gather_rows,
    load_tensor,
    meta_model,
    row_blocks,
)

from .calibration import block_influence, capture_inputs, collect_grams, run_layer
from .config import CompressConfig
from .layer import LayerStats
from .safetensors_io import copy_tensors

log = logging.getLogger(__name__)


def _materialise(module: nn.Module, entries: dict[str, TensorEntry], folder: Path, prefix: str,
                 dtype: torch.dtype) -> None:
    """Allocate a meta module on the CPU and fill its parameters from the checkpoint, each read and
    converted a row chunk at a time (buffers are recomputed by _reset_buffers)."""
    module.to_empty(device="cpu")
    for name, param in module.named_parameters():
        tensor = load_tensor(find_tensor(entries, prefix + name, folder, tuple(param.shape)), dtype)
        with torch.no_grad():
            param.data = tensor


def _head_loss(hidden: torch.Tensor, ids: torch.Tensor, norm: nn.Module, head: TensorEntry, softcap,
               vocab_chunk: int = 16384) -> float:
    """Mean next-token NLL from final hidden states, reading the LM head from the checkpoint a
    slice of the vocabulary at a time (running log-sum-exp), so the head never sits in memory."""
    with torch.inference_mode():
        h = norm(hidden)[:, :-1].reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float64)
        target_logit = torch.zeros(h.shape[0], dtype=torch.float64)
        for lo, block in row_blocks(head, vocab_chunk):
            w = block.float()
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


class StreamedSource:
    """A safetensors folder, one decoder layer in memory at a time: the model is built on the meta
    device, each layer is materialised when the stream reaches it and released after. The
    calibration pass measures block influence (and the error curves) only; a cut re-collects each
    layer's Grams as it prunes it (two passes, but never all layers' statistics at once)."""

    streamed = True
    can_search = False  # each candidate would be a full pruned pass: layer_share 'auto' drops no layer
    model = None

    def __init__(self, spec, cfg: CompressConfig):
        source = resolve_model_spec(spec)
        if source.kind != "folder":
            raise LLMPruneError(f"--low-memory needs a local safetensors folder, not a {source.kind} spec",
                                "convert the model to a folder first (llmprune.load + save_pretrained)")
        self.folder, self.description, self.cfg = Path(source.path), str(spec), cfg
        self.config = load_config(source)
        self.tokenizer = load_tokenizer(source)
        self.entries = checkpoint_entries(self.folder, source.fix)  # every header checked, no weight read
        if self.entries is None:
            raise LLMPruneError(f"--low-memory needs safetensors weights in '{printable(self.folder)}'",
                                "save the model with safe_serialization=True")
        self.config._attn_implementation = "sdpa"
        self.stock = stock_class(self.config)
        if is_pruned_config(self.config):
            check_modeling_file(self.folder, self.stock)  # a tampered modeling file: refused as llmprune.load does
        self.meta = meta_model(self.config).eval()
        self.params_before = parameter_breakdown(self.meta)  # from shapes: nothing is read
        self.base = base_model(self.meta)
        self.layers = adapter_for(self.meta).decoder_layers(self.meta)
        self.prefix = _prefix_of(self.meta, self.base)
        self.layer_map = (getattr(self.config, "llmprune", None) or {}).get("layer_map") or list(range(len(self.layers)))
        self._stream = None
        softcap = getattr(self.config, "final_logit_softcapping", None)
        tied = getattr(self.config, "tie_word_embeddings", False)
        head = find_tensor(self.entries, self.prefix + "embed_tokens.weight" if tied else "lm_head.weight", self.folder)
        self.head_loss = lambda hidden, ids: _head_loss(hidden, ids, self.base.norm, head, softcap)

    def stream(self, calib: torch.Tensor, held_out: torch.Tensor):
        """The embedded windows and every layer's call arguments (computed once per window set):
        only the embedding rows the windows use are read (ids remapped onto them)."""
        if self._stream is None or not torch.equal(self._stream[0], calib):
            all_ids = torch.cat([calib, held_out])
            vocab, remapped = torch.unique(all_ids, return_inverse=True)
            embed = self.base.get_input_embeddings()
            embed.to_empty(device="cpu")
            table = find_tensor(self.entries, self.prefix + "embed_tokens.weight", self.folder)
            embed.weight = nn.Parameter(gather_rows(table, vocab).float(), requires_grad=False)
            for name, child in self.base.named_children():
                if name not in ("layers", "embed_tokens"):
                    _materialise(child, self.entries, self.folder, f"{self.prefix}{name}.", torch.float32)
            _reset_buffers(self.base, self.config)
            captured = capture_inputs(self.meta, remapped, self.cfg.batch_size)
            embed.weight = nn.Parameter(torch.empty(0, 0), requires_grad=False)
            self._stream = (calib, captured)
        return self._stream[1]

    def load_layer(self, i: int) -> nn.Module:
        _materialise(self.layers[i], self.entries, self.folder, f"{self.prefix}layers.{i}.", torch.float32)
        return self.layers[i]

    def release(self, i: int) -> None:
        self.layers[i].to("meta")

    def calibrate(self, calib: torch.Tensor, held_out: torch.Tensor, cfg: CompressConfig, want_curves: bool) -> dict:
        """Pass 1: block influence (and error curves), the dense held-out loss."""
        stream = self.stream(calib, held_out)
        n_calib = calib.shape[0]
        hidden, held = stream.hidden[:n_calib], stream.hidden[n_calib:]
        influence, curves = [], {}
        for i in tqdm(range(len(self.layers)), desc="pass 1: block influence", unit="layer", leave=False):
            layer = self.load_layer(i)
            targets = {"mlp": layer.mlp.down_proj} if want_curves else {}
            with collect_grams(targets) as grams:
                out_hidden = run_layer(layer, hidden, stream.layer_kwargs[i], cfg.batch_size)
            influence.append(block_influence(hidden, out_hidden))
            held = run_layer(layer, held, stream.layer_kwargs[i], cfg.batch_size)
            hidden = out_hidden
            down = layer.mlp.down_proj.weight.detach().clone()
            self.release(i)  # the error curve needs only down_proj: free the layer first
            if want_curves:
                curves[i] = LayerStats(mlp=grams["mlp"]).pivots(down, cfg.selection)[1]
            del grams, down
        return {"influence": influence, "stats": None, "curves": curves or None,
                "dense_loss": self.head_loss(held, held_out)}

    def output(self, out, overwrite: bool):
        if out is None:
            raise LLMPruneError("--low-memory writes the checkpoint as it goes", "pass --out")
        return atomic_output_dir(out, overwrite, REPORT_FILE)

    def open_pass(self, calibration, sink: Path) -> "_ShardPass":
        return _ShardPass(self, calibration, sink)

    def untuned_loss(self, calibration, plan, cfg) -> None:
        return None  # it would need an untuned copy of every layer in memory

    def commit(self, calibration, plan, layer_pass: "_ShardPass", details: dict, sink: Path) -> dict:
        """Copy what is outside the decoder layers, write config.json; the parameters after, from a
        meta model of the pruned config."""
        rest = {k: e for k, e in self.entries.items() if not k.startswith(f"{self.prefix}layers.")}
        layer_pass.total_size += copy_tensors(rest.values(), sink / "model-rest.safetensors")
        layer_pass.weight_map.update({k: "model-rest.safetensors" for k in rest})
        index = {"metadata": {"total_size": layer_pass.total_size}, "weight_map": layer_pass.weight_map}
        (sink / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        kept = [i for i in range(calibration.n_layers) if i not in plan.drop]
        _write_config(self.config, self.stock, kept, layer_pass.shapes, [self.layer_map[i] for i in kept], sink, self.folder)
        return parameter_breakdown(meta_model(self.config))

    def write(self, report: dict, sink: Path, out, overwrite: bool, calibration, plan) -> None:
        self.tokenizer.save_pretrained(sink)
        (sink / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
        for name, text in carried_files(self.folder).items():
            (sink / name).write_text(text, encoding="utf-8")
        scrub_foreign_code(sink)  # no foreign code or auto_map (the tokenizer config keeps the source's)


class _ShardPass:
    """One cut streamed from disk: each kept layer is pruned from its dense inputs (its Grams
    collected as it runs), the held-out windows flow through the pruned layers, and the layer is
    written to its own shard and released."""

    releases_stats = True  # each layer's statistics are used once

    def __init__(self, source: StreamedSource, calibration, sink: Path):
        self.source, self.calibration, self.sink = source, calibration, sink
        stream = source.stream(calibration.calib_ids, calibration.held_out_ids)
        n_calib = calibration.calib_ids.shape[0]
        self.kwargs = stream.layer_kwargs
        self.hidden, self.held = stream.hidden[:n_calib], stream.hidden[n_calib:]
        self.shapes, self.weight_map, self.total_size = [], {}, 0
        self.out_dtype = _output_dtype(source.config)

    def skip(self, i: int) -> None:
        layer = self.source.load_layer(i)
        self.hidden = run_layer(layer, self.hidden, self.kwargs[i], self.source.cfg.batch_size)
        self.source.release(i)

    def open(self, i: int, heads: bool) -> tuple[nn.Module, LayerStats]:
        layer = self.source.load_layer(i)
        targets = {"mlp": layer.mlp.down_proj}
        if heads:
            targets["attn"] = layer.self_attn.o_proj
        with collect_grams(targets) as grams:
            out_hidden = run_layer(layer, self.hidden, self.kwargs[i], self.source.cfg.batch_size)
        self.hidden = out_hidden  # the next layer is pruned from dense inputs too
        return layer, LayerStats(mlp=grams["mlp"], attn=grams.get("attn"))

    def close(self, i: int, new_index: int, layer: nn.Module) -> None:
        layer.layer_idx = new_index
        self.held = run_layer(layer, self.held, self.kwargs[i], self.source.cfg.batch_size)
        self.shapes.append(layer_shape(layer))
        shard = f"model-layer-{new_index:05d}.safetensors"
        prefix = f"{self.source.prefix}layers.{new_index}."
        tensors = {prefix + k: v.detach().to(self.out_dtype).contiguous() for k, v in layer.state_dict().items()}
        save_file(tensors, self.sink / shard, metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = shard
            self.total_size += v.numel() * v.element_size()
        del tensors
        self.source.release(i)

    def loss(self) -> float:
        return self.source.head_loss(self.held, self.calibration.held_out_ids)


def _output_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _write_config(config, stock_cls, kept: list[int], shapes: list[dict], layer_map: list[int], tmp: Path, source: Path) -> None:
    """config.json of the pruned checkpoint, the modeling file and the generation config."""
    n_input_layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    previous = getattr(config, "llmprune", None) or {}
    config.num_hidden_layers = len(kept)
    if types:
        config.layer_types = [types[i] for i in kept]
    config.llmprune = pruned_spec(shapes, layer_map, previous, str(source), n_input_layers)
    config.auto_map = our_auto_map()
    config.architectures = [stock_cls.__name__]
    config.save_pretrained(tmp)
    (tmp / MODELING_FILE).write_text(modeling_source(stock_cls))
    if (source / "generation_config.json").is_file():
        (tmp / "generation_config.json").write_text((source / "generation_config.json").read_text())
