"""The model a device trains in a round: only its submodel of the global pruned checkpoint, read
from disk without touching the rest, plus a loss whose memory does not grow with the vocabulary.

`load_submodel` builds the causal LM for the device's stack (the held layers, renumbered 0..n-1)
on the meta device and fills it from the safetensors with plain file reads at the header's
offsets: dropped layers and dropped blocks are never read, nothing is mmap-ed (mapped pages count
in RSS), and large tensors are converted a row chunk at a time into their final dtype, so a 262k
x 640 embedding never exists as a float32 copy next to its bfloat16 one. A layer holding only one
of its blocks gets the other replaced by a module returning zeros, which leaves the residual
stream unchanged (checked per architecture: every norm after a block maps 0 to 0).
`embedding="int8"` keeps the embedding (and the tied LM head) as int8 rows with one scale each.

`chunked_vocab_loss` computes next-token cross-entropy a vocabulary slice at a time with a running
log-sum-exp and recomputes the slices in backward: O(positions x vocab_chunk) memory.
`free_model` returns a round's model memory to the OS before the next round."""

from __future__ import annotations

import copy
import ctypes
import gc
import inspect
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from llmprune.arch import adapter_for, base_model
from llmprune.checkpoint import check_modeling_file, is_pruned_config, stock_class
from llmprune.errors import LLMPruneError
from llmprune.meta_init import prefix_of as _prefix_of
from llmprune.meta_init import reset_buffers as _reset_buffers
from llmprune.models import load_config
from llmprune.paths import printable
from llmprune.reader import TensorEntry, checkpoint_entries, find_tensor, load_tensor, meta_model, row_blocks

from .submodels import Submodel

log = logging.getLogger(__name__)

EMBEDDINGS = ("same", "int8")
_DTYPES = ("F32", "BF16", "F16")  # stored dtypes a device model is read from
_LAYER_NAME = re.compile(r"^(?P<head>.*?layers\.)(?P<index>\d+)(?P<tail>\..+)$")


# --- reading the checkpoint (llmprune.reader: plain file reads, no mmap) --------------------------

def index_checkpoint(folder: Path) -> dict[str, TensorEntry]:
    """Tensor name -> TensorEntry for a (possibly sharded) safetensors folder, every file checked
    whole; reads headers only. A device computes in floating point: other stored dtypes are refused."""
    entries = checkpoint_entries(folder)
    if entries is None:
        raise LLMPruneError(f"no safetensors weights in '{printable(folder)}'", "save the model with safe_serialization=True")
    for entry in entries.values():
        if entry.dtype not in _DTYPES:
            raise LLMPruneError(f"tensor '{entry.name}' in '{printable(entry.path)}' is stored as {entry.dtype}",
                                f"store the checkpoint in one of {', '.join(_DTYPES)}")
    return entries


def load_int8_rows(entry: TensorEntry) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor as symmetric int8 rows and float32 per-row scales (max|row| / 127), quantized
    chunk by chunk while reading."""
    if len(entry.shape) != 2:
        raise LLMPruneError(f"'{entry.name}' is not a matrix", "int8 storage is for the embedding only")
    q = torch.empty(entry.shape, dtype=torch.int8)
    scales = torch.empty(entry.shape[0], dtype=torch.float32)
    for lo, rows in row_blocks(entry):
        q[lo : lo + len(rows)], scales[lo : lo + len(rows)] = quantize_rows(rows)
    return q, scales


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q = round(x / s), s = max|row| / 127 (an all-zero row gets s = 0)."""
    x = rows.float()
    scale = x.abs().amax(dim=1) / 127.0
    q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


# --- modules ----------------------------------------------------------------------------------------

class SkippedAttention(nn.Module):
    """Stands in for a dropped attention block: returns zeros, so `residual + block(x)` is the
    residual. Keeps the attributes the decoder layers read from their attention (Gemma3 picks the
    rotary table by `self_attn.is_sliding`; the KV cache and `install_layers` use `layer_idx`)."""

    _COPIED = ("layer_idx", "is_sliding", "sliding_window", "attention_type", "layer_type", "head_dim")

    def __init__(self, like: nn.Module | None = None):
        super().__init__()
        for name in self._COPIED:
            if like is not None and hasattr(like, name):
                setattr(self, name, getattr(like, name))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """Stands in for a dropped MLP block: returns zeros, so the residual passes through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class Int8Embedding(nn.Module):
    """An embedding stored as int8 rows with one float32 scale per row (a quarter of float32's
    memory, half of bfloat16's); rows are dequantized to `dtype` when gathered. Gemma's
    `embed_scale` (√hidden) multiplies the output as Gemma3TextScaledWordEmbedding does."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                 embed_scale: float | None = None, padding_idx: int | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.dtype, self.padding_idx = dtype, padding_idx
        if embed_scale is not None:
            self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)
        else:
            self.embed_scale = None

    @property
    def num_embeddings(self) -> int:
        return self.qweight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.qweight.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = (self.qweight[input_ids].float() * self.scales[input_ids][..., None]).to(self.dtype)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.dtype)
        return out

    def rows(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows [lo, hi) as [hi - lo, hidden] (the raw weight, without embed_scale: what
        a tied LM head multiplies by)."""
        return (self.qweight[lo:hi].float() * self.scales[lo:hi, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 -> {self.dtype}"


class Int8TiedHead(nn.Module):
    """The LM head tied to an Int8Embedding: logits computed a vocabulary slice at a time from the
    int8 rows. The embedding is referenced, not registered, so its storage appears once."""

    def __init__(self, embedding: Int8Embedding, vocab_chunk: int = 16384):
        super().__init__()
        self._embedding = (embedding,)
        self.vocab_chunk = vocab_chunk

    @property
    def embedding(self) -> Int8Embedding:
        return self._embedding[0]

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    def rows(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        return self.embedding.rows(lo, hi, dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        vocab = self.out_features
        return torch.cat([hidden @ self.rows(lo, min(vocab, lo + self.vocab_chunk), hidden.dtype).T
                          for lo in range(0, vocab, self.vocab_chunk)], dim=-1)


def head_rows(model: nn.Module, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [lo, hi) of the LM head weight as [hi - lo, hidden] in `dtype`, for a regular head
    (weight slice) and an int8 one (dequantized)."""
    head = model.get_output_embeddings()
    if hasattr(head, "rows"):
        return head.rows(lo, hi, dtype)
    return head.weight[lo:hi].to(dtype)


def _head_vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return int(head.out_features)


# --- the sublayer skip check ------------------------------------------------------------------------

def _hidden_size(layer: nn.Module) -> int:
    size = getattr(layer, "hidden_size", None) or getattr(getattr(layer, "config", None), "hidden_size", None)
    if size:
        return int(size)
    for p in layer.parameters():
        if p.dim() == 1:
            return int(p.shape[0])
    raise LLMPruneError("cannot tell the hidden size of the decoder layer", "use --submodel-granularity layer")


def _layer_kwargs(layer: nn.Module, x: torch.Tensor) -> dict:
    """The call arguments the layer's forward names, beyond the hidden states: rotary tables of
    the right shape (unused once attention is skipped, but the layer may pick one), no mask."""
    head_dim = (getattr(layer.self_attn, "head_dim", None) or getattr(getattr(layer, "config", None), "head_dim", None)
                or 2)  # any width will do where nothing reads the tables
    batch, seq = x.shape[:2]
    rope = (torch.ones(batch, seq, head_dim), torch.zeros(batch, seq, head_dim))
    offered = {"position_embeddings": rope, "position_embeddings_global": rope, "position_embeddings_local": rope,
               "attention_mask": None, "position_ids": torch.arange(seq)[None].expand(batch, -1),
               "use_cache": False}
    params = inspect.signature(layer.forward).parameters
    return {k: v for k, v in offered.items() if k in params}


def check_sublayer_skip(layer: nn.Module) -> None:
    """Refuse sublayer granularity for a decoder layer whose residual stream does not pass through
    unchanged when its blocks return zeros (e.g. a post-norm layer, norm(x + attn(x))): skipping a
    block there would change the model instead of leaving the block out. Runs on a float32 copy
    of the layer (its own blocks are replaced before copying, so they are never copied)."""
    probe = copy.copy(layer)
    probe._modules = dict(layer._modules)
    probe._modules["self_attn"] = SkippedAttention(layer._modules.get("self_attn"))
    probe._modules["mlp"] = SkippedMLP()
    probe = copy.deepcopy(probe).float().eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, _hidden_size(layer), generator=generator)
    try:
        with torch.no_grad():
            out = probe(x, **_layer_kwargs(probe, x))
    except Exception as exc:  # an architecture the skip modules do not fit
        raise LLMPruneError(f"{type(layer).__name__} cannot skip attention/MLP blocks: the layer fails with them "
                            f"({type(exc).__name__}: {exc})", "use --submodel-granularity layer") from exc
    out = out[0] if isinstance(out, (tuple, list)) else out
    if out.shape != x.shape or not torch.allclose(out, x, rtol=0.0, atol=1e-6):
        gap = float((out - x).abs().max()) if out.shape == x.shape else float("nan")
        raise LLMPruneError(f"{type(layer).__name__} cannot skip attention/MLP blocks: with both blocks returning "
                            f"zeros its output is not its input (max difference {gap:.3g}), so the residual does not "
                            "pass through", "use --submodel-granularity layer")


# --- the device's config and model ------------------------------------------------------------------

def submodel_config(config, submodel: Submodel):
    """The config of the device's stack: the held layers in order, each keeping its layer type
    (Gemma3's sliding/full pattern) and its pruned shape; the rest of config.llmprune unchanged."""
    if submodel.num_layers != config.num_hidden_layers:
        raise LLMPruneError(f"the submodel is of a {submodel.num_layers}-layer model but the checkpoint has "
                            f"{config.num_hidden_layers} layers", "build the submodel from this checkpoint's config")
    held = list(submodel.layers)
    device = copy.deepcopy(config)
    device.num_hidden_layers = len(held)
    types = adapter_for(config).layer_types(config)
    if types:
        device.layer_types = [types[g] for g in held]
    spec = getattr(config, "llmprune", None)
    if spec and spec.get("layers"):
        if len(spec["layers"]) != config.num_hidden_layers:
            raise LLMPruneError(f"config.llmprune lists {len(spec['layers'])} layers but the checkpoint has "
                                f"{config.num_hidden_layers}", "the checkpoint is damaged: write it again with llmprune")
        device.llmprune = {**spec, "layers": [spec["layers"][g] for g in held]}
    device._attn_implementation = "sdpa"
    return device


def _install_skips(model: nn.Module, submodel: Submodel) -> list[int]:
    """Replace the blocks the device does not hold by skip modules (before any weight is read);
    returns the device indices of the layers holding one block only."""
    partial = []
    layers = adapter_for(model).decoder_layers(model)
    for i, (g, layer) in enumerate(zip(submodel.layers, layers)):
        if g not in submodel.attn:
            layer.self_attn = SkippedAttention(layer.self_attn)
        if g not in submodel.mlp:
            layer.mlp = SkippedMLP()
        if (g in submodel.attn) != (g in submodel.mlp):
            partial.append(i)
        layer.layer_idx = i
        layer.self_attn.layer_idx = i  # the KV cache is indexed by position in the device's stack
    return partial


def _global_name(name: str, layer_prefix: str, held: tuple[int, ...]) -> str:
    """Checkpoint name of a device parameter: device layer i is global layer held[i]."""
    if not name.startswith(layer_prefix):
        return name
    match = _LAYER_NAME.match(name)
    return f"{match['head']}{held[int(match['index'])]}{match['tail']}"


def _load_embedding(model: nn.Module, entries: dict, prefix: str, folder: Path, dtype: torch.dtype,
                    embedding: str) -> None:
    """The input embedding, and the LM head when tied to it (one storage for both)."""
    base = base_model(model)
    meta = base.embed_tokens
    entry = find_tensor(entries, f"{prefix}embed_tokens.weight", folder, tuple(meta.weight.shape))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if embedding == "int8":
        q, scales = load_int8_rows(entry)
        scale = float(model.config.hidden_size) ** 0.5 if isinstance(getattr(meta, "embed_scale", None), torch.Tensor) else None
        base.embed_tokens = Int8Embedding(q, scales, dtype, scale, getattr(meta, "padding_idx", None))
        if tied:
            model.lm_head = Int8TiedHead(base.embed_tokens)
        return
    meta.weight = nn.Parameter(load_tensor(entry, dtype), requires_grad=False)
    if tied:
        model.lm_head.weight = meta.weight


def _load_parameters(model: nn.Module, entries: dict, folder: Path, name_of, dtype: torch.dtype) -> int:
    """Fill every parameter still on the meta device from its checkpoint tensor; returns bytes read."""
    done: dict[int, nn.Parameter] = {}
    total = 0
    for mod_name, module in model.named_modules():
        for p_name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) in done:
                module._parameters[p_name] = done[id(param)]
                continue
            entry = find_tensor(entries, name_of(f"{mod_name}.{p_name}" if mod_name else p_name), folder,
                                tuple(param.shape))
            new = nn.Parameter(load_tensor(entry, dtype), requires_grad=False)
            module._parameters[p_name] = done[id(param)] = new
            total += entry.nbytes
    return total


def _check_materialised(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LLMPruneError(f"the device model has tensors no checkpoint value reached: {left[:5]}",
                            "report this: the architecture has state load_submodel does not know")


# --- stored in bfloat16, computed in float32 ------------------------------------------------------

class _UpcastMatmul(torch.autograd.Function):
    """y = x W^T (+ b) in float32 from a frozen low-precision W: the float32 copy of W exists only
    during the product (forward, and again in backward for the input's gradient), so the layer
    keeps its bf16 storage; bf16 matmuls are ~8x slower than float32 on CPUs without AVX512-BF16."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        out = x.float() @ weight.float().T
        return out + bias.float() if bias is not None else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight.float(), None, None


class UpcastLinear(nn.Linear):
    """A frozen nn.Linear whose weight is stored in bfloat16 and whose product runs in float32 (an
    nn.Linear subclass, so peft wraps it with LoRA as any linear layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastMatmul.apply(x, self.weight, self.bias)


def compute_in_float32(model: nn.Module) -> int:
    """Make a model whose frozen weights are stored in a low-precision dtype compute in float32:
    decoder linears become UpcastLinear, the embedding's output is cast to float32 (so hidden
    states, masks and rotary tables are float32). Returns the number of linears switched."""
    switched = 0
    for layer in adapter_for(model).decoder_layers(model):
        for parent in list(layer.modules()):
            for child in list(parent.children()):
                if type(child) is nn.Linear and child.weight.dtype != torch.float32:
                    child.__class__ = UpcastLinear
                    switched += 1
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight.dtype != torch.float32:
        head.__class__ = UpcastLinear
        switched += 1
    embed = base_model(model).embed_tokens
    if isinstance(embed, Int8Embedding):
        embed.dtype = torch.float32
    else:
        embed.register_forward_hook(lambda module, args, out: out.float())
    return switched


def load_submodel(folder: str | os.PathLike, submodel: Submodel, *, dtype: torch.dtype = torch.bfloat16,
                  embedding: str = "same") -> nn.Module:
    """The causal LM of the device's submodel (frozen, eval mode), read from the checkpoint folder
    without reading any weight of a dropped layer or block. `embedding="int8"`: the embedding
    (and the tied LM head) as int8 rows with a scale each, dequantized to `dtype` when used."""
    if embedding not in EMBEDDINGS:
        raise LLMPruneError(f"unknown embedding storage '{embedding}'", f"use one of {', '.join(EMBEDDINGS)}")
    folder = Path(folder)
    config = load_config(folder)
    if is_pruned_config(config):
        check_modeling_file(folder, stock_class(config))  # a tampered modeling file: refused as load_model does
    device_config = submodel_config(config, submodel)
    entries = index_checkpoint(folder)
    model = meta_model(device_config)
    partial = _install_skips(model, submodel)
    prefix = _prefix_of(model, base_model(model))
    _load_embedding(model, entries, prefix, folder, dtype, embedding)
    name_of = lambda name: _global_name(name, f"{prefix}layers.", submodel.layers)  # noqa: E731
    read = _load_parameters(model, entries, folder, name_of, dtype)
    _reset_buffers(model, device_config)
    _check_materialised(model)
    model.eval().requires_grad_(False)
    if dtype != torch.float32:
        compute_in_float32(model)
    if partial:  # the norms after the skipped blocks must map 0 to 0 (checked once: same layer class)
        check_sublayer_skip(adapter_for(model).decoder_layers(model)[partial[0]])
    log.info("device model: global layers %s (attention %s, MLP %s), %.1f MB read besides the embedding, "
             "embedding %s", list(submodel.layers), list(submodel.attn), list(submodel.mlp), read / 2**20, embedding)
    return model


# --- the loss ---------------------------------------------------------------------------------------

def _slice_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None) -> torch.Tensor:
    z = h @ w.T
    return torch.tanh(z / softcap) * softcap if softcap else z


class _ChunkedVocabNLL(torch.autograd.Function):
    """Mean NLL of `targets` under logits h @ W.T, W read a vocabulary slice at a time. Forward
    keeps hidden states, per-position log-sum-exp and target logit; backward recomputes each
    slice's softmax. The head is frozen: only the hidden states get a gradient."""

    @staticmethod
    def forward(ctx, hidden, targets, rows, vocab: int, vocab_chunk: int, softcap):
        h = hidden.float()
        lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=h.device)
        target_logit = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        for lo in range(0, vocab, vocab_chunk):
            hi = min(vocab, lo + vocab_chunk)
            z = _slice_logits(h, rows(lo, hi), softcap)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            hit = torch.nonzero((targets >= lo) & (targets < hi)).flatten()
            target_logit[hit] = z[hit, targets[hit] - lo]
        ctx.save_for_backward(hidden, targets, lse)
        ctx.rows, ctx.vocab, ctx.vocab_chunk, ctx.softcap = rows, vocab, vocab_chunk, softcap
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, targets, lse = ctx.saved_tensors
        h = hidden.float()
        grad = torch.zeros_like(h)
        for lo in range(0, ctx.vocab, ctx.vocab_chunk):
            hi = min(ctx.vocab, lo + ctx.vocab_chunk)
            w = ctx.rows(lo, hi)
            z = _slice_logits(h, w, ctx.softcap)
            dz = torch.exp(z - lse[:, None])
            hit = torch.nonzero((targets >= lo) & (targets < hi)).flatten()
            dz[hit, targets[hit] - lo] -= 1.0
            if ctx.softcap:
                dz = dz * (1.0 - (z / ctx.softcap) ** 2)  # d(c tanh(u/c))/du = 1 - tanh²
            grad += dz @ w
        grad *= grad_out / h.shape[0]
        return grad.to(hidden.dtype), None, None, None, None, None


def chunked_vocab_loss(model: nn.Module, input_ids: torch.Tensor, *, vocab_chunk: int = 16384) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) with the LM-head logits computed `vocab_chunk` rows
    of the vocabulary at a time: for Gemma's 262k vocabulary the full logits of a 4 x 256 batch
    would be 1 GB. The LM head must be frozen (it gets no gradient)."""
    hidden = base_model(model)(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    return hidden_state_loss(model, hidden, input_ids[:, 1:], vocab_chunk)


def hidden_state_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_chunk: int = 16384) -> torch.Tensor:
    """Mean cross-entropy of `targets` under the model's head applied to `hidden` (the final norm's
    output), a vocabulary slice at a time (see chunked_vocab_loss)."""
    head = model.get_output_embeddings()
    if torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters()):
        raise LLMPruneError("chunked_vocab_loss gives the LM head no gradient but it requires one",
                            "freeze the LM head (and the embedding tied to it)")
    flat = hidden.reshape(-1, hidden.shape[-1])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    rows = lambda lo, hi: head_rows(model, lo, hi, torch.float32).to(flat.device)  # noqa: E731
    return _ChunkedVocabNLL.apply(flat, targets.reshape(-1), rows, _head_vocab(model), int(vocab_chunk), softcap)


# --- releasing memory -------------------------------------------------------------------------------

def free_model(model: nn.Module) -> None:
    """Release a round's model: its tensors move to the meta device (storage freed even where the
    caller still holds the module), garbage is collected, and on glibc `malloc_trim(0)` hands the
    freed heap back to the OS, so RSS goes down between rounds instead of staying at its peak."""
    try:
        model.to("meta")
    except (RuntimeError, NotImplementedError) as exc:  # best effort: the caller drops its reference anyway
        log.debug("could not move the model to meta: %s", exc)
    del model
    gc.collect()
    trim_heap()


def trim_heap() -> bool:
    """glibc's malloc_trim(0), best effort; False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
