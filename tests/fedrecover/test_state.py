"""Per-round checkpoints and --resume: the saved state round-trips, a resume with other settings
is refused, and a run resumed after round 1 ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.fedrecover import RecoverConfig, state_dir_for
from llmprune.fedrecover.state import STATE_FILE, RoundState, load_state, save_state

from .conftest import BASIC, SMALL, copy_run, cut_back_to, run_recover, varied_text

MODEL = "/models/pruned"


def config(**overrides) -> RecoverConfig:
    return RecoverConfig.of(**{**SMALL, "rounds": 3, **overrides})


def arrays(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"2.self_attn.q_proj.A": rng.standard_normal((4, 64)).astype(np.float32),
            "2.self_attn.q_proj.B": rng.standard_normal((32, 4)).astype(np.float32)}


def test_state_round_trips(tmp_path):
    rows = [{"round": 1, "train_loss": 5.0}, {"round": 2, "train_loss": 4.5}]
    save_state(tmp_path, RoundState(1, arrays(1), rows[:1], 300.0), config(), model=MODEL)
    save_state(tmp_path, RoundState(2, arrays(2), rows, 300.0), config(), model=MODEL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-001.safetensors", "round-002.safetensors", STATE_FILE]
    state = load_state(tmp_path, config(), model=MODEL)
    assert state.round == 2 and state.rounds == rows and state.initial_eval_perplexity == 300.0
    assert state.arrays.keys() == arrays().keys()
    assert all(np.array_equal(state.arrays[k], arrays(2)[k]) for k in state.arrays)
    assert all(np.array_equal(v, arrays(1)[k]) for k, v in load_file(str(tmp_path / "round-001.safetensors")).items())
    # more rounds may be asked for, and settings that do not change the result may differ
    assert load_state(tmp_path, config(rounds=9, round_timeout=5.0, eval_windows=2), model=MODEL).round == 2


@pytest.mark.parametrize("change, named", [
    ({"lr": 1e-3}, "--lr"), ({"seed": 1}, "--seed"), ({"aggregation": "hetlora"}, "--aggregation"),
    ({"clients": 3}, "--clients"), ({"partition": "dirichlet:0.5"}, "--partition"), ({"lora_rank": 8}, "--lora-rank"),
    ({"target_modules": ("q_proj",)}, "training.target-modules"), ({"dp_clip": 1.0}, "--dp-clip"),
])
def test_resume_refuses_changed_settings(tmp_path, change, named):
    save_state(tmp_path, RoundState(1, arrays(), [{"round": 1}]), config(), model=MODEL)
    with pytest.raises(LLMPruneError) as err:
        load_state(tmp_path, config(**change), model=MODEL)
    assert f"settings differ from the saved run ({named})" in str(err.value)
    assert "\n" not in str(err.value)


def test_resume_refuses_another_model_fewer_rounds_and_a_missing_or_broken_state(tmp_path):
    save_state(tmp_path, RoundState(2, arrays(), [{"round": 1}, {"round": 2}]), config(), model=MODEL)
    with pytest.raises(LLMPruneError, match=r"settings differ from the saved run \(model\)"):
        load_state(tmp_path, config(), model="/models/other")
    with pytest.raises(LLMPruneError, match="already did 2 rounds, more than --rounds 1"):
        load_state(tmp_path, config(rounds=1), model=MODEL)
    with pytest.raises(LLMPruneError, match="nothing to resume"):
        load_state(tmp_path / "elsewhere", config(), model=MODEL)
    (tmp_path / "round-002.safetensors").unlink()
    with pytest.raises(LLMPruneError, match="unreadable"):
        load_state(tmp_path, config(), model=MODEL)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(LLMPruneError, match="unreadable"):
        load_state(tmp_path, config(), model=MODEL)


def _weights(folder) -> dict[str, torch.Tensor]:
    return llmprune.load_model(folder).state_dict()


def test_resumed_run_equals_the_uninterrupted_run(basic_run, pruned_ckpt, text_file, tmp_path):
    """2 rounds in one go == the run stopped after round 1's checkpoint, then --resume to 2
    (client sampling and DP noise included)."""
    out = tmp_path / "recovered"
    copy_run(basic_run, out)
    cut_back_to(out, 1)                      # as if it had stopped after round 1's checkpoint
    state = state_dir_for(out)
    assert json.loads((state / STATE_FILE).read_text())["round"] == 1
    with pytest.raises(LLMPruneError, match="holds rounds of an earlier run"):
        run_recover(pruned_ckpt, [text_file], out, **BASIC)
    other = tmp_path / "other.txt"                          # other data: refused before Flower starts
    other.write_text(varied_text(seed=5), encoding="utf-8")
    with pytest.raises(LLMPruneError, match="cannot resume: the client data differs from the saved run's"):
        run_recover(pruned_ckpt, [other], out, **BASIC, resume=True)
    resumed = run_recover(pruned_ckpt, [text_file], out, **BASIC, resume=True)

    ref = basic_run.metrics
    got = resumed.metrics
    keys = ("round", "clients_sampled", "clients_returned", "applied", "train_loss", "eval_perplexity", "bytes_up",
            "bytes_down")
    assert [{k: r[k] for k in keys} for r in got["rounds"]] == [{k: r[k] for k in keys} for r in ref["rounds"]]
    assert got["initial_eval_perplexity"] == ref["initial_eval_perplexity"]
    ref_state, got_state = state_dir_for(basic_run.out), state
    for name in ("round-001.safetensors", "round-002.safetensors"):
        a, b = load_file(str(ref_state / name)), load_file(str(got_state / name))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    w_ref, w_got = _weights(basic_run.out), _weights(out)
    assert w_ref.keys() == w_got.keys()
    assert [k for k in w_ref if not torch.equal(w_ref[k], w_got[k])] == []
    # and recovery did change the weights it trained
    base = _weights(pruned_ckpt)
    assert not torch.equal(base["model.layers.2.self_attn.q_proj.weight"], w_got["model.layers.2.self_attn.q_proj.weight"])


def test_each_round_file_carries_the_policy_state_of_its_round(tmp_path):
    """A run cut back to an earlier round (its later files gone) resumes with that round's policy
    state, not the latest; a round file without one (an older version) falls back to state.json."""
    save_state(tmp_path, RoundState(1, arrays(1), [{"round": 1}], policy={"plays": 1}), config(), model=MODEL)
    save_state(tmp_path, RoundState(2, arrays(2), [{"round": 1}, {"round": 2}], policy={"plays": 2}), config(),
               model=MODEL)
    assert load_state(tmp_path, config(), model=MODEL).policy == {"plays": 2}
    meta = json.loads((tmp_path / STATE_FILE).read_text())
    meta["round"], meta["rounds"] = 1, meta["rounds"][:1]          # state.json still says plays 2
    (tmp_path / STATE_FILE).write_text(json.dumps(meta))
    (tmp_path / "round-002.safetensors").unlink()
    assert load_state(tmp_path, config(), model=MODEL).policy == {"plays": 1}
    from safetensors.numpy import save_file

    save_file(arrays(1), str(tmp_path / "round-001.safetensors"))   # no metadata: state.json's policy
    assert load_state(tmp_path, config(), model=MODEL).policy == {"plays": 2}
