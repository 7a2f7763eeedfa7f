"""The `llmprune` command line: run in-process through main(argv) (run_main: exit code, stdout and
stderr as a subprocess would see them, without a new interpreter's imports per run), and as the real
console script in a subprocess (run_cli) where a process is the point: the installed script, a
bad-input error in a fresh interpreter, --debug's traceback, environment read at import, and the
real model's main jobs."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import llmprune
from llmprune.testing import TINY_TEXT

from ..conftest import run_cli, run_main

PARTS = ("embeddings", "attention", "mlp", "norms", "lm_head")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TINY_TEXT * 3, encoding="utf-8")
    return path


def assert_one_line_error(result, *fragments):
    """Exit code 2, nothing on stdout, exactly one stderr line naming the problem and the fix."""
    assert result.returncode == 2, f"exit code {result.returncode}, stderr:\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("llmprune"), lines[0]
    assert " error: " in lines[0]
    assert " — " in lines[0], f"no fix given: {lines[0]}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert result.stdout == ""


# ---------------------------------------------------------------- working commands


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_info_json(checkpoint, tmp_path, arch):
    result = run_main("info", checkpoint(arch), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == arch
    assert info["num_layers"] == len(info["layers"]) == 4
    p = info["parameters"]
    assert sum(p[k] for k in PARTS) == p["total"]
    assert p["tied_embeddings"] is (arch == "gemma3_text")
    assert [r["intermediate_size"] for r in info["layers"]] == [128] * 4
    assert info["layers"][2]["layer_type"] == "full_attention"


def test_info_text(checkpoint, tmp_path):
    result = run_main("info", checkpoint("qwen3"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "qwen3 (Qwen3ForCausalLM), 4 layers, hidden 64, vocab 320" in out
    assert "(tied to embeddings)" in out
    assert len(out.strip().splitlines()) == 3 + 4  # 2 summary lines, a header, one row per layer


def test_eval_json_matches_in_process_forward(checkpoint, data_file, tmp_path):
    folder = checkpoint("gemma3_text")
    result = run_main("eval", "--model", folder, "--data", data_file, "--seq-len", 32, "--max-windows", 3,
                      "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # stdout is exactly one JSON object
    for key in ("perplexity", "tokens", "seconds", "peak_rss_mb"):
        assert isinstance(out[key], (int, float)), key
    assert out["tokens"] == 3 * 32
    assert out["windows"] == 3
    assert out["seconds"] > 0 and out["peak_rss_mb"] > 0
    model, tok = llmprune.load(folder)
    windows = llmprune.token_windows(tok, [data_file.read_text(encoding="utf-8")], 32, 3)
    with torch.no_grad():
        expected = math.exp(model(input_ids=windows, labels=windows).loss.item())
    assert out["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_eval_text_output(checkpoint, data_file, tmp_path):
    result = run_main("eval", "--model", checkpoint("llama"), "--data", data_file, "--seq-len", 16,
                      "--max-windows", 2, "--batch-size", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("perplexity ")
    assert "on 32 tokens (2 windows × 16)" in line
    assert "tokens/s" in line and "peak RSS" in line


def test_eval_self_data_offline_and_seeded(checkpoint, tmp_path):
    """`--data self`: the model's own seeded samples, so evaluation needs no data file."""
    folder = checkpoint("llama")
    result = run_main("eval", "--model", folder, "--data", "self", "--seed", 1, "--seq-len", 64, "--max-windows", 4,
                      "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    model, tok = llmprune.load(folder)
    texts = llmprune.load_texts("self", model=model, tokenizer=tok, seed=1)
    expected = llmprune.perplexity(model, llmprune.token_windows(tok, texts, 64, 4), progress=False)
    assert out["tokens"] == 4 * 64
    assert out["perplexity"] == pytest.approx(expected.perplexity, rel=1e-4)


def test_version(tmp_path):
    # A subprocess: the installed console script exists and runs.
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"llmprune {llmprune.__version__}"


# ---------------------------------------------------------------- bad input: exit 2, one line


def test_missing_model_path(tmp_path, data_file):
    result = run_main("eval", "--model", tmp_path / "no-such-model", "--data", data_file, cwd=tmp_path)
    assert_one_line_error(result, "does not exist")


def test_missing_model_path_info(tmp_path):
    result = run_main("info", "./no-such-model", cwd=tmp_path)
    assert_one_line_error(result, "does not exist")


def test_unknown_model_name(tmp_path, data_file):
    # A subprocess: a bad input ends in one stderr line in a fresh interpreter too (its imports print nothing).
    result = run_cli("eval", "--model", "gemma-9", "--data", data_file, cwd=tmp_path)
    assert_one_line_error(result, "unknown model name 'gemma-9'", "gemma-3-270m")


def test_unsupported_architecture(gpt2_checkpoint, data_file, tmp_path):
    result = run_main("eval", "--model", gpt2_checkpoint, "--data", data_file, cwd=tmp_path)
    assert_one_line_error(result, "unsupported architecture 'gpt2'", "llama, mistral, qwen2, qwen3, gemma3_text")


def test_unsupported_architecture_info(gpt2_checkpoint, tmp_path):
    assert_one_line_error(run_main("info", gpt2_checkpoint, cwd=tmp_path), "unsupported architecture 'gpt2'")


def test_empty_data_file(checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    result = run_main("eval", "--model", checkpoint("llama"), "--data", empty, "--seq-len", 32, cwd=tmp_path)
    assert_one_line_error(result, "is empty")


def test_missing_data_file(checkpoint, tmp_path):
    result = run_main("eval", "--model", checkpoint("llama"), "--data", tmp_path / "nope.txt", "--seq-len", 32,
                      cwd=tmp_path)
    assert_one_line_error(result, "does not exist")


def test_invalid_json_data(checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    result = run_main("eval", "--model", checkpoint("llama"), "--data", bad, "--seq-len", 32, cwd=tmp_path)
    assert_one_line_error(result, "not valid JSON")


def test_data_too_short(checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.", encoding="utf-8")
    result = run_main("eval", "--model", checkpoint("llama"), "--data", short, "--seq-len", 64, cwd=tmp_path)
    assert_one_line_error(result, "data too short", "fewer than one window of 64")


def test_seq_len_beyond_max_positions(checkpoint, data_file, tmp_path):
    result = run_main("eval", "--model", checkpoint("llama"), "--data", data_file, "--seq-len", 256, cwd=tmp_path)
    assert_one_line_error(result, "--seq-len 256 is too long", "--seq-len 255 or less")


@pytest.mark.parametrize(("flag", "value", "fragment"), [
    ("--seq-len", "abc", "'abc' is not a whole number"),
    ("--seq-len", "0", "must be at least 1"),
    ("--max-windows", "four", "'four' is not a whole number"),
    ("--batch-size", "1.5", "'1.5' is not a whole number"),
    ("--dtype", "int3", "invalid choice"),
])
def test_bad_flag_values(checkpoint, data_file, tmp_path, flag, value, fragment):
    result = run_main("eval", "--model", checkpoint("llama"), "--data", data_file, flag, value, cwd=tmp_path)
    assert_one_line_error(result, f"argument {flag}", fragment)


def test_missing_required_flag(tmp_path):
    assert_one_line_error(run_main("eval", cwd=tmp_path), "--data")


def test_unknown_command(tmp_path):
    assert_one_line_error(run_main("squash", cwd=tmp_path), "invalid choice")


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed here")
def test_tasks_without_lm_eval(checkpoint, data_file, tmp_path):
    result = run_main("eval", "--model", checkpoint("llama"), "--data", data_file, "--tasks", "hellaswag", cwd=tmp_path)
    assert_one_line_error(result, "lm-evaluation-harness", "pip install 'llmprune[eval]'")


def test_debug_shows_the_traceback(tmp_path, data_file):
    # A subprocess: the traceback is the interpreter's, printed for an exception main() lets out.
    result = run_cli("--debug", "eval", "--model", "gemma-9", "--data", data_file, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "LLMPruneError" in result.stderr


def test_relative_path_typo_is_one_line_and_quick(tmp_path, data_file):
    """`--model out/pruned`, where the folder `out/` exists but `out/pruned` does not (a typo), is
    a missing path and must end like one: one line on stderr, in seconds.

    KNOWN LIBRARY BUG — this test fails today: resolve_model_spec reads any spec with exactly one
    `/` as a hub id, so transformers asks the Hub for it. Offline (as on CI; simulated here with
    HF_ENDPOINT on a closed local port) huggingface_hub retries for ~25 s and logs ~22 warning
    lines on stderr before llmprune's one-line error. Suggested fix: in cli/main.py
    `_quiet_third_party`, also call `huggingface_hub.utils.logging.set_verbosity_error()`; and in
    llmprune/models.py `resolve_model_spec`, report "model path '...' does not exist" when the
    first component of a one-slash spec exists locally as a folder."""
    import time

    # A subprocess: huggingface_hub reads HF_ENDPOINT and the offline switches when imported.
    (tmp_path / "out").mkdir()
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    start = time.monotonic()
    result = run_cli("eval", "--model", "out/pruned", "--data", data_file, cwd=tmp_path, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert_one_line_error(result, "out/pruned")
    assert elapsed < 20, f"a mistyped local path took {elapsed:.0f} s to report"


# ---------------------------------------------------------------- real model


@pytest.mark.integration
def test_info_gemma(tmp_path):
    # A subprocess: `llmprune info` of the default model, end to end as a user runs it.
    result = run_cli("info", "gemma-3-270m", "--json", cwd=tmp_path, threads=None)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    p = info["parameters"]
    assert info["architecture"] == "gemma3_text"
    assert info["num_layers"] == 18
    assert info["hidden_size"] == 640
    assert p["tied_embeddings"] is True
    assert p["lm_head"] == 0
    assert sum(p[k] for k in PARTS) == p["total"]
    assert 0.60 < p["embeddings"] / p["total"] < 0.66  # ~63% of the parameters are embeddings
    assert {(r["num_heads"], r["num_kv_heads"], r["intermediate_size"]) for r in info["layers"]} == {(4, 1, 2048)}
    assert {r["layer_type"] for r in info["layers"]} == {"sliding_attention", "full_attention"}


@pytest.mark.integration
def test_eval_gemma_main_job(gemma, shared_data, tmp_path):
    """The README's main job as a subprocess: `llmprune eval` (default model) on 4 windows of 512
    tokens (+BOS) of wiki.test.raw, against an independent computation here: own tokenization
    and windowing, HF loss of a plain forward with labels per window, averaged, exp.
    (Reference: 23.08 here, llama.cpp 23.21 on the same GGUF.)"""
    wiki = shared_data / "wikitext2" / "wiki.test.raw"
    result = run_cli("eval", "--data", wiki, "--seq-len", 512, "--max-windows", 4, "--json", cwd=tmp_path, threads=None)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tokens"] == 4 * 512
    assert out["windows"] == 4

    model, tok = gemma
    with open(wiki, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"][: 4 * 512]
    windows = torch.cat([torch.full((4, 1), tok.bos_token_id), torch.tensor(ids).view(4, 512)], dim=1)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    assert out["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert 20 < out["perplexity"] < 27


@pytest.mark.parametrize("command", ["compress", "recover", "export"])
@pytest.mark.parametrize("repo, env, message", [
    ("me/pruned", {"HF_HUB_OFFLINE": "1"}, "--push-to-hub: this machine is offline (HF_HUB_OFFLINE is set)"),
    ("not a repo", {}, "--push-to-hub 'not a repo' is not a repo id"),
])
def test_push_to_hub_offline_or_malformed_is_one_line_before_any_work(command, repo, env, message, checkpoint,
                                                                     data_file, tmp_path):
    out = tmp_path / "out"
    args = {"compress": ["--model", checkpoint("llama"), "--ratio", "0.2", "--calib", data_file],
            "recover": ["--model", checkpoint("llama"), "--data", data_file],
            "export": ["--model", checkpoint("llama")]}[command]
    result = run_main(command, *map(str, args), "--out", str(out), "--push-to-hub", repo, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and " — " in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
