"""A vocabulary the fleet chooses (recover --vocab): the device's counts and its noise share, the
re-read windows, and tiny-model simulations — plain, under SecAgg+ (the masked sum equals the plain
one), resumed — plus the settings refused before Flower starts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.fedrecover.fleet_vocab import (
    COUNT_CLIP,
    NOISE_PASS,
    CountNoise,
    analytic_gaussian_sigma,
    choose,
    coverage,
    device_counts,
    laplace_share,
    released_counts,
    retokenize,
)

from .conftest import assert_resumed_equal, resumed_after, run_recover, varied_text

VOCAB = 290      # the tiny tokenizer has 320 ids, of which 259 are forced (bytes and specials)


def test_device_counts_leave_out_the_bos_and_cap_each_id():
    windows = torch.tensor([[1, 5, 5, 7], [1, 7, 9, 9]])
    counts = device_counts(windows, seq_len=3, size=12)
    assert counts.tolist() == [0, 0, 0, 0, 0, 2, 0, 2, 0, 2, 0, 0]
    assert device_counts(torch.tensor([[5, 5, 7]]), seq_len=3, size=8)[5] == 2     # no BOS: every position counts
    many = torch.full((1, COUNT_CLIP + 6), 3)
    assert device_counts(many, seq_len=COUNT_CLIP + 6, size=4)[3] == COUNT_CLIP
    with pytest.raises(LLMPruneError, match="outside the server's 8-id vocabulary"):
        device_counts(torch.tensor([[1, 9, 2]]), seq_len=2, size=8)


def test_the_devices_noise_shares_sum_to_laplace_noise_of_the_stated_scale():
    rng = np.random.default_rng(0)
    scale, devices, n = 4.0, 5, 200_000
    total = sum(laplace_share(n, scale, devices, rng) for _ in range(devices))
    # Laplace(b): mean 0, variance 2 b^2, mean absolute value b
    assert abs(total.mean()) < 0.05 and abs(total.var() / (2 * scale ** 2) - 1) < 0.03
    assert abs(np.abs(total).mean() / scale - 1) < 0.02
    one = laplace_share(n, scale, devices, rng)
    assert one.var() < 2 * scale ** 2 / devices * 1.1       # one share alone carries 1/n of the variance


def test_presence_counts_count_each_id_once_per_window():
    windows = torch.tensor([[1, 5, 5, 7], [1, 7, 9, 9]])
    assert device_counts(windows, 3, 12, presence=True).tolist() == [0, 0, 0, 0, 0, 1, 0, 2, 0, 1, 0, 0]


def test_gaussian_noise_is_the_analytic_mechanisms_and_its_shares_sum_to_it():
    from scipy.stats import norm

    def leak(sigma, eps, delta_sens=1.0):
        a, b = delta_sens / (2 * sigma), eps * sigma / delta_sens
        return norm.cdf(a - b) - np.exp(eps) * norm.cdf(-a - b)

    for eps in (0.5, 1.0, 8.0):
        sigma = analytic_gaussian_sigma(eps, 1e-5, 1.0)
        assert leak(sigma, eps) <= 1e-5 < leak(0.99 * sigma, eps)      # the smallest sigma that meets delta
    assert analytic_gaussian_sigma(0.5, 1e-5, 1.0) < np.sqrt(2 * np.log(1.25 / 1e-5)) / 0.5   # below the classic bound
    noise = CountNoise.calibrated("gaussian", 2.0, 1e-5, 64)
    assert noise.presence and noise.scale == pytest.approx(analytic_gaussian_sigma(2.0, 1e-5, 8.0))
    rng = np.random.default_rng(0)
    total = sum(noise.share(200_000, 4, rng) for _ in range(4))
    assert abs(total.std() / noise.scale - 1) < 0.01
    assert abs((total > noise.threshold()).mean() / NOISE_PASS - 1) < 0.2


def test_the_counting_query_carries_the_noise_as_the_server_calibrated_it():
    from llmprune.fedrecover.messages import CountQuery

    noise = CountNoise.calibrated("gaussian", 4.0, 1e-6, 32)
    query = CountQuery(320, 32, 3, noise.mechanism, noise.scale)
    back = CountQuery.from_config(query.to_config())
    assert back == query and CountNoise(back.noise_mechanism, back.noise_scale) == noise
    assert CountQuery.from_config(CountQuery(320, 32, 3).to_config()).noise_mechanism is None


def test_released_counts_are_exact_without_noise_and_noised_with_it():
    counts = np.arange(1000, dtype=np.int64)
    assert np.array_equal(released_counts(counts, None, 3), counts.astype(np.float64))
    laplace = CountNoise.calibrated("laplace", 2.0, 1e-5, 32)
    assert laplace == CountNoise("laplace", 16.0) and not laplace.presence
    noised = released_counts(counts, laplace, 1)
    assert not np.array_equal(noised, counts) and abs(np.abs(noised - counts).mean() / 16 - 1) < 0.15
    assert CountNoise.calibrated("laplace", None, 1e-5, 32) is None


def test_noisy_counts_below_the_noise_threshold_rank_as_unseen(tok):
    from llmprune.compress import select_from_counts
    from llmprune.compress.vocab import token_counts

    noise = CountNoise("laplace", 4.0)
    # an id no device holds passes with probability NOISE_PASS
    unseen = laplace_share(400_000, noise.scale, 1, np.random.default_rng(1))
    assert abs((unseen > noise.threshold()).mean() / NOISE_PASS - 1) < 0.15
    counts = token_counts(tok, [varied_text(600, seed=5)]).astype(np.float64)
    noisy = counts + laplace_share(counts.size, noise.scale, 1, np.random.default_rng(2))
    read = np.where(noisy > noise.threshold(), np.rint(noisy), 0).astype(np.int64)
    assert np.array_equal(choose(tok, noisy, VOCAB, noise).kept_ids, select_from_counts(tok, read, VOCAB).kept_ids)
    assert not np.array_equal(choose(tok, noisy, VOCAB, noise).kept_ids, choose(tok, noisy, VOCAB).kept_ids)


def test_retokenized_windows_read_the_same_text_with_the_trimmed_tokenizer(tok):
    import llmprune
    from llmprune.compress import rebuild_tokenizer, select_vocabulary

    text = varied_text(400, seed=3)
    windows = llmprune.token_windows(tok, [text], 16)
    kept = select_vocabulary(tok, [text], VOCAB).kept_ids
    new = retokenize(windows, tok, kept, 16, None)
    trimmed = rebuild_tokenizer(tok, kept)
    assert new.shape[1] == 17 and new.max() < len(kept) and new.shape[0] >= windows.shape[0]
    read = trimmed.decode(new[:, 1:].reshape(-1).tolist())
    assert text.startswith(read[:200]) and read[:200] == tok.decode(windows[:, 1:].reshape(-1).tolist())[:200]
    assert coverage(windows, 16, kept) == pytest.approx(float(np.isin(windows[:, 1:], kept).mean()))


def test_select_from_counts_equals_select_vocabulary_on_the_text(tok):
    from llmprune.compress import select_from_counts, select_vocabulary
    from llmprune.compress.vocab import token_counts

    text = varied_text(600, seed=4)
    for size in (VOCAB, 0.9):
        a = select_vocabulary(tok, [text], size)
        b = select_from_counts(tok, token_counts(tok, [text]), size, set(text))
        assert np.array_equal(a.kept_ids, b.kept_ids) and a.coverage == b.coverage


# -- simulations ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fleet_vocab_run(pruned_ckpt, text_file, tmp_path_factory):
    """Plain counting, 2 rounds: the reference of the SecAgg+ and resume tests."""
    out = tmp_path_factory.mktemp("fleet-vocab") / "recovered"
    return run_recover(pruned_ckpt, [text_file], out, vocab=VOCAB, rounds=2)


def test_a_fleet_chosen_vocabulary_trims_the_model_and_is_recorded(fleet_vocab_run, pruned_ckpt, text_file, tok):
    import llmprune
    from llmprune.compress.vocab import token_counts

    run = fleet_vocab_run
    report = run.metrics["vocabulary"]
    assert report["kept"] == VOCAB and report["devices_counted"] == 2 and report["secagg"] is False
    assert set(report["coverage_by_device"]) == {"0", "1"}
    assert all(0.5 < d["coverage"] <= 1.0 and d["windows"][1] >= d["windows"][0]
               for d in report["coverage_by_device"].values())
    saved = json.loads((run.out / "vocabulary.json").read_text())
    assert len(saved["kept_ids"]) == VOCAB and saved["original_vocab_size"] == 320
    model, trimmed = llmprune.load(str(run.out))
    assert model.get_input_embeddings().weight.shape[0] == VOCAB and len(trimmed) == VOCAB
    # the fleet's counts are the training text's: the kept ids include the text's most frequent ones
    counts = token_counts(tok, [text_file.read_text()])
    top = np.argsort(-counts)[:20]
    assert set(top.tolist()) <= set(saved["kept_ids"])
    assert all(r["applied"] for r in run.metrics["rounds"])


def test_counts_summed_under_secagg_equal_the_plain_sum(fleet_vocab_run, pruned_ckpt, text_file, tmp_path):
    run = run_recover(pruned_ckpt, [text_file], tmp_path / "secagg", vocab=VOCAB, secagg=True)
    plain, masked = fleet_vocab_run.metrics["vocabulary"], run.metrics["vocabulary"]
    assert masked["secagg"] is True and masked["devices_counted"] == 2
    assert masked["tokens_counted"] == plain["tokens_counted"]
    assert json.loads((run.out / "vocabulary.json").read_text())["kept_ids"] == \
        json.loads((fleet_vocab_run.out / "vocabulary.json").read_text())["kept_ids"]


def test_a_resumed_run_reuses_the_saved_vocabulary(fleet_vocab_run, pruned_ckpt, text_file, tmp_path):
    out = tmp_path / "recovered"
    got = resumed_after(fleet_vocab_run, 1, pruned_ckpt, [text_file], out, vocab=VOCAB, rounds=2)
    assert_resumed_equal(fleet_vocab_run, got)
    assert (out / "vocabulary.json").read_text() == (fleet_vocab_run.out / "vocabulary.json").read_text()


# -- refused before Flower starts ----------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "message"), [
    ({"vocab": 100_000}, "more than the checkpoint's 320 vocabulary rows"),
    ({"vocab": 100}, "below the 259 ids every trimmed vocabulary keeps"),
])
def test_a_vocabulary_the_checkpoint_cannot_give_is_refused(pruned_ckpt, text_file, tmp_path, settings, message):
    with pytest.raises(LLMPruneError, match=message):
        run_recover(pruned_ckpt, [text_file], tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("settings", "message"), [
    ({"vocab_epsilon": 1.0}, "--vocab-epsilon needs --vocab"),
    ({"vocab": 300, "vocab_epsilon": 0}, "must be"),
    ({"vocab": 300, "vocab_epsilon": -2}, "must be"),
    ({"vocab": 1.5}, r"outside \(0, 1\]"),
    ({"vocab": 300, "teacher": "source"}, "--vocab and --teacher together"),
    ({"vocab": 300, "client_dtype": "bfloat16"}, "needs devices that load the whole checkpoint"),
    ({"vocab": 300, "vocab_noise": "gaussian"}, "need --vocab-epsilon"),
    ({"vocab": 300, "vocab_epsilon": 1, "vocab_delta": 1e-6}, "is for --vocab-noise gaussian"),
    ({"vocab": 300, "vocab_epsilon": 1, "vocab_noise": "gaussian", "vocab_delta": 1}, "promises nothing"),
    ({"vocab": 300, "vocab_epsilon": 1, "vocab_noise": "uniform"}, "is not one of"),
])
def test_settings_a_fleet_vocabulary_cannot_combine_with_are_refused(settings, message):
    from llmprune.fedrecover import RecoverConfig

    with pytest.raises((LLMPruneError, ValueError), match=message):
        RecoverConfig.of(**settings)
