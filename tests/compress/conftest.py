"""Fixtures of the compress tests: tiny random models, small calibration, the real console script.

Everything here is tiny (4 layers, hidden 64, MLP 128) and calibrates on 4 windows of 32 tokens,
so the whole folder runs in well under a minute on two cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmprune.compress import CompressConfig
from llmprune.testing import TINY_TEXT, tiny_checkpoint, tiny_tokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
REPO = Path(__file__).resolve().parents[2]
WIKI_VALID = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"

# Small calibration: 4 windows × 32 tokens, loss measured on 2 held-out windows; the budget counts
# the decoder (these tests are of decoder pruning; --of total has its own in test_vocab_step.py).
SMALL = {"calib_samples": 4, "calib_seq_len": 32, "loss_windows": 2, "of": "decoder"}


def _calibration_text() -> str:
    """A slice of WikiText-2 validation when ../shared/data is there, else the tiny text repeated."""
    if WIKI_VALID.is_file():
        with WIKI_VALID.open(encoding="utf-8") as f:
            return f.read(40_000)
    return TINY_TEXT * 20


@pytest.fixture(scope="session")
def tok():
    """The tiny byte-level BPE tokenizer (read only)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def calib_texts() -> list[str]:
    """Calibration documents: plenty for 4×32 + 2 held-out windows."""
    return [_calibration_text()]


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, calib_texts) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(calib_texts[0], encoding="utf-8")
    return path


@pytest.fixture
def small_config():
    """make(**overrides) -> a CompressConfig with the small calibration."""

    def make(**overrides) -> CompressConfig:
        return CompressConfig(**{**SMALL, **overrides})

    return make


@pytest.fixture
def token_ids():
    """Deterministic BOS-prefixed ids [2, 40] (longer than gemma3's sliding window of 16)."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, 320, (2, 40), generator=g)
    ids[:, 0] = 1
    return ids


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: tiny_ckpt(arch) -> a saved tiny HF folder with tokenizer (cached; read only)."""
    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = tiny_checkpoint(tmp_path_factory.mktemp(f"compress-ckpt-{arch}"), arch)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def gpt2_ckpt(gpt2_checkpoint) -> Path:
    """A tiny GPT-2 checkpoint (the root conftest's): an architecture llmprune does not support."""
    return gpt2_checkpoint


def _llmprune_command() -> list[str]:
    script = Path(sys.executable).with_name("llmprune")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from llmprune.cli.main import main; sys.exit(main())"]


@pytest.fixture(scope="session")
def llmprune_cli():
    """run(*args, cwd) -> CompletedProcess of the real console script (one thread, text mode)."""

    def run(*args, cwd, timeout: float = 180):
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        return subprocess.run(_llmprune_command() + [str(a) for a in args], cwd=cwd, env=env,
                               capture_output=True, text=True, timeout=timeout)

    return run


def state_dict_equal(a: dict, b: dict) -> list[str]:
    """Names of the tensors that differ (or are missing) between two state dicts."""
    diff = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        if a[name].shape != b[name].shape or not torch.equal(a[name], b[name]):
            diff.append(name)
    return diff


@pytest.fixture(scope="session")
def compare_state_dicts():
    return state_dict_equal
