"""Fixtures of the fedrecover tests: a tiny pruned checkpoint (a dropped layer, pruned heads,
narrowed MLPs), text whose windows are all different, and federated runs in Flower's simulation
shared by several tests (each run costs 10-20 s, mostly ray's start-up)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmprune.testing import TINY_TEXT, tiny_model, tiny_tokenizer

# Small federated settings: every simulation in these tests uses them unless it says otherwise.
SMALL = dict(clients=2, rounds=1, local_steps=2, seq_len=32, batch_size=2, lora_rank=4)
# The shared run: DP clipping norm and noise multiplier small enough to keep training meaningful.
DP_CLIP, DP_NOISE = 1e-4, 1.0
BASIC = dict(clients=3, fraction=0.67, rounds=2, dp_clip=DP_CLIP, dp_noise=DP_NOISE)


def varied_text(words: int = 3000, seed: int = 0) -> str:
    """The tiny tokenizer's words in a seeded random order: no two 32-token windows alike."""
    vocab = TINY_TEXT.split()
    rng = np.random.default_rng(seed)
    return " ".join(vocab[i] for i in rng.integers(len(vocab), size=words))


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def pruned_ckpt(tmp_path_factory) -> Path:
    """A tiny llama pruned by compress: 3 of 4 layers left, half the query heads, per-layer MLP widths."""
    from llmprune.compress import CompressConfig, compress

    out = tmp_path_factory.mktemp("fedrecover") / "pruned"
    cfg = CompressConfig(ratio=0.4, layer_share=0.7, prune_heads=True, head_ratio=0.5, intercept=True,
                         calib_samples=4, calib_seq_len=32, loss_windows=2)
    compress(tiny_model("llama"), cfg, tokenizer=tiny_tokenizer(), calib=[varied_text(4000, seed=1)], out=out)
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fedrecover-data") / "client_text.txt"
    path.write_text(varied_text(), encoding="utf-8")
    return path


def run_recover(model_dir, data, out, **overrides):
    """`recover()` with the small settings (overrides win; flag names, `policy` by name)."""
    from llmprune.fedrecover import RecoverConfig, recover

    import torch

    resume = overrides.pop("resume", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the server's own maths (evaluation, pruning steps) the same in every fixture and test
    try:
        return recover(model_dir, [str(d) for d in data], RecoverConfig.of(**{**SMALL, **overrides}), out,
                       resume=resume)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def basic_run(pruned_ckpt, text_file, tmp_path_factory):
    """FedAvg with central DP, 3 clients of which 2 are sampled each round, 2 rounds: the
    end-to-end run, and the reference of the resume test."""
    out = tmp_path_factory.mktemp("basic") / "recovered"
    return run_recover(pruned_ckpt, [text_file], out, **BASIC)
