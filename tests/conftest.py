"""Shared fixtures.

Unit tests use tiny random models (llmprune.testing) of every supported architecture and run in
seconds. Tests marked `integration` use the real packaged Gemma-3-270M and ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmprune.testing import tiny_checkpoint, tiny_model, tiny_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread; several threads on a busy 2-core machine make a
    256-step generate take 20 s instead of 0.3 s. Integration tests keep the default."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    """A tiny random model of `arch` (eval mode)."""
    return tiny_model(arch)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny byte-level BPE tokenizer (<pad>=0, <bos>=1, <eos>=2). Do not mutate it."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Factory: checkpoint(arch, **overrides) -> a saved tiny HF folder (cached per session; read only)."""
    made: dict = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{arch}"), arch, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-2 checkpoint: an architecture llmprune does not support."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("ckpt-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, n_positions=64)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (read only: never write under it)."""
    if not (SHARED_DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"real data not found: {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gemma():
    """(model, tokenizer) of the packaged Gemma-3-270M, loaded once per session."""
    import llmprune

    model, tok = llmprune.load("gemma-3-270m")
    return model, tok


def llmprune_command() -> list[str]:
    """The installed `llmprune` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("llmprune")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from llmprune.cli.main import main; sys.exit(main())"]


def run_cli(*args, cwd, env: dict | None = None, timeout: float = 300, threads: int | None = 1):
    """Run the real console script as a subprocess; returns CompletedProcess (text mode)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if threads is not None:
        full_env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(
        llmprune_command() + [str(a) for a in args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
