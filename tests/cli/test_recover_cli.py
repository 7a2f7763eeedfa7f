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
    assert metrics["aggregation"] == "hetlora" and metrics["config"]["data.partition"] == "dirichlet:2"
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
    try:
        code = main(["recover", *map(str, args)])
    except SystemExit as exc:        # argparse refused a flag's value (one line, exit 2)
        code = exc.code
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


def test_a_budget_no_submodel_fits_and_submodels_without_a_fleet(capfd, checkpoint, data_file, tmp_path):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[device]]\nname = "phone"\nmemory_mb = 8000\n\n[[device]]\nname = "old-watch"\nmemory_mb = 12\n')
    out = tmp_path / "out"
    code, stdout, err = run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                 "--fleet", fleet, "--aggregation", "hetlora", "--policy", "submodels")
    assert_one_line_error(code, stdout, err, "device 'old-watch' has 12 MB but the smallest submodel (1 layer, rank 1)",
                          "raise its memory_mb to at least")
    assert nothing_written(out)
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                    "--policy", "submodels"), "--policy submodels needs --fleet", "pass a fleet file")
    assert nothing_written(out)


@pytest.mark.parametrize("flags, message, fix", [
    (["--policy", "bandit", "--arm-sizes", ""], "the bandit's arm grid is empty", "--arm-sizes"),
    (["--policy", "bandit"], "no bandit arm fits device 'old-watch' (12 MB)", "--skip-unfit"),
    (["--policy", "devft", "--devft-stages", "2,1"], "does not grow", ""),
    (["--policy", "devft", "--devft-stages", "1,9"], "exceeds", ""),
    (["--policy", "prune-tune", "--target-ratio", "0.01", "--eval-data", "DATA"], "is below the checkpoint's ratio", ""),
    (["--arm-sizes", "0.5"], "--arm-sizes is a setting of --policy bandit, not of --policy plan", "add --policy bandit"),
])
def test_bad_adaptive_settings_are_one_line_before_anything_starts(capfd, checkpoint, data_file, tmp_path, flags,
                                                                   message, fix):
    """An empty arm grid, arms no declared budget admits, a schedule that does not grow or exceeds
    the layers, a target ratio below the checkpoint's: one line, exit 2, nothing written."""
    from llmprune.testing import tiny_checkpoint

    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[device]]\nname = "phone"\nmemory_mb = 8000\n\n[[device]]\nname = "old-watch"\nmemory_mb = 12\n')
    model = checkpoint("llama")
    if "--target-ratio" in flags:   # a checkpoint pruned at about 0.4 of its dense model's decoder
        from llmprune.compress import CompressConfig, compress

        model = tmp_path / "pruned"
        dense = tiny_checkpoint(tmp_path / "dense")
        compress(str(dense), CompressConfig(ratio=0.4, of="decoder", calib_samples=2, calib_seq_len=16, loss_windows=1),
                 calib=[TINY_TEXT * 4], out=model)
        capfd.readouterr()          # compress's own progress bars are not the run's output
    out = tmp_path / "out"
    flags = [str(data_file) if f == "DATA" else f for f in flags]
    rounds = ["--rounds", "3"] if "devft" in flags else []
    fleet_flags = ["--fleet", fleet] if "bandit" in flags else []
    assert_one_line_error(*run_main(capfd, "--model", model, "--data", data_file, "--out", out, *SMALL, *rounds,
                                    *fleet_flags, "--aggregation", "hetlora", *flags), message, fix)
    assert nothing_written(out)


@pytest.mark.parametrize("partition", ["dirichlet:abc", "dirichlet:0", "shards", "iid:3"])
def test_bad_partition(capfd, checkpoint, data_file, tmp_path, partition):
    out = tmp_path / "out"
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                    "--partition", partition),
                          f"unknown partition '{partition}'", "dirichlet:ALPHA")
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
                                                  ("--aggregation", "median", "unknown aggregation 'median'"),
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


# ---------------------------------------------------------------- hostile input: each a one line, exit 2, before any work


def _saved_state(folder, model):
    """A valid round-1 state of the SMALL settings, as `llmprune recover` would have saved it."""
    import numpy as np

    from llmprune.fedrecover import RecoverConfig
    from llmprune.fedrecover.lora import init_arrays, module_shapes
    from llmprune.fedrecover.planning import meta_model
    from llmprune.fedrecover.state import RoundState, save_state

    cfg = RecoverConfig.of(clients=2, rounds=1, local_steps=2, seq_len=32, batch_size=2, lora_rank=2)
    shapes = module_shapes(meta_model(str(model)), cfg.training.target_modules)
    arrays = {k: np.asarray(v) for k, v in init_arrays(shapes, list(shapes), 2, 0).items()}
    save_state(folder, RoundState(1, arrays, [{"round": 1, "applied": True}]), cfg, model=str(model.resolve()))


def _edit_state(change):
    def edit(folder):
        path = folder / "state.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return edit


def _truncate(folder):
    path = folder / "round-001.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _foreign(folder):
    from safetensors.numpy import load_file, save_file

    path = folder / "round-001.safetensors"
    save_file({f"x.{k}": v for k, v in load_file(str(path)).items()}, str(path))


@pytest.mark.parametrize("damage, message", [
    (_edit_state(lambda meta: [meta]), "state.json holds a JSON list, not an object"),
    (_edit_state(lambda meta: {k: v for k, v in meta.items() if k != "rounds"}), "state.json has no 'rounds'"),
    (_truncate, "round-001.safetensors' is unreadable"),
    (_foreign, "does not hold this run's LoRA adapter"),
])
def test_resume_from_a_broken_state(capfd, checkpoint, data_file, tmp_path, damage, message):
    model, out = checkpoint("llama"), tmp_path / "out"
    state = tmp_path / "out.rounds"
    _saved_state(state, model)
    damage(state)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in state.iterdir())
    assert_one_line_error(*run_main(capfd, "--model", model, "--data", data_file, "--out", out, *SMALL[:2],
                                    "--rounds", "2", *SMALL[4:], "--resume"), message, "--overwrite")
    assert not out.exists() and sorted((p.name, p.stat().st_mtime_ns) for p in state.iterdir()) == before


@pytest.mark.parametrize("device, message", [
    ('rank = -4', "device 'phone' has rank = -4"),
    ('rank = "big"', "device 'phone' has rank = 'big'"),
    ('depth = -4', "device 'phone' has depth = -4"),
    ('depth = "big"', "device 'phone' has depth = 'big'"),
    ('sped = 0.5', "device 'phone' has unknown key 'sped' — the keys of a device are name, memory_mb, speed"),
])
def test_bad_fleet_entries(capfd, checkpoint, data_file, tmp_path, device, message):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[device]]\nname = "phone"\nmemory_mb = 8000\n{device}\n')
    out = tmp_path / "out"
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                    "--fleet", fleet, "--aggregation", "hetlora"), message)
    assert nothing_written(out)


@pytest.mark.parametrize("flag, value, message", [("--seed", "-1", "-1 must be 0 or more"),
                                                  ("--seed", "1.5", "'1.5' is not a whole number"),
                                                  ("--round-timeout", "0", "must be positive")])
def test_bad_seed_and_timeout_are_usage_errors(capfd, checkpoint, data_file, tmp_path, flag, value, message):
    test_bad_flags_are_one_line_usage_errors(capfd, checkpoint, data_file, tmp_path, flag, value, message)


# ---------------------------------------------------------------- Ctrl-C: prompt exit 130, one true line, no processes left


def _group_members(pgid: int) -> list[int]:
    import os

    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def _nice_and_auth(pid: int) -> tuple[int, bool, str]:
    stat = open(f"/proc/{pid}/stat").read()
    fields = stat.rsplit(")", 1)[1].split()
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(fields[16]), b"RAY_AUTH_MODE=token" in env, stat.split("(", 1)[1].rsplit(")", 1)[0]


def test_ctrl_c_ends_the_run_promptly_and_says_what_is_kept(checkpoint, data_file, tmp_path):
    """A real `llmprune recover` in its own process group: SIGINT (twice, like an impatient user)
    once round 1 is saved; while it runs, every process of the run is at normal priority and Ray's
    services demand a token."""
    import os
    import signal
    import subprocess
    import time

    from ..conftest import llmprune_command

    out = tmp_path / "out"
    state = tmp_path / "out.rounds" / "state.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.Popen(llmprune_command() + ["-q", "recover", "--model", str(checkpoint("llama")), "--data",
                                                  str(data_file), "--out", str(out), *SMALL[:2], "--rounds", "500",
                                                  *SMALL[4:]],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pgid = proc.pid
    try:
        deadline = time.monotonic() + 600          # start-up on a busy machine: generous, not a measurement
        while not state.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
        members = [p for p in _group_members(pgid) if p != proc.pid]
        assert members, "no ray processes in the run's process group"
        seen = {}
        for pid in members:
            try:
                seen[pid] = _nice_and_auth(pid)
            except OSError:
                pass
        assert seen and all(nice == 0 for nice, _, _ in seen.values()), seen
        services = [(auth, comm) for _, auth, comm in seen.values() if comm in ("gcs_server", "raylet")]
        assert services and all(auth for auth, _ in services), seen      # Ray's services demand the token
        os.killpg(pgid, signal.SIGINT)
        time.sleep(0.5)
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGINT)             # the impatient second Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("llmprune recover: interrupted after round "), err[-3000:]
    assert f"{out}.rounds/ keeps the finished rounds" in last and "--resume" in last
    assert state.exists() and not out.exists()
    time.sleep(1)
    assert _group_members(pgid) == [], "processes of the run are left"


def test_a_run_killed_outright_leaves_no_process_behind(checkpoint, data_file, tmp_path):
    """SIGKILL to `llmprune recover` alone (no clean-up can run in it): its watchdog ends Ray's
    services, agents and workers within seconds, then itself."""
    import os
    import signal
    import subprocess
    import time

    from ..conftest import llmprune_command

    state = tmp_path / "out.rounds" / "state.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(llmprune_command() + ["-q", "recover", "--model", str(checkpoint("llama")), "--data",
                                                  str(data_file), "--out", str(tmp_path / "out"), *SMALL[:2],
                                                  "--rounds", "500", *SMALL[4:]],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    pgid = proc.pid
    try:
        deadline = time.monotonic() + 600
        while not state.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.5)
        watchdogs = [pid for pid in _all_pids() if f"reaper.py {proc.pid}" in _cmdline(pid)]
        assert len(watchdogs) == 1 and [p for p in _group_members(pgid) if p != proc.pid]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30       # the watchdog's grace is 3 s; a busy machine is slower
        while (_group_members(pgid) or os.path.exists(f"/proc/{watchdogs[0]}")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _group_members(pgid) == [], "processes of the killed run are left"
        assert not os.path.exists(f"/proc/{watchdogs[0]}"), "the watchdog is left"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def _all_pids() -> list[int]:
    import os

    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_teacher_of_another_vocabulary_and_a_distill_flag_without_teacher(capfd, checkpoint, data_file, tmp_path):
    from llmprune.testing import tiny_model

    other = tmp_path / "other-teacher"
    tiny_model("llama", vocab_size=400).save_pretrained(other)
    out = tmp_path / "out"
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                    "--teacher", other), "the teacher has 400 tokens", "use a teacher with")
    assert nothing_written(out)
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                    "--distill", "device"), "--distill needs --teacher")
    assert nothing_written(out)


def test_a_window_longer_than_the_models_positions(capfd, checkpoint, data_file, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(*run_main(capfd, "--model", checkpoint("llama"), "--data", data_file, "--out", out, *SMALL,
                                    "--seq-len", "4096"), "--seq-len 4096 is beyond the model's 256 positions",
                          "pass --seq-len 256 or less")
    assert nothing_written(out)


def test_split_training_refuses_what_it_cannot_do(capfd, checkpoint, data_file, tmp_path):
    """--policy split: a cut past the model, a device that cannot hold one layer (naming the smallest
    budget), and the options it cannot combine with — each one line, exit 2, before Flower starts."""
    model, out = checkpoint("llama"), tmp_path / "out"
    base = ["--model", model, "--data", data_file, "--out", out, *SMALL, "--policy", "split"]
    assert_one_line_error(*run_main(capfd, *base, "--split-layers", "4"),
                          "--split-layers 4 leaves the server none of the model's 4 layers", "--split-layers 3 or fewer")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[device]]\nname = "phone"\nmemory_mb = 8000\n\n[[device]]\nname = "old-watch"\nmemory_mb = 12\n')
    assert_one_line_error(*run_main(capfd, *base, "--fleet", fleet),
                          "device 'old-watch' has 12 MB but the smallest submodel (1 layer", "raise its memory_mb to at least")
    assert_one_line_error(*run_main(capfd, *base, "--secagg"), "--policy split cannot be combined with --secagg")
    assert_one_line_error(*run_main(capfd, *base, "--dp-clip", "1"), "--policy split cannot be combined with --dp-clip")
    assert_one_line_error(*run_main(capfd, *base, "--teacher", model, "--distill", "device"),
                          "--policy split cannot be combined with --teacher on the devices")
    assert nothing_written(out)
