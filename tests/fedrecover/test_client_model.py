"""The device's submodel read from disk: the same logits as the global model with the same layers
removed and blocks skipped, nothing of the dropped units read, int8 embeddings, the sublayer skip
check, and the vocabulary-chunked loss against full cross-entropy."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmprune
from llmprune import reader
from llmprune.arch import adapter_for
from llmprune.compress.surgery import install_layers
from llmprune.errors import LLMPruneError
from llmprune.fedrecover.client_model import (
    Int8Embedding,
    SkippedAttention,
    SkippedMLP,
    check_sublayer_skip,
    chunked_vocab_loss,
    free_model,
    head_rows,
    index_checkpoint,
    load_submodel,
)
from llmprune.fedrecover.submodels import Submodel
from llmprune.testing import tiny_checkpoint, tiny_model

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SEQ = 40  # longer than the tiny Gemma's sliding window (16): sliding and full layers differ


def ids(seed: int = 0, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 320, (batch, seq), generator=g)
    x[:, 0] = 1
    return x


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def reference(folder, submodel: Submodel) -> nn.Module:
    """The global model loaded normally, then cut in memory to the submodel: blocks it does not
    hold replaced by skip modules, layers it does not hold removed."""
    model = llmprune.load_model(folder)
    layers = model.model.layers
    for g, layer in enumerate(layers):
        if g not in submodel.attn:
            layer.self_attn = SkippedAttention(layer.self_attn)
        if g not in submodel.mlp:
            layer.mlp = SkippedMLP()
    install_layers(model, [layers[g] for g in submodel.layers], list(submodel.layers))
    return model


def assert_same_logits(folder, submodel: Submodel, **kw) -> nn.Module:
    device = load_submodel(folder, submodel, dtype=torch.float32, **kw)
    ref = reference(folder, submodel)
    x = ids()
    torch.testing.assert_close(logits(device, x), logits(ref, x), atol=1e-5, rtol=1e-5)
    return device


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_submodel_equals_the_global_model_without_those_layers(arch, checkpoint):
    folder = checkpoint(arch)
    sub = Submodel.of_layers(4, (1, 2))  # layer 0 dropped too; Gemma: a sliding and a full layer
    device = assert_same_logits(folder, sub)
    layers = device.model.layers
    assert device.config.num_hidden_layers == len(layers) == 2
    assert [l.layer_idx for l in layers] == [l.self_attn.layer_idx for l in layers] == [0, 1]
    assert not device.training and not any(p.requires_grad for p in device.parameters())
    glob = llmprune.load_model(folder)
    if getattr(glob.config, "layer_types", None):
        assert device.config.layer_types == [glob.config.layer_types[g] for g in sub.layers]
    if arch == "gemma3_text":
        assert [l.self_attn.is_sliding for l in layers] == [True, False]
        assert [adapter_for(device).attention_kind(l) for l in layers] == ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("arch", ARCHS)
def test_sublayer_submodel_equals_the_global_model_with_blocks_skipped(arch, checkpoint):
    # Layer 0: attention only; 1: dropped; 2: both; 3: MLP only (Gemma: sliding, -, full, sliding).
    sub = Submodel(4, attn=(0, 2), mlp=(2, 3))
    device = assert_same_logits(checkpoint(arch), sub)
    layers = device.model.layers
    assert isinstance(layers[0].mlp, SkippedMLP) and isinstance(layers[2].self_attn, SkippedAttention)
    assert not isinstance(layers[1].self_attn, SkippedAttention) and not isinstance(layers[1].mlp, SkippedMLP)
    # The skipped blocks hold no weights at all.
    assert not any(".0.mlp." in n or ".2.self_attn." in n for n, _ in device.named_parameters())


def test_a_sharded_checkpoint_and_untied_head(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("qwen2", seed=3).save_pretrained(folder, max_shard_size="60KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    device = assert_same_logits(folder, Submodel(4, attn=(3,), mlp=(1, 3)))
    assert device.lm_head.weight.data_ptr() != device.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_tensors_of_dropped_layers_and_blocks_are_never_read(arch, checkpoint, monkeypatch):
    folder = checkpoint(arch)
    sub = Submodel(4, attn=(0, 2), mlp=(2, 3))
    read = []
    real = reader.read_rows  # every weight byte load_submodel reads passes through the reader's read_rows
    monkeypatch.setattr(reader, "read_rows", lambda entry, lo, hi: read.append(entry.name) or real(entry, lo, hi))
    load_submodel(folder, sub, dtype=torch.float32)

    def needed(name: str) -> bool:
        if ".layers." not in name:
            return True
        g, part = int(name.split(".")[2]), name.split(".")[3]
        return g in sub.attn if part == "self_attn" else g in sub.mlp if part == "mlp" else g in sub.layers

    names = set(index_checkpoint(folder))
    assert set(read) == {n for n in names if needed(n)}
    assert len(read) == len(set(read))  # tiny tensors: one read each
    assert any(".1." in n for n in names) and not any(".layers.1." in n for n in read)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
def test_stored_dtypes_load_exactly(stored, tmp_path):
    folder = tmp_path / "ckpt"
    tiny_model("llama").to(stored).save_pretrained(folder)
    device = load_submodel(folder, Submodel.full(4), dtype=torch.float32)
    ref = llmprune.load_model(folder, dtype=torch.float32).state_dict()
    got = device.state_dict()
    for name, tensor in got.items():
        if name.endswith("inv_freq"):
            continue
        assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[name]), name


def test_large_tensors_are_read_and_converted_in_row_chunks(checkpoint, monkeypatch):
    folder = checkpoint("gemma3_text")
    sub = Submodel.of_layers(4, (0, 3))
    whole = load_submodel(folder, sub)
    whole_int8 = load_submodel(folder, sub, embedding="int8")
    reads = []
    real = reader.read_rows
    monkeypatch.setattr(reader, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(reader, "read_rows", lambda e, lo, hi: reads.append((e.name, hi - lo)) or real(e, lo, hi))
    chunked = load_submodel(folder, sub)
    # float32 rows of 64 x 4 bytes: 16 rows per 4096-byte read, 20 reads for 320 rows.
    assert [n for name, n in reads if name.endswith("embed_tokens.weight")] == [16] * 20
    for (name, a), (_, b) in zip(whole.state_dict().items(), chunked.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    chunked_int8 = load_submodel(folder, sub, embedding="int8")
    assert torch.equal(chunked_int8.model.embed_tokens.qweight, whole_int8.model.embed_tokens.qweight)
    assert torch.equal(chunked_int8.model.embed_tokens.scales, whole_int8.model.embed_tokens.scales)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_bfloat16_loading(arch, checkpoint):
    folder = checkpoint(arch)
    sub = Submodel(4, attn=(1, 2), mlp=(2,))
    device = load_submodel(folder, sub)  # bfloat16 by default
    assert {p.dtype for p in device.parameters()} == {torch.bfloat16}
    fp32 = load_submodel(folder, sub, dtype=torch.float32)
    for (name, p), (_, q) in zip(device.named_parameters(), fp32.named_parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), name
    x = ids()
    assert torch.isfinite(logits(device, x)).all()
    torch.testing.assert_close(logits(device, x).float(), logits(fp32, x), atol=0.1, rtol=0.1)


def dequantized(model) -> torch.Tensor:
    emb = model.model.embed_tokens
    return emb.rows(0, emb.num_embeddings, torch.float32)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3"])
def test_int8_embedding(arch, checkpoint):
    folder = checkpoint(arch)
    sub = Submodel(4, attn=(0, 3), mlp=(3,))
    regular = load_submodel(folder, sub, dtype=torch.float32)
    quant = load_submodel(folder, sub, dtype=torch.float32, embedding="int8")
    emb = quant.model.embed_tokens
    assert isinstance(emb, Int8Embedding) and emb.qweight.dtype == torch.int8 and emb.scales.shape == (320,)
    assert not list(emb.parameters())
    if quant.config.tie_word_embeddings:  # no float copy of the embedding left, not even as the head
        assert not any(p.shape == (320, 64) for p in quant.parameters())
    weight = regular.model.embed_tokens.weight
    err = (dequantized(quant) - weight).abs().amax(dim=1)
    assert (err <= weight.abs().amax(dim=1) / 127).all() and err.max() > 0
    # The int8 model computes what the regular one computes with the dequantized embedding (and
    # tied head): Gemma's embed_scale is kept.
    with torch.no_grad():
        regular.model.embed_tokens.weight.copy_(dequantized(quant))
    x = ids()
    torch.testing.assert_close(logits(quant, x), logits(regular, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_rows(quant, 5, 17, torch.float32), head_rows(regular, 5, 17, torch.float32))
    if arch == "gemma3_text":
        assert float(emb.embed_scale) == pytest.approx(8.0)
        torch.testing.assert_close(emb(x[:, :3]), dequantized(quant)[x[:, :3]] * 8.0)
    loss = chunked_vocab_loss(quant, x, vocab_chunk=100)
    full = F.cross_entropy(logits(quant, x)[:, :-1].reshape(-1, 320), x[:, 1:].reshape(-1))
    assert float(loss) == pytest.approx(float(full), abs=1e-5)


def test_int8_embedding_in_bfloat16_keeps_the_untied_head(checkpoint):
    quant = load_submodel(checkpoint("llama"), Submodel.of_layers(4, (2,)), embedding="int8")
    assert quant.lm_head.weight.dtype == torch.bfloat16 and quant.lm_head.weight.shape == (320, 64)
    # stored in bfloat16, computed in float32 (bf16 matmuls are slow on most CPUs)
    assert quant.model.embed_tokens(ids()).dtype == torch.float32
    assert torch.equal(head_rows(quant, 0, 4, torch.bfloat16), quant.lm_head.weight[:4])


def test_bfloat16_weights_compute_in_float32_with_exact_input_gradients():
    from llmprune.fedrecover.client_model import UpcastLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 5).to(torch.bfloat16).requires_grad_(False)
    linear.__class__ = UpcastLinear
    x = torch.randn(3, 8, requires_grad=True)
    y = linear(x)
    assert y.dtype == torch.float32 and linear.weight.dtype == torch.bfloat16
    w, b = linear.weight.float(), linear.bias.float()
    torch.testing.assert_close(y, x @ w.T + b)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, (2 * (x @ w.T + b)) @ w)


@pytest.mark.parametrize("arch", ARCHS)
def test_sublayer_skip_check_passes_for_every_architecture(arch):
    model = tiny_model(arch)
    for layer in model.model.layers:
        check_sublayer_skip(layer)
    assert not isinstance(model.model.layers[0].self_attn, SkippedAttention)  # the check works on a copy


class _Layer(nn.Module):
    """A toy decoder layer: post-norm (norm(x + attn(x))) or pre-norm (x + attn(norm(x)))."""

    def __init__(self, post_norm: bool, hidden: int = 16):
        super().__init__()
        self.hidden_size, self.post_norm = hidden, post_norm
        self.self_attn, self.mlp = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def block(self, module, x):
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, hidden_states):
        x = hidden_states
        if self.post_norm:
            x = self.norm1(x + self.block(self.self_attn, x))
            return self.norm2(x + self.block(self.mlp, x))
        x = x + self.block(self.self_attn, self.norm1(x))
        return x + self.block(self.mlp, self.norm2(x))


def test_sublayer_skip_check_refuses_a_post_norm_layer():
    check_sublayer_skip(_Layer(post_norm=False))
    with pytest.raises(LLMPruneError, match="cannot skip attention/MLP blocks.*submodel-granularity layer"):
        check_sublayer_skip(_Layer(post_norm=True))


@pytest.mark.parametrize("arch,softcap", [("llama", None), ("llama", 4.0), ("qwen3", None),
                                          ("gemma3_text", None), ("gemma3_text", 3.0)])
def test_chunked_vocab_loss_equals_full_cross_entropy(arch, softcap):
    model = tiny_model(arch).float()
    model.config.final_logit_softcapping = softcap
    model.requires_grad_(False)
    trainable = [l.self_attn.q_proj.weight for l in model.model.layers] + [model.model.layers[-1].mlp.down_proj.weight]
    for p in trainable:
        p.requires_grad_(True)
    x = ids(seed=1, seq=24)

    loss = chunked_vocab_loss(model, x, vocab_chunk=96)  # 320 = 3 x 96 + 32
    grads = torch.autograd.grad(loss, trainable)

    full = model(input_ids=x).logits[:, :-1].float()
    if softcap and arch != "gemma3_text":  # Gemma's own forward applies its softcap; the others ignore it
        full = torch.tanh(full / softcap) * softcap
    ref = F.cross_entropy(full.reshape(-1, full.shape[-1]), x[:, 1:].reshape(-1))
    ref_grads = torch.autograd.grad(ref, trainable)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-5)
    for g, r in zip(grads, ref_grads):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_chunked_vocab_loss_refuses_a_trainable_head():
    model = tiny_model("llama")
    with pytest.raises(LLMPruneError, match="LM head"):
        chunked_vocab_loss(model, ids())


def test_submodel_of_a_pruned_checkpoint(pruned_ckpt):
    config = json.loads((pruned_ckpt / "config.json").read_text())
    spec = config["llmprune"]
    assert config["num_hidden_layers"] == 3 and len(spec["layers"]) == 3
    sub = Submodel(3, attn=(0, 2), mlp=(2,))
    device = assert_same_logits(pruned_ckpt, sub)
    assert device.config.llmprune["layers"] == [spec["layers"][g] for g in sub.layers]
    assert {k: v for k, v in device.config.llmprune.items() if k != "layers"} == \
        {k: v for k, v in spec.items() if k != "layers"}
    for i, g in enumerate(sub.layers):
        layer, shape = device.model.layers[i], spec["layers"][g]
        if g in sub.mlp:
            assert layer.mlp.down_proj.in_features == shape["intermediate_size"]
        if g in sub.attn:
            assert layer.self_attn.q_proj.out_features == shape["num_attention_heads"] * layer.self_attn.head_dim


def test_free_model_releases_the_tensors(checkpoint):
    model = load_submodel(checkpoint("llama"), Submodel.of_layers(4, (0, 1)))
    free_model(model)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_refusals(checkpoint):
    folder = checkpoint("llama")
    with pytest.raises(LLMPruneError, match="5-layer model but the checkpoint has 4"):
        load_submodel(folder, Submodel.of_layers(5, (0,)))
    with pytest.raises(LLMPruneError, match="embedding storage"):
        load_submodel(folder, Submodel.of_layers(4, (0,)), embedding="fp8")


def test_a_truncated_file_is_refused(tmp_path):
    folder = tiny_checkpoint(tmp_path / "ckpt", "llama")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(LLMPruneError, match="truncated"):
        load_submodel(folder, Submodel.of_layers(4, (3,)), dtype=torch.float32)
