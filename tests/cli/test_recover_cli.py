"""`llmprune recover`: one federated run through the real console script (--json), and bad
input: each a one-line error, exit code 2, nothing written to --out."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune.cli.main import main
from llmprune.testing import TINY_TEXT

from ..conftest import run_cli

SMALL = ["--clients", "2", "--rounds", "1", "--local-steps", "2", "--seq-len", "32", "--batch-size", "2",
         "--lora-rank", "2"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("recover-data") / "text.txt"
    path.write_text(TINY_TEXT * 6, encoding="utf-8")
    return path


def test_recover_json_end_to_end(checkpoint, data_file, tmp_path):
    model = checkpoint("qwen3")
    out = tmp_path / "recovered"
    result = run_cli("recover", "--model", model, "--data", data_file, "--out", out, *SMALL,
                     "--partition", "dirichlet:2", "--aggregation", "hetlora", "--eval-windows", "2", "--json",
                     cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)              # stdout is exactly one JSON document
    (row,) = metrics["rounds"]
    assert (row["round"], row["clients_sampled"], row["clients_returned"], row["applied"]) == (1, 2, 2, True)
    for key in ("train_loss", "eval_perplexity", "bytes_up", "bytes_down", "seconds"):
        assert isinstance(row[key], (int, float)) and row[key] > 0, key
    assert [(d["rank"], d["depth"]) for d in metrics["devices"]] == [(2, 4), (2, 4)]
    assert metrics["aggregation"] == "hetlora" and metrics["config"]["partition"] == "dirichlet:2"
    assert sum(c["windows"] for c in metrics["data"]["clients"]) > 0 and metrics["data"]["eval_windows"] == 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rounds"] == metrics["rounds"] and saved["devices"] == metrics["devices"]
    # the merged model loads like compress's checkpoints, with the same architecture, and changed
    recovered, base = llmprune.load_model(out), llmprune.load_model(model)
    assert llmprune.load_config(out).model_type == "qwen3"
    assert recovered.state_dict().keys() == base.state_dict().keys()
    changed = [k for k, v in recovered.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("proj" in k for k in changed)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["recovery"]["rounds"] == 1 and report["recovery"]["source"] == str(model)


# ---------------------------------------------------------------- bad input (in process: no ray starts)


def run_main(capfd, *args) -> tuple[int, str, str]:
    code = main(["recover", *map(str, args)])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2, err
    assert out == ""
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"stderr should be one line:\n{err}"
    assert lines[0].startswith("llmprune recover: error: ") and " — " in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def nothing_written(out) -> bool:
    return not out.exists() and not out.with_name(f"{out.name}.rounds").exists() and \
        not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_not_a_checkpoint_folder(capfd, data_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    assert_one_line_error(*run_main(capfd, "--model", empty, "--data", data_file, "--out", out, *SMALL),
                          f"'{empty}' is not a checkpoint folder")
    assert nothing_written(out)


def test_data_too_small_for_the_clients(capfd, checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A few words for a federation. " * 12)
    out = tmp_path / "out"
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", short, "--out", out,
                                    *SMALL[2:], "--clients", "40"),
                          "data too small for 40 clients", "training windows of 32 tokens")
    assert nothing_written(out)


def test_impossible_fleet_budget(capfd, checkpoint, data_file, tmp_path):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[device]]\nname = "phone"\nmemory_mb = 8000\n\n[[device]]\nname = "old-watch"\nmemory_mb = 12\n')
    out = tmp_path / "out"
    code, stdout, err = run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                 "--fleet", fleet, "--aggregation", "hetlora")
    assert_one_line_error(code, stdout, err, "device 'old-watch' has 12 MB", "raise its memory_mb to at least")
    assert nothing_written(out)


@pytest.mark.parametrize("partition", ["dirichlet:abc", "dirichlet:0", "shards", "iid:3"])
def test_bad_partition(capfd, checkpoint, data_file, tmp_path, partition):
    out = tmp_path / "out"
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                    "--partition", partition),
                          f"unknown --partition '{partition}'", "dirichlet:ALPHA")
    assert nothing_written(out)


def test_existing_out_without_overwrite(capfd, checkpoint, data_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL),
                          "exists and is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert not out.with_name("out.rounds").exists()


@pytest.mark.parametrize("flag, value, message", [("--fraction", "1.5", "must be in (0, 1]"),
                                                  ("--aggregation", "median", "invalid choice"),
                                                  ("--dp-noise", "-1", "not a non-negative number")])
def test_bad_flags_are_one_line_usage_errors(capfd, checkpoint, data_file, tmp_path, flag, value, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["recover", "--model", str(checkpoint("llama")), "--data", str(data_file), "--out", str(out), flag, value])
    captured = capfd.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], captured.err
    assert nothing_written(out)
