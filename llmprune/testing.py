"""Tiny random models of every supported architecture, for tests and examples (seconds to build)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights that matter least; "
    "calibration data tells which ones those are. Federated recovery trains small adapters on "
    "devices and sends only those. Export writes ONNX files that phones can run. "
) * 4


def tiny_config(arch: str, **overrides):
    """A small config of `arch` (llama, mistral, qwen2, qwen3, gemma3_text) with 2 query heads per
    KV head, so head-group logic is exercised."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=arch in ("gemma3_text", "qwen3"),
    )
    if arch == "gemma3_text":
        common.update(sliding_window=16,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                      query_pre_attn_scalar=16)
    if arch in ("qwen2", "mistral"):
        common.update(sliding_window=None)
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def tiny_tokenizer(vocab_size: int = 320, text: str = TINY_TEXT, extra_special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on `text`, with <pad>=0, <bos>=1, <eos>=2 (then
    `extra_special`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   model_input_names=["input_ids", "attention_mask"])


def tiny_tokenizer_for(arch: str):
    """The tiny tokenizer a folder of `arch` holds. transformers 5 loads a Qwen folder's tokenizer
    as Qwen2Tokenizer, which adds <|endoftext|> (its unknown token) when the vocabulary lacks it:
    one id past the embedding; Qwen folders carry it among their special tokens."""
    return tiny_tokenizer(extra_special=("<|endoftext|>",) if arch in ("qwen2", "qwen3") else ())


def tiny_checkpoint(folder: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny model and tokenizer as a Hugging Face folder; returns the folder."""
    folder = Path(folder)
    tiny_model(arch, seed, **overrides).save_pretrained(folder)
    tiny_tokenizer_for(arch).save_pretrained(folder)
    return folder
