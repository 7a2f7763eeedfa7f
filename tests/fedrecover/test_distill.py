"""Distillation from a teacher: the sliced loss against the plain full-vocabulary formula, the
teacher's vocabulary lined up with a trimmed student, which devices hold a teacher, the server's
distillation step, and the bad inputs of --teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmprune.errors import LLMPruneError
from llmprune.fedrecover.distill import _Slices, admits_teacher, distill_on_slices


def full_loss(h, w, th, tw, targets, alpha, t, softcap=None, teacher_softcap=None):
    """The textbook formula on whole logits: (1 - a) CE + a T^2 KL(softmax(y/T) || softmax(z/T))."""
    z = h @ w.T
    y = th @ tw.T
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    if teacher_softcap:
        y = torch.tanh(y / teacher_softcap) * teacher_softcap
    ce = F.cross_entropy(z, targets)
    kl = F.kl_div(F.log_softmax(z / t, dim=1), F.log_softmax(y / t, dim=1), log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * t * t * kl


@pytest.mark.parametrize("alpha,t,softcap,chunk", [(0.9, 1.0, None, 7), (0.5, 2.0, 3.0, 5), (1.0, 0.7, 2.0, 64),
                                                   (0.0, 1.0, None, 3)])
def test_the_sliced_loss_equals_the_full_formula_in_value_and_gradient(alpha, t, softcap, chunk):
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 12, 8, 29
    h = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_(True)
    w, th, tw = torch.randn(vocab, d, generator=g), torch.randn(n, 6, generator=g), torch.randn(vocab, 6, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    slices = _Slices(lambda lo, hi: w[lo:hi], th, lambda lo, hi: tw[lo:hi], vocab, chunk, softcap, softcap)
    got = distill_on_slices(h, targets, slices, alpha, t)
    (grad_got,) = torch.autograd.grad(got, h)
    want = full_loss(h, w, th, tw, targets, alpha, t, softcap, softcap)
    (grad_want,) = torch.autograd.grad(want, h)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grad_got, grad_want, atol=1e-5, rtol=1e-4)


def test_the_kl_part_is_zero_when_the_student_is_the_teacher():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 5, generator=g).requires_grad_(True), torch.randn(11, 5, generator=g)
    slices = _Slices(lambda lo, hi: w[lo:hi], h.detach(), lambda lo, hi: w[lo:hi], 11, 4, None, None)
    loss = distill_on_slices(h, torch.zeros(6, dtype=torch.long), slices, 1.0, 2.0)
    (grad,) = torch.autograd.grad(loss, h)
    assert abs(loss.item()) < 1e-5 and grad.abs().max() < 1e-5


def test_a_device_holds_the_teacher_only_where_its_memory_admits_it():
    assert admits_teacher(None, 900.0, 500.0)                # memory not declared: no limit known
    assert admits_teacher(1500.0, 900.0, 500.0)
    assert not admits_teacher(1000.0, 900.0, 500.0)


# --- the teacher against real tiny checkpoints --------------------------------------------------------

def windows_of(tok, text_file, n=6, seq_len=32):
    import llmprune

    return llmprune.token_windows(tok, llmprune.load_texts(str(text_file)), seq_len, n)


def test_the_servers_step_lowers_the_kl_to_the_teacher_on_its_text(pruned_ckpt, dense_ckpt, text_file, tok):
    import llmprune
    from llmprune.fedrecover.distill import ServerDistillation, Teacher
    from llmprune.fedrecover.lora import init_arrays, module_shapes

    student = llmprune.load_model(str(pruned_ckpt))
    shapes = module_shapes(student, ("q_proj", "v_proj", "down_proj"))
    arrays = init_arrays(shapes, list(shapes), 4, seed=0)
    arrays = {k: v + 0.01 * (k.endswith(".B")) for k, v in arrays.items()}    # a non-zero adapter to start from
    step = ServerDistillation(Teacher.load(str(dense_ckpt), str(pruned_ckpt)), windows_of(tok, text_file), steps=6,
                              lr=5e-3, batch_size=2, alpha=1.0, temperature=1.0, seed=0)
    trained, notes = step.refine(student, arrays, 2.0, server_round=1)
    assert list(trained) == list(arrays)
    assert notes["distill_loss_after"] < notes["distill_loss_before"]
    again, _ = step.refine(student, arrays, 2.0, server_round=1)
    assert all((again[k] == trained[k]).all() for k in trained)                 # seeded by (seed, round)


def test_a_trimmed_student_reads_the_teachers_rows_of_its_kept_ids(tmp_path, dense_ckpt):
    import json
    import shutil

    from llmprune.fedrecover.distill import vocabulary_link

    student = tmp_path / "trimmed"
    shutil.copytree(dense_ckpt, student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "vocab_size": 5}))     # a student of 5 kept ids
    (student / "vocabulary.json").write_text(json.dumps({"original_vocab_size": 320, "kept_ids": [0, 1, 2, 7, 300]}))
    assert vocabulary_link(str(dense_ckpt), str(student)).tolist() == [0, 1, 2, 7, 300]
    assert vocabulary_link(str(dense_ckpt), str(dense_ckpt)) is None


def test_a_teacher_of_another_vocabulary_is_refused_before_flower_starts(tmp_path, pruned_ckpt, text_file):
    from llmprune.fedrecover.config import RecoverConfig
    from llmprune.fedrecover.preflight import check_teacher
    from llmprune.testing import tiny_model

    other = tmp_path / "other"
    tiny_model("llama", vocab_size=400).save_pretrained(other)
    with pytest.raises(LLMPruneError, match="the teacher has 400 tokens, the student 320"):
        check_teacher(str(pruned_ckpt), RecoverConfig.of(teacher=str(other)))


def test_a_teacher_that_does_not_fit_the_server_is_refused(monkeypatch, pruned_ckpt, dense_ckpt):
    from llmprune import memory
    from llmprune.fedrecover.config import RecoverConfig
    from llmprune.fedrecover.preflight import check_teacher

    monkeypatch.setattr(memory, "available_mb", lambda: 1.0)
    with pytest.raises(LLMPruneError, match="need about .* MB on the server, 1 MB are available"):
        check_teacher(str(pruned_ckpt), RecoverConfig.of(teacher=str(dense_ckpt)))
    check_teacher(str(pruned_ckpt), RecoverConfig.of(teacher=str(dense_ckpt), distill="device"))  # devices hold it


def test_teacher_source_is_the_model_the_report_names(pruned_ckpt, tmp_path):
    import json
    import shutil

    from llmprune.checkpoint import REPORT_FILE
    from llmprune.fedrecover.distill import resolve_teacher

    student = tmp_path / "student"
    shutil.copytree(pruned_ckpt, student)
    report = json.loads((student / REPORT_FILE).read_text())
    (student / REPORT_FILE).write_text(json.dumps({**report, "model": "gemma-3-270m"}))
    assert resolve_teacher("source", str(student)) == "gemma-3-270m"
    (student / REPORT_FILE).write_text(json.dumps({k: v for k, v in report.items() if k != "model"}))
    with pytest.raises(LLMPruneError, match="does not name the model it was pruned from"):
        resolve_teacher("source", str(student))
    assert resolve_teacher("some/model", str(student)) == "some/model"


@pytest.mark.parametrize("flags,problem", [
    (dict(distill_alpha=0.7), "--distill-alpha needs --teacher"),
    (dict(teacher="t", distill_alpha=1.5), "--distill-alpha"),
    (dict(teacher="t", distill_temperature="inf"), "--distill-temperature"),
    (dict(teacher="t", distill="phone"), "--distill"),
    (dict(teacher="t", distill="device", distill_data="x.txt"), "--distill-data sets the server's distillation"),
    (dict(teacher="t", distill="device", distill_steps=3), "--distill-steps sets the server's distillation"),
])
def test_bad_distillation_settings_are_one_line_errors(flags, problem):
    from llmprune.fedrecover.config import RecoverConfig

    with pytest.raises(LLMPruneError, match=problem):
        RecoverConfig.of(**flags)


# --- a federated run with a teacher -----------------------------------------------------------------

@pytest.fixture(scope="module")
def taught_run(pruned_ckpt, dense_ckpt, text_file, tmp_path_factory):
    """Two devices, 2 rounds, distillation on the server and on the device whose memory admits the
    teacher: 'roomy' declares no limit, 'tight' only just what its student needs."""
    import json

    from llmprune.fedrecover.config import RecoverConfig
    from llmprune.fedrecover.preflight import check_plan

    from .conftest import SMALL, run_recover

    work = tmp_path_factory.mktemp("taught")
    estimate = check_plan(str(pruned_ckpt), RecoverConfig.of(**SMALL))[0]["estimate_mb"]
    fleet = work / "fleet.json"
    fleet.write_text(json.dumps({"devices": [{"name": "roomy"}, {"name": "tight", "memory_mb": estimate + 1}]}))
    distill = dict(teacher=str(dense_ckpt), distill="both", distill_steps=2, distill_windows=4, distill_lr=1e-3,
                   fleet=str(fleet), rounds=2)
    return run_recover(pruned_ckpt, [text_file], work / "recovered", **distill), distill


def test_a_run_distils_on_the_server_and_on_the_devices_that_hold_the_teacher(taught_run, dense_ckpt):
    run, _ = taught_run
    m = run.metrics
    assert m["distill"]["teacher"] == str(dense_ckpt) and m["distill"]["server_steps"] == 2
    for row in m["rounds"]:
        assert row["distill_loss_after"] < row["distill_loss_before"]
        assert {c["device"]: c["teacher"] for c in row["clients"]} == {"roomy": True, "tight": False}
    assert m["final_eval_perplexity"] < m["initial_eval_perplexity"]


def test_a_distilled_run_resumes_as_it_would_have_gone_on(taught_run, pruned_ckpt, text_file, tmp_path):
    from .conftest import assert_resumed_equal, copy_run, cut_back_to, run_recover

    ref, distill = taught_run
    out = tmp_path / "recovered"
    copy_run(ref, out)
    cut_back_to(out, 1)
    fleet = Path(distill["fleet"])
    text = fleet.read_text()
    fleet.write_text(text.replace('"roomy"', '"roomier"'))        # the same path, other devices: refused
    try:
        with pytest.raises(LLMPruneError, match=r"settings differ from the saved run \(content of --fleet\)"):
            run_recover(pruned_ckpt, [text_file], out, **distill, resume=True)
    finally:
        fleet.write_text(text)
    got = run_recover(pruned_ckpt, [text_file], out, **distill, resume=True)
    assert_resumed_equal(ref, got)
