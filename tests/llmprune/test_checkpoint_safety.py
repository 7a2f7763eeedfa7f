"""The checkpoint format under hostile input: what --out may be and what --overwrite may replace,
temporary folders left by killed runs, disk full, foreign code in a source folder, a tampered
modeling file, and loading through stock transformers without trust_remote_code."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.checkpoint import (
    MODELING_FILE,
    REPORT_FILE,
    atomic_output_dir,
    check_modeling_file,
    check_output_dir,
    modeling_source,
    pruned_class,
    register_pruned_classes,
    save_pruned,
    stale_temp_dirs,
)
from llmprune.errors import LLMPruneError
from llmprune.testing import tiny_config, tiny_tokenizer

EXPORT_REPORT = "export_report.json"


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and " — " in text, text
    return text


def pruned_model(arch: str = "llama", seed: int = 0):
    """A tiny model with one narrower MLP and one layer with fewer query heads."""
    config = tiny_config(arch, num_hidden_layers=2)
    config.llmprune = {"format_version": 1, "layer_map": [0, 2], "original_num_hidden_layers": 3,
                       "layers": [{"intermediate_size": 96, "num_attention_heads": 4},
                                  {"intermediate_size": 128, "num_attention_heads": 2, "mlp_out_bias": True}]}
    torch.manual_seed(seed)
    return pruned_class(AutoModelForCausalLM._model_mapping[type(config)])(config).eval()


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory) -> Path:
    """A pruned checkpoint written by save_pruned (read only)."""
    return save_pruned(pruned_model(), tiny_tokenizer(), tmp_path_factory.mktemp("safety") / "pruned")


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


IDS = torch.tensor([[1, 5, 9, 40, 7]])


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=ids).logits


# --- 4c / 3 / 1: what --out may be -----------------------------------------------------------------

def _make(tmp_path: Path, kind: str) -> Path:
    out = tmp_path / "out"
    if kind == "missing":
        return out
    if kind == "file":
        out.write_text("x")
        return out
    if kind == "under-file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "out"
    out.mkdir()
    if kind == "git":
        (out / ".git").mkdir()
        (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        (out / "notes.txt").write_text("mine")
    elif kind == "compress-output":
        (out / REPORT_FILE).write_text("{}")
        (out / "model.safetensors").write_text("x")
    elif kind == "export-output":
        (out / EXPORT_REPORT).write_text("{}")
        (out / "model.onnx").write_text("x")
    return out


@pytest.mark.parametrize("kind,overwrite,marker,error", [
    ("missing", False, REPORT_FILE, None),
    ("empty", False, REPORT_FILE, None),
    ("empty", True, REPORT_FILE, None),
    ("compress-output", True, REPORT_FILE, None),                       # an earlier compress/recover output
    ("export-output", True, EXPORT_REPORT, None),                       # an earlier export output
    ("compress-output", False, REPORT_FILE, "exists and is not empty"),
    ("git", True, REPORT_FILE, "not an earlier output of this command (it has no pruning_report.json)"),
    ("git", True, EXPORT_REPORT, "(it has no export_report.json)"),
    ("export-output", True, REPORT_FILE, "(it has no pruning_report.json)"),  # compress never replaces an export
    ("compress-output", True, EXPORT_REPORT, "(it has no export_report.json)"),
    ("file", True, REPORT_FILE, "exists and is not a folder"),
    ("under-file", False, REPORT_FILE, "which is a file, not a folder"),
])
def test_what_an_output_folder_may_be(tmp_path, kind, overwrite, marker, error):
    out = _make(tmp_path, kind)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if error is None:
        check_output_dir(out, overwrite, marker)
    else:
        with pytest.raises(LLMPruneError) as exc:
            check_output_dir(out, overwrite, marker)
        assert error in one_line(exc)
        with pytest.raises(LLMPruneError):  # the atomic writer refuses it the same way, writing nothing
            with atomic_output_dir(out, overwrite, marker):
                pytest.fail("must not be reached")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("out,error", [
    ("", "--out is empty"),
    ("   ", "--out is empty"),
    ("/proc/llmprune-out", "cannot be written"),
    ("/proc/self/status/out", "which is a file"),  # under a file of /proc
])
def test_unusable_outputs_are_refused_before_any_work(out, error):
    with pytest.raises(LLMPruneError) as exc:
        check_output_dir(out, overwrite=True)
    assert error in one_line(exc)


def test_overwrite_replaces_an_earlier_output_and_the_next_overwrite_works_too(tmp_path):
    out = tmp_path / "out"
    for round_ in range(2):
        save_pruned(pruned_model(seed=round_), None, out, overwrite=True)
        assert (out / REPORT_FILE).is_file()  # always written: it marks the folder as replaceable
    assert os.listdir(tmp_path) == ["out"]


# --- 1: disk full / read-only while writing ----------------------------------------------------------

@pytest.mark.parametrize("code,fragment", [
    (errno.ENOSPC, "no space left on the device while writing --out"),
    (errno.EDQUOT, "no space left on the device while writing --out"),
    (errno.EROFS, "could not write --out"),
])
def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, code, fragment):
    out = tmp_path / "out"
    with pytest.raises(LLMPruneError) as exc:
        with atomic_output_dir(out) as tmp:
            (tmp / "part").write_text("x")
            raise OSError(code, os.strerror(code), str(tmp / "model.safetensors"))
    assert fragment in one_line(exc) and "nothing was written" in str(exc.value)
    assert os.listdir(tmp_path) == []


def test_disk_full_in_save_pruned_leaves_the_old_output(tmp_path, monkeypatch):
    out = save_pruned(pruned_model(), None, tmp_path / "out")
    before = sorted(os.listdir(out))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(pruned_model()), "save_pretrained", full)
    with pytest.raises(LLMPruneError, match="no space left on the device"):
        save_pruned(pruned_model(seed=1), None, out, overwrite=True)
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["out"]


def test_a_read_error_inside_the_block_is_not_called_a_write_error(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_output_dir(tmp_path / "out"):
            raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/else/model.safetensors")
    assert os.listdir(tmp_path) == []


# --- 3: temporary folders of killed runs ---------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    from llmprune.checkpoint import atomic_output_dir
    with atomic_output_dir(sys.argv[1], overwrite=True) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(60)
""")


def _start_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir(), "the writer did not start"
    return proc, tmp


@pytest.mark.parametrize("target", ["out", "out.onnx"])
def test_a_later_run_removes_what_a_killed_run_left(tmp_path, target):
    out = tmp_path / target
    alive, alive_tmp = _start_writer(out)
    killed, killed_tmp = _start_writer(out)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert killed_tmp.is_dir() and killed_tmp.name.startswith(f".{target}.tmp-{killed.pid}-")
        other = tmp_path / f".{target}x.tmp-{killed.pid}-abc"  # another target's: not ours to remove
        other.mkdir()
        foreign = tmp_path / f".{target}.tmp-{killed.pid}-nomarker"  # no owner file: never removed
        foreign.mkdir()
        assert stale_temp_dirs(out) == [killed_tmp]
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / REPORT_FILE).write_text("{}")
        assert not killed_tmp.exists()
        assert alive_tmp.is_dir(), "a running writer's folder was removed"
        assert other.is_dir() and foreign.is_dir()
    finally:
        alive.kill()
        alive.wait(10)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / REPORT_FILE).write_text("{}")
    assert sorted(os.listdir(tmp_path)) == sorted([target, other.name, foreign.name])


def test_the_owner_file_does_not_end_up_in_the_output(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert os.listdir(tmp_path / "out") == ["a"]


# --- 4a: no foreign code in what we write ------------------------------------------------------------

@pytest.fixture(scope="module")
def foreign_source(tmp_path_factory) -> Path:
    """A tiny model folder with custom code: .py files and auto_map in config.json and
    tokenizer_config.json; importing any of it would leave a file 'PWNED' beside the folder."""
    from llmprune.testing import tiny_checkpoint

    folder = tiny_checkpoint(tmp_path_factory.mktemp("foreign") / "src", "llama", max_position_embeddings=512)
    flag = folder.parent / "PWNED"
    for name in ("modeling_evil.py", "tokenization_evil.py", "configuration_evil.py"):
        (folder / name).write_text(f"open({str(flag)!r}, 'w').write('x')\nclass Evil: pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.Evil", "AutoModelForCausalLM": "modeling_evil.Evil"}
    config["custom_pipelines"] = {"evil": {"impl": "modeling_evil.Evil"}}
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Evil", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def _assert_only_our_code(out: Path) -> None:
    assert sorted(p.name for p in out.rglob("*.py")) == [MODELING_FILE]
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_llmprune.PrunedCausalLM"}
    assert "custom_pipelines" not in config
    for path in out.glob("*.json"):
        if path.name != "config.json":
            assert "auto_map" not in json.loads(path.read_text()), path.name


@pytest.mark.parametrize("low_memory", [False, True])
def test_compress_writes_no_foreign_code(foreign_source, tmp_path, low_memory):
    from llmprune.compress import CompressConfig, compress
    from llmprune.testing import TINY_TEXT

    cfg = CompressConfig(ratio=0.2, of="decoder", calib_samples=2, calib_seq_len=32, loss_windows=1,
                         low_memory=low_memory)
    out = tmp_path / "out"
    compress(str(foreign_source), cfg, calib=[TINY_TEXT * 10], out=out)
    _assert_only_our_code(out)
    assert not (foreign_source.parent / "PWNED").exists()


def test_save_pruned_of_a_model_with_foreign_code_writes_none(foreign_source, tmp_path):
    model, tok = llmprune.load(foreign_source)
    out = save_pruned(model, tok, tmp_path / "out")
    _assert_only_our_code(out)
    assert not (foreign_source.parent / "PWNED").exists()


# --- 4b: loading without running code from the folder ----------------------------------------------------

@pytest.fixture
def registered():
    """register_pruned_classes() for one test; transformers' auto mapping restored after."""
    mapping = AutoModelForCausalLM._model_mapping
    saved = dict(mapping._extra_content)
    yield register_pruned_classes()
    mapping._extra_content.clear()
    mapping._extra_content.update(saved)


def test_stock_auto_loading_without_trust_remote_code(registered, pruned_folder, foreign_source):
    assert set(registered) == set(llmprune.SUPPORTED_ARCHITECTURES)
    expected = logits(llmprune.load_model(pruned_folder))
    auto = AutoModelForCausalLM.from_pretrained(pruned_folder).eval()  # no trust_remote_code
    assert type(auto).__name__ == "PrunedCausalLM" and type(auto).__module__ == "llmprune.checkpoint"
    torch.testing.assert_close(logits(auto), expected, rtol=0, atol=1e-6)
    # An unpruned model still gets the stock class, and the folder's own code is not run.
    plain = AutoModelForCausalLM.from_pretrained(foreign_source)
    assert type(plain) is AutoModelForCausalLM._model_mapping[type(plain.config)]._llmprune_stock
    assert not (foreign_source.parent / "PWNED").exists()
    assert type(AutoModelForCausalLM.from_config(tiny_config("qwen2"))).__module__.startswith("transformers.models.")
    assert register_pruned_classes() == registered  # idempotent


def test_the_modeling_file_we_write_is_the_one_we_check(pruned_folder):
    stock = AutoModelForCausalLM._model_mapping[type(tiny_config("llama"))]
    assert (pruned_folder / MODELING_FILE).read_text() == modeling_source(stock)
    check_modeling_file(pruned_folder, stock)


@pytest.mark.parametrize("tamper", [
    lambda text: text + "\nimport os; os.system('echo pwned')\n",
    lambda text: text.replace("apply_pruned_shapes(self, config)", "pass"),
    lambda text: text.replace("\n", "\r\n"),
    lambda text: "",
])
@pytest.mark.parametrize("how", ["llmprune.load", "auto", "compress --low-memory"])
def test_a_tampered_modeling_file_is_refused(registered, pruned_folder, tmp_path, tamper, how):
    folder = copy_folder(pruned_folder, tmp_path / "tampered")
    path = folder / MODELING_FILE
    path.write_text(tamper(path.read_text()), newline="")
    with pytest.raises(LLMPruneError) as exc:
        if how == "llmprune.load":
            llmprune.load(folder)
        elif how == "auto":
            AutoModelForCausalLM.from_pretrained(folder)
        else:
            from llmprune.compress import CompressConfig, compress

            compress(str(folder), CompressConfig(ratio=0.2, low_memory=True), calib="x.txt", out=tmp_path / "o")
    text = one_line(exc)
    assert "is not the modeling file llmprune writes" in text and "trust_remote_code" in text
    assert not (tmp_path / "o").exists()


def test_a_folder_without_the_modeling_file_loads(pruned_folder, tmp_path):
    folder = copy_folder(pruned_folder, tmp_path / "nofile")
    (folder / MODELING_FILE).unlink()
    torch.testing.assert_close(logits(llmprune.load_model(folder)), logits(llmprune.load_model(pruned_folder)))


# --- 5: no pickle -----------------------------------------------------------------------------------------

def test_nothing_in_the_package_unpickles():
    """torch.load only with weights_only=True (today: not at all), and no pickle module."""
    import re

    root = Path(llmprune.__file__).resolve().parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        if any(part in (".venv", "tests", "bench", "build") or part.startswith(".") for part in path.relative_to(root).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path}: {match.group(0)}")
        if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M):
            offenders.append(f"{path}: imports pickle")
    assert offenders == []
