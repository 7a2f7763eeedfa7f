"""`llmprune compress` through the real console script (subprocesses)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import llmprune


def assert_one_line_error(result, *fragments, progress: bool = False):
    """Exit code 2, nothing on stdout, the error on one stderr line naming the fix. Errors found
    before any work leave stderr at that one line; `progress`: errors found mid-run may follow
    the run's progress log lines, and are then the last line."""
    assert result.returncode == 2, f"exit code {result.returncode}, stderr:\n{result.stderr}"
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    if not progress:
        assert len(lines) == 1, f"stderr should be one line:\n{result.stderr}"
    errors = [l for l in lines if l.startswith("llmprune")]
    assert errors == [lines[-1]], f"one error line, last:\n{result.stderr}"
    assert lines[-1].startswith("llmprune compress: error: "), lines[-1]
    assert " — " in lines[-1], f"no fix given: {lines[-1]}"
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    assert result.stdout == ""


def leftovers(folder) -> list[str]:
    """Temporary siblings an interrupted or failed write could leave ('.NAME.tmp-*', '.NAME.old-*')."""
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


def test_compress_json_then_eval(llmprune_cli, tiny_ckpt, calib_file, tmp_path, token_ids):
    out = tmp_path / "pruned"
    result = llmprune_cli("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.3", "--out", out, "--calib", calib_file,
                          "--calib-samples", "4", "--calib-seq-len", "32", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert abs(report["ratio_achieved"] - 0.3) <= 0.01
    assert report["method"] == "comp" and report["out"] == str(out)
    assert report["config"]["calib_samples"] == 4 and report["calibration"]["windows"] == 4
    assert json.loads((out / "pruning_report.json").read_text())["ratio_achieved"] == report["ratio_achieved"]
    assert leftovers(out) == []
    model = llmprune.load_model(out)
    assert [l.mlp.down_proj.in_features for l in model.model.layers] == [
        r["neurons_after"] for r in report["layers"] if not r["dropped"]]

    evaluated = llmprune_cli("eval", "--model", out, "--data", calib_file, "--seq-len", "32", "--max-windows", "2",
                             "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    ppl = json.loads(evaluated.stdout)
    assert ppl["windows"] == 2 and ppl["tokens"] == 64
    assert math.isfinite(ppl["perplexity"]) and ppl["perplexity"] > 1
    # The CLI's perplexity is the pruned model's, recomputed here in process.
    windows = llmprune.token_windows(llmprune.load_tokenizer(out), [calib_file.read_text()], 32, 2)
    with torch.inference_mode():
        out_logits = model(input_ids=windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(out_logits.reshape(-1, out_logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert ppl["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_existing_out_without_overwrite_is_refused_and_untouched(llmprune_cli, tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = llmprune_cli("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", out, "--calib", calib_file,
                          "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(result, "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(out) == []


def test_failing_run_leaves_no_output(llmprune_cli, tiny_ckpt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only. " * 5)
    out = tmp_path / "never"
    result = llmprune_cli("compress", "--model", tiny_ckpt("qwen2"), "--ratio", "0.2", "--out", out, "--calib", short,
                          "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(result, "too little calibration text", "4×32")
    assert not out.exists()
    assert leftovers(out) == []


def test_failing_run_with_overwrite_keeps_the_old_folder(llmprune_cli, tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = llmprune_cli("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.8", "--method", "wanda-sp", "--out", out,
                          "--calib", calib_file, "--calib-samples", "4", "--calib-seq-len", "32", "--overwrite", cwd=tmp_path)
    assert_one_line_error(result, "no MLP neuron", progress=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(out) == []


def test_unsupported_architecture_exits_2(llmprune_cli, gpt2_ckpt, calib_file, tmp_path):
    out = tmp_path / "gpt2-pruned"
    result = llmprune_cli("compress", "--model", gpt2_ckpt, "--ratio", "0.2", "--out", out, "--calib", calib_file,
                          "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(result, "unsupported architecture 'gpt2'")
    assert not out.exists() and leftovers(out) == []


def test_ratio_outside_zero_one_exits_2(llmprune_cli, tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "out"
    result = llmprune_cli("compress", "--model", tiny_ckpt("llama"), "--ratio", "1.5", "--out", out, "--calib", calib_file,
                          cwd=tmp_path)
    assert_one_line_error(result, "--ratio must be between 0 and 1")
    assert not out.exists()


# --- one source of defaults ------------------------------------------------------------------------

@pytest.mark.parametrize("argv,calib,kwargs", [
    ([], "self", {}),
    ([], "data.txt", {}),
    (["--calib-samples", "8"], "self", {"calib_samples": 8}),
    (["--method", "wanda-sp", "--prune-heads", "--layer-share", "0.5", "--refit"], "data.txt",
     {"method": "wanda-sp", "prune_heads": True, "layer_share": 0.5, "fit": "refit"}),
    (["--allocation", "uniform", "--fit", "scales", "--head-ratio", "0.25", "--seed", "3", "--intercept"], "self",
     {"allocation": "uniform", "fit": "scales", "head_ratio": 0.25, "seed": 3, "intercept": True}),
])
def test_the_cli_and_the_api_resolve_the_same_config(argv, calib, kwargs):
    from llmprune.cli.compress import build_config
    from llmprune.cli.main import build_parser
    from llmprune.compress import CompressConfig

    args = build_parser().parse_args(["compress", "--ratio", "0.3", "--out", "x", "--calib", calib, *argv])
    from_cli = build_config(args)
    from_api = CompressConfig(ratio=0.3, **kwargs).with_calibration_defaults(calib)
    assert from_cli == from_api
    expected = (16, 256) if calib == "self" else (32, 512)
    assert (from_api.calib_samples, from_api.calib_seq_len) == (kwargs.get("calib_samples", expected[0]), expected[1])


def test_the_api_samples_what_the_cli_samples_for_self(monkeypatch, tok):
    """compress(..., calib='self') asks for 16×256 (+ loss windows) of generated text, as the CLI does."""
    import llmprune.data
    from llmprune.compress import CompressConfig, compress
    from llmprune.testing import tiny_model

    asked = {}

    def fake_load_texts(spec, model=None, tokenizer=None, seed=0, self_tokens=None):
        asked["self_tokens"] = self_tokens
        raise RuntimeError("stop here")

    monkeypatch.setattr(llmprune.data, "load_texts", fake_load_texts)
    with pytest.raises(RuntimeError, match="stop here"):
        compress(tiny_model("llama"), CompressConfig(ratio=0.2), tokenizer=tok, calib="self")
    assert asked["self_tokens"] == (16 + 4) * 256


def test_taylor_with_low_memory_is_refused_before_any_work(llmprune_cli, tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "out"
    result = llmprune_cli("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", out, "--calib", calib_file,
                          "--method", "taylor", "--low-memory", cwd=tmp_path)
    assert_one_line_error(result, "--method taylor has no --low-memory path", "drop --low-memory")
    assert not out.exists() and leftovers(out) == []
