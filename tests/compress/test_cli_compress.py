"""`llmprune compress` through its command line: in-process through main(argv) (run_main: exit code,
stdout and stderr as a subprocess would see them), and the main job once through the real console
script (a subprocess)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmprune

from ..conftest import run_main


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
    # A subprocess: the main job end to end through the installed console script (then eval in-process).
    result = llmprune_cli("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.3", "--out", out, "--calib", calib_file,
                          "--calib-samples", "4", "--calib-seq-len", "32", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # The default budget counts the whole model (--of total): unused vocabulary rows, then the decoder.
    assert report["config"]["of"] == "total" and abs(report["total_reduction"] - 0.3) <= 0.01
    assert report["method"] == "comp" and report["out"] == str(out)
    assert report["config"]["calib_samples"] == 4 and report["calibration"]["windows"] == 4
    assert json.loads((out / "pruning_report.json").read_text())["ratio_achieved"] == report["ratio_achieved"]
    assert leftovers(out) == []
    card = (out / "README.md").read_text()           # the model card: the command that made it, the measured
    assert f"llmprune compress --model {tiny_ckpt('llama')} --ratio 0.3" in card
    assert f"| parameters | {report['params_after']['total']:,} of {report['params_before']['total']:,}" in card
    model = llmprune.load_model(out)
    assert [l.mlp.down_proj.in_features for l in model.model.layers] == [
        r["neurons_after"] for r in report["layers"] if not r["dropped"]]

    evaluated = run_main("eval", "--model", out, "--data", calib_file, "--seq-len", "32", "--max-windows", "2",
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


def test_existing_out_without_overwrite_is_refused_and_untouched(tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", out, "--calib", calib_file,
                      "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(result, "not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(out) == []


def test_failing_run_leaves_no_output(tiny_ckpt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words only. " * 5)
    out = tmp_path / "never"
    result = run_main("compress", "--model", tiny_ckpt("qwen2"), "--ratio", "0.2", "--of", "decoder", "--out", out,
                      "--calib", short, "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(result, "too little calibration text", "4×32")
    # The default budget (--of total) ranks the vocabulary on the same text first, and says so.
    result = run_main("compress", "--model", tiny_ckpt("qwen2"), "--ratio", "0.2", "--out", out, "--calib", short,
                      "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(result, "(--vocab-data, else --calib) has only", "--of decoder")
    assert not out.exists()
    assert leftovers(out) == []


def test_failing_run_with_overwrite_keeps_the_old_folder(tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "pruning_report.json").write_text("{}")  # an earlier compress output: --overwrite may replace it
    result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.8", "--of", "decoder", "--method",
                      "wanda-sp", "--out", out, "--calib", calib_file, "--calib-samples", "4", "--calib-seq-len", "32",
                      "--overwrite", cwd=tmp_path)
    assert_one_line_error(result, "no MLP neuron", progress=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "pruning_report.json"]
    assert leftovers(out) == []


def test_unsupported_architecture_exits_2(gpt2_ckpt, calib_file, tmp_path):
    out = tmp_path / "gpt2-pruned"
    result = run_main("compress", "--model", gpt2_ckpt, "--ratio", "0.2", "--out", out, "--calib", calib_file,
                      "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert_one_line_error(result, "unsupported architecture 'gpt2'")
    assert not out.exists() and leftovers(out) == []


def test_ratio_outside_zero_one_exits_2(tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "out"
    result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "1.5", "--out", out, "--calib", calib_file,
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
        compress(tiny_model("llama", max_position_embeddings=512), CompressConfig(ratio=0.2), tokenizer=tok, calib="self")
    assert asked["self_tokens"] == (16 + 4) * 256


def test_taylor_with_low_memory_is_refused_before_any_work(tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "out"
    result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", out, "--calib", calib_file,
                      "--method", "taylor", "--low-memory", cwd=tmp_path)
    assert_one_line_error(result, "--method taylor has no --low-memory path", "drop --low-memory")
    assert not out.exists() and leftovers(out) == []


# --- hostile inputs: refused in one line, before any work, leaving nothing -----------------------------

def _bad_out(tmp_path, case):
    """(the --out to pass, extra flags) for a case of the table below."""
    if case == "empty":
        return "", []
    if case == "proc":
        return "/proc/llmprune-out", []
    if case == "under-file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "out", []
    out = tmp_path / "out"
    if case == "git":
        (out / ".git").mkdir(parents=True)
        (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (out / "notes.txt").write_text("mine")
        return out, ["--overwrite"]
    if case == "export-output":
        out.mkdir()
        (out / "export_report.json").write_text("{}")
        (out / "model.onnx").write_text("x")
        return out, ["--overwrite"]
    if case == "seq-len":
        return out, ["--calib-seq-len", "5000"]
    if case == "seq-len-edge":
        return out, ["--calib-seq-len", "256"]  # 256 positions: 255 tokens + BOS is the most
    raise ValueError(case)


@pytest.mark.parametrize("case,low_memory,fragments", [
    ("empty", False, ["--out is empty", "pass the folder"]),
    ("proc", False, ["--out '/proc/llmprune-out' cannot be written", "choose a writable folder"]),
    ("under-file", False, ["which is a file, not a folder", "not under a file"]),
    ("git", False, ["is not an earlier output of this command (it has no pruning_report.json)", "will not delete it"]),
    ("git", True, ["is not an earlier output of this command (it has no pruning_report.json)", "will not delete it"]),
    ("export-output", False, ["it has no pruning_report.json"]),
    ("seq-len", False, ["--calib-seq-len 5000 is longer than the model's 256 positions", "pass --calib-seq-len 255 or less"]),
    ("seq-len", True, ["--calib-seq-len 5000 is longer than the model's 256 positions", "pass --calib-seq-len 255 or less"]),
    ("seq-len-edge", False, ["--calib-seq-len 256 is longer", "pass --calib-seq-len 255 or less"]),
])
def test_hostile_inputs_are_refused_before_any_work(tiny_ckpt, calib_file, tmp_path, case, fragments,
                                                    low_memory):
    out, flags = _bad_out(tmp_path, case)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = ["compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", out, "--calib", calib_file,
            "--calib-samples", "4", *(["--calib-seq-len", "32"] if "--calib-seq-len" not in flags else []), *flags]
    result = run_main(*argv, *(["--low-memory"] if low_memory else []), cwd=tmp_path)
    assert_one_line_error(result, *fragments)  # one line: no progress log, so no work was done
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or deleted


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs (the tiny checkpoint needs about 700 KiB); skipped where mount is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
    except OSError:
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("low_memory", [False, True])
def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tiny_ckpt, calib_file, small_disk,
                                                                tmp_path, low_memory):
    out = small_disk / "pruned"
    result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", out, "--calib", calib_file,
                      "--calib-samples", "4", "--calib-seq-len", "32", *(["--low-memory"] if low_memory else []),
                      cwd=tmp_path)
    assert_one_line_error(result, f"no space left on the device while writing --out '{out}'", "nothing was written",
                          "free disk space", progress=True)
    assert list(small_disk.iterdir()) == []


def test_a_read_only_out_is_refused_before_any_work(tiny_ckpt, calib_file, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=100k", "tmpfs", str(ro)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", ro / "pruned",
                          "--calib", calib_file, "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
        assert_one_line_error(result, "cannot be written", "Read-only file system", "choose a writable folder")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


KILLED_WRITER = """
import sys, time
from llmprune.checkpoint import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "model.safetensors").write_bytes(bytes(100_000))
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_compress_removes_what_a_killed_run_left(tiny_ckpt, calib_file, tmp_path):
    """A run killed with SIGKILL (no cleanup possible) leaves '.NAME.tmp-PID-*'; the next run of
    the same --out removes it."""
    out = tmp_path / "pruned"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert left.is_dir() and leftovers(out) == [left.name]
    result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", out, "--calib", calib_file,
                      "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert leftovers(out) == [] and (out / "pruning_report.json").is_file()


def test_compress_overwrites_its_own_earlier_output(tiny_ckpt, calib_file, tmp_path):
    out = tmp_path / "pruned"
    for ratio in ("0.2", "0.3"):
        result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", ratio, "--out", out, "--calib",
                          calib_file, "--calib-samples", "4", "--calib-seq-len", "32", "--overwrite", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "pruning_report.json").read_text())["ratio_requested"] == float(ratio)
    assert leftovers(out) == []


def test_a_tampered_modeling_file_is_refused(tiny_ckpt, calib_file, tmp_path):
    import shutil

    src = tmp_path / "pruned"
    result = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", src, "--calib", calib_file,
                      "--calib-samples", "4", "--calib-seq-len", "32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tampered = shutil.copytree(src, tmp_path / "tampered")
    with (tampered / "modeling_llmprune.py").open("a") as f:
        f.write("\nimport os\n")
    for flags in ([], ["--low-memory"]):
        result = run_main("compress", "--model", tampered, "--ratio", "0.2", "--out", tmp_path / "again", "--calib",
                          calib_file, "--calib-samples", "4", "--calib-seq-len", "32", *flags, cwd=tmp_path)
        assert_one_line_error(result, "modeling_llmprune.py' is not the modeling file llmprune writes",
                              "never load this folder with trust_remote_code=True")
        assert not (tmp_path / "again").exists()


def test_compress_without_calib_reads_python_docs_and_says_how_to_calibrate_for_a_domain(tiny_ckpt, tmp_path):
    from ..conftest import run_main

    out = tmp_path / "pruned"
    done = run_main("compress", "--model", tiny_ckpt("llama"), "--ratio", "0.2", "--out", out, "--calib-samples", "4",
                    "--calib-seq-len", "32", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert ("calibrated on python-docs (4×32 tokens) — the Python language reference; for a model tuned to your text "
            "pass --calib FILE") in done.stdout
    assert json.loads((out / "pruning_report.json").read_text())["calibration_data"] == "python-docs"
