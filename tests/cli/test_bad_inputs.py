"""Hostile inputs, command × class: every one ends in one stderr line naming the problem and the
fix, exit code 2, no traceback, nothing on stdout and nothing written. Run in-process (fast); the
real console script is covered by test_cli.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmprune.testing import TINY_TEXT, tiny_checkpoint

from .test_cli import assert_one_line_error

DOWN = "model.layers.1.mlp.down_proj.weight"


def run_main(capsys, *args):
    from llmprune.cli.main import main

    try:
        code = main([a if isinstance(a, str) else str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()

    class Result:
        returncode, stdout, stderr = code, captured.out, captured.err

    return Result


# ---------------------------------------------------------------- broken checkpoints


def _edit_config(**changes):
    def edit(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _write_config(text: str):
    def edit(folder: Path):
        (folder / "config.json").write_text(text)
    return edit


def _truncate(size: int):
    def edit(folder: Path):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:size])
    return edit


def _edit_tensors(drop=(), add=None, reshape=None):
    def edit(folder: Path):
        tensors = load_file(folder / "model.safetensors")
        tensors = {k: v for k, v in tensors.items() if k not in drop}
        tensors.update(add or {})
        for name, shape in (reshape or {}).items():
            tensors[name] = torch.zeros(shape)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


def _shrink_vocabulary(rows: int):
    """config.json's vocab_size and the embedding / LM head cut to `rows`, the tokenizer kept whole."""
    def edit(folder: Path):
        _edit_config(vocab_size=rows)(folder)
        tensors = load_file(folder / "model.safetensors")
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = tensors[name][:rows].contiguous()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


# class -> (how the copy of a good tiny checkpoint is broken, fragments of the error line)
BROKEN = {
    "config-string-size": (_edit_config(hidden_size="sixty-four"), ["hidden_size = 'sixty-four'", "not a positive whole number"]),
    "config-negative-layers": (_edit_config(num_hidden_layers=-2), ["num_hidden_layers = -2"]),
    "config-json-list": (_write_config("[1, 2, 3]"), ["holds a JSON list", "config.json"]),
    "config-not-json": (_write_config("{'hidden_size': 64"), ["is not valid JSON"]),
    "weights-truncated": (_truncate(5000), ["model.safetensors' is truncated or corrupt", "the file has 5000"]),
    "weights-empty": (_truncate(0), ["is truncated or corrupt", "0 bytes"]),
    "weights-missing-tensor": (_edit_tensors(drop=[DOWN]), ["do not match its config.json", "missing from the weights", DOWN]),
    "config-more-layers": (_edit_config(num_hidden_layers=6), ["do not match its config.json", "18 tensor(s) missing",
                                                               "model.layers.4."]),
    "weights-extra-tensor": (_edit_tensors(add={"model.extra.weight": torch.zeros(4)}), ["no place for", "model.extra.weight"]),
    "weights-wrong-shape": (_edit_tensors(reshape={DOWN: (64, 100)}), ["other shapes", f"{DOWN} is [64, 100] in the weights"]),
    "tokenizer-more-ids-than-embedding-rows": (_shrink_vocabulary(200), ["the tokenizer has 320 ids but the embedding"
                                                                         " only 200 rows"]),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("good") / "T", "llama")


@pytest.fixture(scope="module")
def broken_checkpoint(good_checkpoint, tmp_path_factory):
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            folder = tmp_path_factory.mktemp(name) / "ckpt"
            shutil.copytree(good_checkpoint, folder)
            BROKEN[name][0](folder)
            made[name] = folder
        return made[name]

    return make


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TINY_TEXT * 3, encoding="utf-8")
    return path


def command(name: str, model, data: Path, out: Path) -> list:
    """The argv of `name` on `model`; commands that write do it into `out`."""
    return {
        "eval": ["eval", "--model", model, "--data", data, "--seq-len", "16", "--max-windows", "1"],
        "info": ["info", model],
        "generate": ["generate", "--model", model, "--prompt", "The quick", "--max-new-tokens", "4"],
        "export": ["export", "--model", model, "--out", out, "--eval-windows", "1", "--eval-seq-len", "16"],
        "compress": ["compress", "--model", model, "--ratio", "0.2", "--out", out, "--calib", data],
        "recover": ["recover", "--model", model, "--data", data, "--out", out, "--clients", "1", "--rounds", "1"],
    }[name]


LOADING_COMMANDS = ("eval", "info", "generate", "export", "compress")
# recover takes a checkpoint folder only (no packaged names), checked before Flower starts
FOLDER_COMMANDS = (*LOADING_COMMANDS, "recover")


def assert_nothing_written(out: Path):
    assert not out.exists(), f"{out} was written"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


@pytest.mark.parametrize("cmd", FOLDER_COMMANDS)
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_broken_checkpoint(broken_checkpoint, data_file, tmp_path, capsys, cmd, broken):
    out = tmp_path / "out"
    result = run_main(capsys, *command(cmd, broken_checkpoint(broken), data_file, out))
    assert_one_line_error(result, *BROKEN[broken][1])
    assert "re-create or re-download" in result.stderr
    assert_nothing_written(out)


@pytest.mark.parametrize("cmd", ("eval", "info", "generate"))
def test_more_embedding_rows_than_tokenizer_ids_is_fine(tmp_path, data_file, capsys, cmd):
    """Stock Qwen checkpoints pad their tables beyond the tokenizer's ids: not a broken checkpoint."""
    from llmprune.models import check_checkpoint

    folder = tiny_checkpoint(tmp_path / "padded", "qwen2", vocab_size=384)
    check_checkpoint(folder)  # recover's check
    result = run_main(capsys, *command(cmd, folder, data_file, tmp_path / "out"))
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def broken_pruned_checkpoint(tmp_path_factory):
    """A pruned checkpoint (per-layer shapes in config.json) missing one tensor."""
    from llmprune.checkpoint import save_pruned
    from llmprune.testing import tiny_tokenizer

    from ..export.conftest import LAYER_MAP, pruned_tiny_model

    folder = tmp_path_factory.mktemp("pruned") / "ckpt"
    save_pruned(pruned_tiny_model("llama"), tiny_tokenizer(), folder, layer_map=LAYER_MAP)
    _edit_tensors(drop=["model.layers.2.mlp.up_proj.weight"])(folder)
    return folder


@pytest.mark.parametrize("cmd", FOLDER_COMMANDS)
def test_pruned_checkpoint_missing_a_tensor(broken_pruned_checkpoint, data_file, tmp_path, capsys, cmd):
    out = tmp_path / "out"
    result = run_main(capsys, *command(cmd, broken_pruned_checkpoint, data_file, out))
    assert_one_line_error(result, "missing from the weights", "model.layers.2.mlp.up_proj.weight")
    assert_nothing_written(out)


def test_pruned_checkpoint_wrong_shape_is_named(tmp_path):
    """A pruned layer width in config.json that the weights do not have."""
    import llmprune
    from llmprune.checkpoint import save_pruned
    from llmprune.testing import tiny_tokenizer

    from ..export.conftest import LAYER_MAP, pruned_tiny_model

    folder = save_pruned(pruned_tiny_model("qwen3"), tiny_tokenizer(), tmp_path / "ckpt", layer_map=LAYER_MAP)
    config = json.loads((folder / "config.json").read_text())
    config["llmprune"]["layers"][0]["intermediate_size"] = 64  # the weights hold 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(llmprune.LLMPruneError, match=r"model\.layers\.0\.mlp\.down_proj\.weight is \[64, 96\] in the weights"):
        llmprune.load_model(folder)


# ---------------------------------------------------------------- model paths that are not folders


def _non_utf8_folder(good_checkpoint, tmp_path) -> str:
    folder = os.path.join(os.fsencode(tmp_path), b"model-\xff")
    shutil.copytree(good_checkpoint, os.fsdecode(folder))
    return os.fsdecode(folder)


def _fifo(good_checkpoint, tmp_path) -> str:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return str(path)


MODEL_PATHS = {
    "non-utf8-name": (_non_utf8_folder, ["has a name that is not valid UTF-8", "rename it"]),
    "character-device": (lambda good, tmp: "/dev/zero", ["'/dev/zero' is a character device"]),
    "fifo": (_fifo, ["is a FIFO (named pipe)"]),
}


@pytest.mark.parametrize("cmd", FOLDER_COMMANDS)
@pytest.mark.parametrize("kind", sorted(MODEL_PATHS))
def test_model_path_that_cannot_be_a_model(good_checkpoint, data_file, tmp_path, capsys, cmd, kind):
    model = MODEL_PATHS[kind][0](good_checkpoint, tmp_path)
    out = tmp_path / "out"
    result = run_main(capsys, *command(cmd, model, data_file, out))
    assert_one_line_error(result, *MODEL_PATHS[kind][1])
    assert_nothing_written(out)


# ---------------------------------------------------------------- the model cache (LLMPRUNE_CACHE_DIR)


@pytest.fixture
def tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh tmpfs folder (root only), unmounted afterwards."""
    mounted = []

    def mount(options: str) -> Path:
        target = tmp_path / f"tmpfs{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], capture_output=True)


def _read_only_dir(tmpfs, tmp_path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").mkdir()
    except OSError:
        return folder  # not root: permissions alone make it read-only
    (folder / "probe").rmdir()
    folder.chmod(0o755)
    return tmpfs("ro,size=64k")  # root writes anywhere: a read-only file system


def _truncated_cache(tmpfs, tmp_path, good_checkpoint=None) -> Path:
    """A fake converted packaged model (never the real one) whose weights were cut short."""
    target = tmp_path / "cache" / "models" / "gemma-3-270m"
    shutil.copytree(good_checkpoint, target)
    _truncate(3000)(target)
    return tmp_path / "cache"


CACHE_DIRS = {
    "read-only": (_read_only_dir, ["cannot write the model cache", "set LLMPRUNE_CACHE_DIR to a writable folder"]),
    "under-proc": (lambda tmpfs, tmp: Path("/proc/llmprune-cache"), ["cannot write the model cache '/proc/llmprune-cache'"]),
    "regular-file": (lambda tmpfs, tmp: (tmp / "cache-file").write_text("x") and tmp / "cache-file",
                     ["is a file, not a folder", "LLMPRUNE_CACHE_DIR"]),
    "under-a-file": (lambda tmpfs, tmp: (tmp / "cache-file").write_text("x") and tmp / "cache-file" / "sub",
                     ["cannot write the model cache", "Not a directory"]),
    "truncated-cached-model": (_truncated_cache, ["is truncated or corrupt", "delete the cache folder",
                                                  "models/gemma-3-270m"]),
}


@pytest.mark.parametrize("cmd", LOADING_COMMANDS)
@pytest.mark.parametrize("kind", sorted(CACHE_DIRS))
def test_unusable_model_cache(tmpfs, good_checkpoint, data_file, tmp_path, capsys, monkeypatch, cmd, kind):
    make, fragments = CACHE_DIRS[kind]
    cache = make(tmpfs, tmp_path, good_checkpoint) if make is _truncated_cache else make(tmpfs, tmp_path)
    monkeypatch.setenv("LLMPRUNE_CACHE_DIR", str(cache))
    out = tmp_path / "out"
    result = run_main(capsys, *command(cmd, "gemma-3-270m", data_file, out))
    assert_one_line_error(result, *fragments)
    assert_nothing_written(out)


# ---------------------------------------------------------------- export outputs that cannot be written


def _out_read_only(tmpfs, tmp_path) -> Path:
    return _read_only_dir(tmpfs, tmp_path) / "onnx"


OUTPUTS = {
    "read-only": (_out_read_only, ["cannot be written", "Read-only file system", "choose a writable folder for --out"]),
    "under-proc": (lambda tmpfs, tmp: Path("/proc/llmprune-onnx"), ["--out '/proc/llmprune-onnx' cannot be written"]),
    "under-a-file": (lambda tmpfs, tmp: (tmp / "file").write_text("x") and tmp / "file" / "onnx",
                     ["which is a file, not a folder"]),
    "a-character-device": (lambda tmpfs, tmp: Path("/dev/null"), ["exists and is not a folder"]),
}


@pytest.mark.parametrize("kind", sorted(OUTPUTS))
def test_export_output_not_writable_is_refused_before_loading(good_checkpoint, tmpfs, tmp_path, capsys, monkeypatch, kind):
    import llmprune.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(llmprune.models, "load", no_load)
    out = OUTPUTS[kind][0](tmpfs, tmp_path)
    result = run_main(capsys, *command("export", good_checkpoint, None, out))
    assert_one_line_error(result, *OUTPUTS[kind][1])


def test_export_disk_full_on_tmpfs(good_checkpoint, tmpfs, capsys):
    disk = tmpfs("size=200k")  # far less than the tiny model's ONNX file
    out = disk / "onnx"
    result = run_main(capsys, *command("export", good_checkpoint, None, out))
    assert_one_line_error(result, "no space left on the device", "nothing was written", "free disk space")
    assert list(disk.iterdir()) == []


def test_export_disk_full_simulated(good_checkpoint, tmp_path, capsys, monkeypatch):
    """The same without a mount: the first ONNX write fails with ENOSPC."""
    import onnx

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save_model", full)
    monkeypatch.setattr(onnx, "save", full)
    import torch.onnx

    monkeypatch.setattr(torch.onnx, "export", full)
    out = tmp_path / "onnx"
    result = run_main(capsys, *command("export", good_checkpoint, None, out))
    assert_one_line_error(result, "no space left on the device", f"'{out}'")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- eval data that is not text


def _data_fifo(tmp_path) -> str:
    path = tmp_path / "data.fifo"
    os.mkfifo(path)
    return str(path)


DATA_PATHS = {
    "dev-zero": (lambda tmp: "/dev/zero", ["data path '/dev/zero' is a character device", "not a text file or folder"]),
    "fifo": (_data_fifo, ["is a FIFO (named pipe)", "point --data at"]),
}


@pytest.mark.parametrize("kind", sorted(DATA_PATHS))
def test_eval_data_that_is_not_a_file(good_checkpoint, tmp_path, capsys, kind):
    data = DATA_PATHS[kind][0](tmp_path)
    result = run_main(capsys, "eval", "--model", good_checkpoint, "--data", data, "--seq-len", "16")
    assert_one_line_error(result, *DATA_PATHS[kind][1])


# ---------------------------------------------------------------- generate beyond the context


def _prompt_tokens(text: str) -> int:
    from llmprune.export.parity import prompt_ids
    from llmprune.testing import tiny_tokenizer

    return len(prompt_ids(tiny_tokenizer(), text))


@pytest.mark.parametrize(("prompt", "new", "fragments"), [
    ("The quick", "100000", ["--max-new-tokens 100000 with a prompt of", "context of 256 tokens", "or less"]),
    ("The quick", "LIMIT+1", ["--max-new-tokens LIMIT+1", "pass --max-new-tokens LIMIT or less"]),
    ("fox " * 30000, "4", ["the prompt is", "context is 256 tokens", "shorten the prompt to at most 255 tokens"]),
])
def test_generate_beyond_the_context(good_checkpoint, tmp_path, capsys, prompt, new, fragments):
    limit = 256 - _prompt_tokens(prompt)
    new = new.replace("LIMIT+1", str(limit + 1))
    fragments = [f.replace("LIMIT+1", str(limit + 1)).replace("LIMIT", str(limit)) for f in fragments]
    result = run_main(capsys, "generate", "--model", good_checkpoint, "--prompt", prompt, "--max-new-tokens", new)
    assert_one_line_error(result, *fragments)


def test_generate_up_to_the_context_runs(good_checkpoint, capsys):
    """The largest value the error suggests is accepted."""
    limit = 256 - _prompt_tokens("The quick")
    result = run_main(capsys, "generate", "--model", good_checkpoint, "--prompt", "The quick", "--max-new-tokens", str(limit))
    assert result.returncode == 0, result.stderr
