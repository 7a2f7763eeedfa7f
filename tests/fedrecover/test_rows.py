"""Embedding rows trained beside LoRA (--train-rows): the device's delta is exactly a table with
those rows changed (tied head included), the server moves each row by its touchers' count-weighted
mean, and a federated run changes only rows of tokens its devices hold — and resumes exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.fedrecover.rows import TrainableRows, merge_rows, rows_applied, token_counts
from llmprune.testing import tiny_model


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])     # a tied table (and a scaled lookup), an untied one
def test_the_rows_delta_is_a_table_with_those_rows_changed(arch):
    torch.manual_seed(0)
    model = tiny_model(arch).eval()
    ids = np.array([3, 10, 57, 200])
    rows = TrainableRows(model, ids)
    with torch.no_grad():
        rows.delta.copy_(torch.randn_like(rows.delta) * 0.5)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.get_input_embeddings().weight[torch.as_tensor(ids)] += rows.delta
    assert rows.tied == (arch == "gemma3_text")
    x = torch.tensor([[1, 3, 5, 10, 57, 9, 200, 3]])
    with rows:
        got = model(input_ids=x).logits
    want = changed(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(input_ids=x).logits, want)        # the hooks are gone after the block


def test_only_the_delta_learns():
    model = tiny_model("gemma3_text")
    for p in model.parameters():
        p.requires_grad_(False)
    rows = TrainableRows(model, np.array([4, 8]))
    with rows:
        model(input_ids=torch.tensor([[1, 4, 8, 9]]), labels=torch.tensor([[1, 4, 8, 9]])).loss.backward()
    assert rows.delta.grad is not None and rows.delta.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad is None


def test_token_counts():
    ids, counts = token_counts(torch.tensor([[5, 3, 5], [9, 5, 3]]))
    assert ids.tolist() == [3, 5, 9] and counts.tolist() == [2, 3, 1]


def test_each_row_moves_by_the_count_weighted_mean_of_its_touchers():
    base = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    current = {"rows.ids": np.array([1, 5]), "rows.values": np.full((2, 4), 100, np.float32)}
    a = {"rows.ids": np.array([1, 2]), "rows.delta": np.array([[1.0] * 4, [2.0] * 4], np.float32),
         "rows.count": np.array([3, 1], np.float32)}
    b = {"rows.ids": np.array([2, 3]), "rows.delta": np.array([[6.0] * 4, [-1.0] * 4], np.float32),
         "rows.count": np.array([3, 2], np.float32)}
    new = merge_rows(base, current, [a, b])
    assert new["rows.ids"].tolist() == [1, 2, 3, 5]
    np.testing.assert_allclose(new["rows.values"][0], 101)                     # one toucher: its delta
    np.testing.assert_allclose(new["rows.values"][1], base[2].numpy() + (2 * 1 + 6 * 3) / 4)   # weighted by counts
    np.testing.assert_allclose(new["rows.values"][2], base[3].numpy() - 1)     # from the checkpoint's row
    np.testing.assert_allclose(new["rows.values"][3], 100)                     # untouched this round: kept
    assert merge_rows(base, current, [])["rows.ids"].tolist() == [1, 5]


def test_rows_applied_restores_the_table():
    model = tiny_model("llama")
    before = model.get_input_embeddings().weight.detach().clone()
    rows = {"rows.ids": np.array([2, 7]), "rows.values": np.ones((2, before.shape[1]), np.float32)}
    with rows_applied(model, rows):
        assert (model.get_input_embeddings().weight[[2, 7]] == 1).all()
    assert torch.equal(model.get_input_embeddings().weight, before)


@pytest.mark.parametrize("flags,problem", [
    (dict(train_rows=True, secagg=True), "--train-rows cannot be used with --secagg"),
    (dict(train_rows=True, dp_clip=1.0), "--train-rows cannot be used with --secagg or --dp-clip"),
    (dict(train_rows=True, client_dtype="bfloat16"), "--train-rows needs devices that load the whole checkpoint"),
    (dict(rows_lr=1e-4), "--rows-lr needs --train-rows"),
])
def test_train_rows_bad_combinations_are_one_line_errors(flags, problem):
    from llmprune.fedrecover.config import RecoverConfig

    with pytest.raises(LLMPruneError, match=problem):
        RecoverConfig.of(**flags)


# --- a federated run that trains rows ----------------------------------------------------------------

@pytest.fixture(scope="module")
def rows_run(pruned_ckpt, text_file, tmp_path_factory):
    from .conftest import run_recover

    return run_recover(pruned_ckpt, [text_file], tmp_path_factory.mktemp("rows") / "recovered", train_rows=True,
                       rounds=2)


def test_a_run_changes_only_rows_of_tokens_its_devices_hold(rows_run, pruned_ckpt, text_file, tok):
    import llmprune

    m = rows_run.metrics
    changed_counts = [row["rows_changed"] for row in m["rounds"]]
    assert 0 < changed_counts[0] <= changed_counts[1]
    assert all(c["rows"] > 0 for row in m["rounds"] for c in row["clients"])
    before = llmprune.load_model(str(pruned_ckpt)).get_input_embeddings().weight.detach()
    after = llmprune.load_model(str(rows_run.out)).get_input_embeddings().weight.detach()
    differ = set(torch.nonzero((after != before).any(dim=1)).flatten().tolist())
    held = set(tok(text_file.read_text())["input_ids"]) | {tok.bos_token_id}
    assert differ and differ <= held and len(differ) == changed_counts[-1]
    assert m["final_eval_perplexity"] < m["initial_eval_perplexity"]


def test_a_rows_run_resumes_as_it_would_have_gone_on(rows_run, pruned_ckpt, text_file, tmp_path):
    from .conftest import assert_resumed_equal, resumed_after

    got = resumed_after(rows_run, 1, pruned_ckpt, [text_file], tmp_path / "recovered", train_rows=True, rounds=2)
    assert_resumed_equal(rows_run, got)
