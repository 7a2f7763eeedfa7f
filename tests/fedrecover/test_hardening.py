"""Hostile input and hostile conditions, without a Flower run: a broken --resume state, a seed
below 0, run configs that try to choose server paths on a fleet, how long a round waits
(simulation: for every client; fleet: the round timeout) and what an interrupted run says."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import RecoverConfig, RunSettings
from llmprune.fedrecover.config import FLEET_ROUND_TIMEOUT
from llmprune.fedrecover.pipeline import _snapshot, interrupted
from llmprune.fedrecover.server_app import SERVER_ROOT_ENV, check_some_round_applied, server_paths
from llmprune.fedrecover.state import STATE_FILE, RoundState, load_state, save_state
from llmprune.fedrecover.transport import RunStopped, send_and_receive

from .conftest import SMALL

MODEL = "/models/pruned"
NAMES = ("2.self_attn.q_proj.A", "2.self_attn.q_proj.B")


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and " — " in text, text
    return text


def cfg(**kw) -> RecoverConfig:
    return RecoverConfig.of(**{**SMALL, "rounds": 3, **kw})


def adapter() -> dict[str, np.ndarray]:
    return {NAMES[0]: np.ones((4, 64), np.float32), NAMES[1]: np.zeros((32, 4), np.float32)}


# ---------------------------------------------------------------- --resume with a broken state


def _state_list(d):
    (d / STATE_FILE).write_text("[1, 2]")


def _state_no_rounds(d):
    meta = json.loads((d / STATE_FILE).read_text())
    del meta["rounds"]
    (d / STATE_FILE).write_text(json.dumps(meta))


def _state_round_text(d):
    meta = json.loads((d / STATE_FILE).read_text())
    meta["round"] = "one"
    (d / STATE_FILE).write_text(json.dumps(meta))


def _state_rows_short(d):
    meta = json.loads((d / STATE_FILE).read_text())
    meta["rounds"] = []
    (d / STATE_FILE).write_text(json.dumps(meta))


def _truncated(d):
    path = d / "round-001.safetensors"
    path.write_bytes(path.read_bytes()[:40])


def _foreign_names(d):
    save_file({"lm_head.weight": np.ones((4, 4), np.float32), NAMES[1]: np.zeros((32, 4), np.float32)},
              str(d / "round-001.safetensors"))


def _wrong_shape(d):
    save_file({NAMES[0]: np.ones((4, 65), np.float32), NAMES[1]: np.zeros((32, 4), np.float32)},
              str(d / "round-001.safetensors"))


def _not_utf8(d):
    (d / STATE_FILE).write_bytes(b"\xff\xfe\x00")


@pytest.mark.parametrize("damage, message", [
    (_state_list, "state.json holds a JSON list, not an object"),
    (_state_no_rounds, "state.json has no 'rounds'"),
    (_state_round_text, "state.json has a bad 'round'"),
    (_state_rows_short, "state.json does not hold 1 round rows"),
    (_not_utf8, "is unreadable (state.json"),
    (_truncated, "round-001.safetensors' is unreadable"),
    (_foreign_names, "does not hold this run's LoRA adapter"),
    (_wrong_shape, "does not hold this run's LoRA adapter"),
])
def test_a_broken_resume_state_is_a_one_line_error(tmp_path, damage, message):
    save_state(tmp_path, RoundState(1, adapter(), [{"round": 1, "applied": True}]), cfg(), model=MODEL)
    damage(tmp_path)
    with pytest.raises(LLMPruneError) as err:
        load_state(tmp_path, cfg(), model=MODEL, expected=adapter())
    assert message in one_line(err) and "--overwrite" in str(err.value)


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed, message", [(-1, "-1 must be 0 or more"), (1.5, "'1.5' is not a whole number"),
                                           (True, "'True' is not a whole number"), ("3", "'3' is text")])
def test_seed_must_be_a_whole_number_from_zero(seed, message):
    with pytest.raises(LLMPruneError) as err:
        RecoverConfig(seed=seed)
    assert f"--seed: {message}" in one_line(err)


def test_seed_zero_and_large_seeds_are_fine():
    assert RecoverConfig(seed=0).seed == 0 and RecoverConfig(seed=2**40).seed == 2**40


# ---------------------------------------------------------------- how long a round waits


def test_round_deadline_simulation_waits_for_everyone_fleet_keeps_its_timeout():
    assert RecoverConfig().fleet.round_deadline(simulation=True) is None
    assert RecoverConfig().fleet.round_deadline(simulation=False) == FLEET_ROUND_TIMEOUT
    assert RecoverConfig.of(round_timeout=30).fleet.round_deadline(simulation=True) == 30
    assert RecoverConfig.of(round_timeout=30).fleet.round_deadline(simulation=False) == 30


class SlowGrid:
    """A grid whose node `late` answers only at its `after`-th pull; no clock involved."""

    def __init__(self, nodes, late=None, after=5):
        self.nodes, self.late, self.after, self.pulls = nodes, late, after, 0

    def push_messages(self, messages):
        return [f"m{n}" for n in self.nodes]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [i for i in ids if i != f"m{self.late}" or self.pulls >= self.after]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_without_a_timeout_every_reply_is_waited_for(monkeypatch):
    monkeypatch.setattr("llmprune.fedrecover.transport.PULL_INTERVAL", 0.0)
    grid = SlowGrid([1, 2, 3], late=3, after=50)
    replies = send_and_receive(grid, [], None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2", "m3"] and grid.pulls == 50


def test_with_a_timeout_the_late_client_is_left_out(monkeypatch):
    monkeypatch.setattr("llmprune.fedrecover.transport.PULL_INTERVAL", 0.0)
    replies = send_and_receive(SlowGrid([1, 2, 3], late=3, after=10**9), [], 0.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m1", "m2"]


def test_an_interruption_ends_the_wait():
    import threading

    stop = threading.Event()
    stop.set()
    with pytest.raises(RunStopped):
        send_and_receive(SlowGrid([1], late=1, after=10**9), [], None, stop)


def test_a_run_without_an_applied_round_is_refused(tmp_path):
    rows = [{"applied": False, "clients_returned": 0, "clients_sampled": 3}] * 2
    with pytest.raises(LLMPruneError) as err:
        check_some_round_applied(rows, 600.0, tmp_path)
    assert "no round was applied (clients returned within the 600 s round timeout per round: 0/3, 0/3)" in one_line(err)
    check_some_round_applied(rows + [{"applied": True}], None, tmp_path)   # one applied round is enough


# ---------------------------------------------------------------- what Ctrl-C leaves and says


def test_interrupted_before_a_round_removes_what_the_run_created(tmp_path):
    out, state = tmp_path / "out", tmp_path / "out.rounds"
    before = _snapshot(out, state)
    state.mkdir()
    (state / "partitions.npz").write_bytes(b"x")
    (tmp_path / ".out.tmp-abc").mkdir()          # a half-written output folder
    assert interrupted(out, state, before, resume=False) == "interrupted before a round finished — nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupted_after_a_round_keeps_the_rounds_for_resume(tmp_path):
    out, state = tmp_path / "out", tmp_path / "out.rounds"
    before = _snapshot(out, state)
    save_state(state, RoundState(2, adapter(), [{"round": 1}, {"round": 2}]), cfg(), model=MODEL)
    message = interrupted(out, state, before, resume=False)
    assert message == (f"interrupted after round 2 — {state}/ keeps the finished rounds; "
                       "rerun the same command with --resume to continue")
    assert (state / STATE_FILE).is_file() and not out.exists()


# ---------------------------------------------------------------- a fleet run config may not choose server paths


@pytest.fixture
def root(tmp_path):
    (tmp_path / "srv" / "pruned").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "srv" / "escape").symlink_to(tmp_path / "secret")
    return tmp_path / "srv"


@pytest.mark.parametrize("settings, config, message", [
    ({"model": "/etc"}, {}, "run-config key 'model' = '/etc' is outside the server root"),
    ({"model": "pruned", "out": "../elsewhere"}, {}, "run-config key 'out' = '../elsewhere' is outside"),
    ({"model": "pruned", "out": "escape/out"}, {}, "run-config key 'out' = 'escape/out' is outside"),
    ({"model": "pruned", "state_dir": "/tmp/x"}, {}, "run-config key 'state-dir' = '/tmp/x' is outside"),
    ({"model": "pruned"}, {"fleet": "/etc/passwd"}, "run-config key 'fleet.file' = '/etc/passwd' is outside"),
    ({"model": "pruned"}, {"eval_data": "../secret/t.txt"}, "run-config key 'data.eval-data' = '../secret/t.txt'"),
    ({"model": "pruned", "data_cache": "/tmp/p.npz"}, {}, "'data-cache' is for the simulation only"),
    # the root itself as an output: its .rounds and temporary siblings would land outside it
    ({"model": "pruned", "out": "."}, {}, "run-config key 'out' = '.' is the server root itself"),
    ({"model": "pruned", "out": "inner/.."}, {}, "run-config key 'out' = 'inner/..' is the server root itself"),
    ({"model": "pruned", "state_dir": "."}, {}, "run-config key 'state-dir' = '.' is the server root itself"),
    ({"model": "pruned"}, {"teacher": "/etc/dense"}, "run-config key 'distill.teacher' = '/etc/dense' is outside"),
    ({"model": "pruned"}, {"teacher": "pruned", "distill_data": "../secret/t.txt"},
     "run-config key 'distill.data' = '../secret/t.txt' is outside"),
    ({"model": "pruned", "out": "pruned", "overwrite": True}, {}, "is not an output of llmprune recover"),
])
def test_fleet_run_config_paths_must_stay_inside_the_server_root(root, settings, config, message):
    (root / "pruned" / "config.json").write_text("{}")
    with pytest.raises(LLMPruneError) as err:
        server_paths(RecoverConfig.of(**config), RunSettings(**settings), str(root))
    assert message in one_line(err)


def test_a_fleet_server_without_a_root_refuses_every_run(root):
    with pytest.raises(LLMPruneError) as err:
        server_paths(RecoverConfig(), RunSettings(model="pruned"), None)
    assert f"this server has no {SERVER_ROOT_ENV}" in one_line(err)


def test_paths_inside_the_root_resolve_against_it(root):
    (root / "old").mkdir()
    (root / "old" / "metrics.json").write_text("{}")            # an earlier output may be overwritten
    cfg_, settings = server_paths(RecoverConfig.of(fleet="fleet.toml"), RunSettings(model="pruned", out="old",
                                                                                      overwrite=True), str(root))
    real = root.resolve()
    assert (settings.model, settings.out, cfg_.fleet.file) == (str(real / "pruned"), str(real / "old"),
                                                               str(real / "fleet.toml"))
    assert Path(settings.state_path) == real / "old.rounds" and os.path.isabs(settings.model)
