"""`llmprune export` and `llmprune generate` through their command line, and their bad-input errors
(one line, exit 2, nothing written). The export and an ONNX generate run the real console script (a
subprocess each); the other runs are in-process through main(argv) (run_main: exit code, stdout and
stderr as a subprocess would see them)."""

from __future__ import annotations

import json

import pytest

from ..cli.test_cli import assert_one_line_error
from ..conftest import run_cli, run_main

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def cli_export(pruned_checkpoint, tmp_path_factory):
    """`llmprune export --quantize int4 --ort --genai --json` of a pruned checkpoint folder."""
    out = tmp_path_factory.mktemp("cli-export") / "onnx"
    # A subprocess: the main job end to end through the installed console script.
    result = run_cli("export", "--model", pruned_checkpoint, "--out", out, "--quantize", "int4", "--ort", "--genai", "--json",
                     "--eval-windows", "2", "--eval-seq-len", "32", cwd=out.parent, env={"OMP_NUM_THREADS": "1"})
    return result, out


def test_export_cli_writes_checked_folder(cli_export):
    result, out = cli_export
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert json.loads((out / "export_report.json").read_text()) == report
    fp32, int4 = report["variants"]["fp32"], report["variants"]["int4"]
    assert fp32["logits"]["max_abs_logit_diff"] < 1e-4 and fp32["generation"]["all_equal"]
    assert report["model"]["num_hidden_layers"] == 3
    assert 50 < report["peak_rss_mb"] < 20_000        # the export process's own peak, model load included
    assert [s["step"] for s in report["steps"]][:3] == [
        "trace and write the fp32 ONNX", "run PyTorch on the parity inputs (logits, greedy tokens, perplexity)",
        "check fp32 against PyTorch"]
    assert all(s["seconds"] >= 0 and 0 < s["peak_rss_mb"] <= report["peak_rss_mb"] + 1 for s in report["steps"])
    assert [l["intermediate_size"] for l in report["model"]["pruned_layers"]] == [96, 40, 128]
    for folder in (out, out / "int4"):
        assert {"model.onnx", "model.ort", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert int4["sizes"]["onnx_bytes"] < fp32["sizes"]["onnx_bytes"] / 2
    for step in ("trace and write the fp32 ONNX", "check fp32 against PyTorch", "quantize int4 and check it",
                 "write the onnxruntime-genai config", "convert int4 to .ort and check it"):
        assert f"export: {step}" in result.stderr                 # each long step is shown, with its time
    card = (out / "README.md").read_text()                 # the model card, from the report
    assert f"ONNX export (KV cache) of `{report['source']}`" in card and "| int4 |" in card and "llmprune export" in card
    assert int4["perplexity"]["change"] is not None


def test_generate_onnx_equals_pytorch(cli_export, pruned_checkpoint, tmp_path):
    _, out = cli_export
    # A subprocess: generate from an export as a user runs it (onnxruntime in a fresh process); PyTorch in-process.
    onnx = run_cli("generate", "--onnx", out, "--prompt", PROMPT, "--max-new-tokens", "16", "--threads", "1", cwd=tmp_path)
    torch_run = run_main("generate", "--model", pruned_checkpoint, "--prompt", PROMPT, "--max-new-tokens", "16", cwd=tmp_path)
    assert onnx.returncode == 0, onnx.stderr
    assert torch_run.returncode == 0, torch_run.stderr
    assert onnx.stdout.startswith(PROMPT) and len(onnx.stdout.strip()) > len(PROMPT)
    assert onnx.stdout == torch_run.stdout  # same greedy continuation, KV cache in both
    assert "tokens/s, onnxruntime" in onnx.stderr and "tokens/s, PyTorch" in torch_run.stderr


def test_generate_quantized_and_ort_format(cli_export, tmp_path):
    _, out = cli_export
    result = run_main("generate", "--onnx", out / "int4", "--prompt", PROMPT, "--max-new-tokens", "8", "--ort-format",
                      "--threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and result.stderr.strip().split()[0] in {str(n) for n in range(1, 9)}


def test_generate_genai_equals_onnxruntime(cli_export, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    _, out = cli_export
    runs = [run_main("generate", "--onnx", out / "int4", "--prompt", PROMPT, "--max-new-tokens", "12", "--threads", "1", *extra,
                     cwd=tmp_path) for extra in ([], ["--genai"])]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[1].stdout == runs[0].stdout  # BOS first in both: the same greedy continuation
    assert "tokens/s, onnxruntime-genai" in runs[1].stderr


# ---------------------------------------------------------------- bad input (in-process: fast)


def _main(capsys, *args):
    from llmprune.cli.main import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()

    class Result:
        returncode, stdout, stderr = code, captured.out, captured.err

    return Result


def test_not_a_checkpoint(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    out = tmp_path / "onnx"
    result = _main(capsys, "export", "--model", folder, "--out", out)
    assert_one_line_error(result, "is not a model folder")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_existing_output_needs_overwrite(pruned_checkpoint, tmp_path, capsys):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _main(capsys, "export", "--model", pruned_checkpoint, "--out", out)
    assert_one_line_error(result, "exists and is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_unsupported_architecture_cli(gpt2_checkpoint, tmp_path, capsys):
    out = tmp_path / "onnx"
    result = _main(capsys, "export", "--model", gpt2_checkpoint, "--out", out)
    assert_one_line_error(result, "unsupported architecture 'gpt2'")
    assert not out.exists()


def test_generate_without_export(tmp_path, capsys):
    result = _main(capsys, "generate", "--onnx", tmp_path, "--prompt", "hi")
    assert_one_line_error(result, "holds no model.onnx")


def test_generate_ort_format_needs_a_model_ort(tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"")       # an export without --ort: only model.onnx
    result = _main(capsys, "generate", "--onnx", tmp_path, "--prompt", "hi", "--ort-format")
    assert_one_line_error(result, "holds no model.ort", "drop --ort-format")


def test_generate_genai_needs_onnx(capsys):
    result = _main(capsys, "generate", "--model", "x", "--genai", "--prompt", "hi")
    assert_one_line_error(result, "--genai runs an ONNX export")


def test_bad_quantize_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        _main(capsys, "export", "--model", "x", "--out", "y", "--quantize", "int3")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int3" in err[0]


@pytest.mark.parametrize("opset", ["3", "13", "99"])
def test_unsupported_opset_is_refused_before_loading(pruned_checkpoint, tmp_path, capsys, monkeypatch, opset):
    """Not "the exporter could not take this model" (with 200 KB of graph on stdout) after the
    load: the range is checked first."""
    import llmprune.models

    monkeypatch.setattr(llmprune.models, "load", lambda *a, **k: pytest.fail("loaded before checking --opset"))
    out = tmp_path / "onnx"
    result = _main(capsys, "export", "--model", pruned_checkpoint, "--out", out, "--opset", opset)
    assert_one_line_error(result, f"--opset {opset} is not supported", "pass --opset between 14 and")
    assert not out.exists()


def test_exporter_output_on_fd1_is_kept_off_stdout(capfd):
    """torch.onnx prints a whole IR graph from C++ on fd 1 when an export fails."""
    import os

    from llmprune.export.onnx import stdout_to_log

    with stdout_to_log():
        os.write(1, b"Torch IR graph at exception: graph(...)\n")
    print("after")
    assert capfd.readouterr().out == "after\n"


def _genai(extra):
    if "--genai" in extra:
        pytest.importorskip("onnxruntime_genai")


@pytest.mark.parametrize("extra", [[], ["--ort-format"], ["--genai"]], ids=["onnx", "ort", "genai"])
@pytest.mark.parametrize(("prompt", "new", "fragments"), [
    (PROMPT, "100000", ["--max-new-tokens 100000 with a prompt of", "the export's context of 256 tokens", "or less"]),
    ("fox " * 30000, "4", ["the prompt is", "the export's context is 256 tokens", "shorten the prompt to at most 255"]),
], ids=["max-new-tokens", "long-prompt"])
def test_generate_onnx_beyond_the_context(cli_export, tmp_path, capsys, extra, prompt, new, fragments):
    """Before: onnxruntime's allocation failure as "unexpected Fail" after minutes."""
    _genai(extra)
    _, out = cli_export
    result = _main(capsys, "generate", "--onnx", out / "int4", "--prompt", prompt, "--max-new-tokens", new, *extra)
    assert_one_line_error(result, *fragments)
