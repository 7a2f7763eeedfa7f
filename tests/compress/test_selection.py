"""Condition-aware selection (pivoted Cholesky on the output-weighted Gram) on constructed matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmprune.compress import importance
from llmprune.compress.calibration import GramCollector
from llmprune.compress.mask_tuning import fit_output_projection
from llmprune.compress.selection import condition_number, pivot_order, select_neurons, top_k, weighted_gram

stats_of = GramCollector.of


@pytest.fixture
def collinear():
    """Columns 0 and 1 nearly collinear with a large norm; column 2 small and independent."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 3, generator=g, dtype=torch.float64)
    x = torch.stack([10 * z[:, 0], 10 * z[:, 0] + 0.05 * z[:, 1], z[:, 2]], dim=1)
    w = torch.eye(3, dtype=torch.float64)  # unit output weights: only X decides
    return x, w


def test_condition_aware_selection_beats_a_norm_score(collinear):
    x, w = collinear
    gram = x.T @ x
    norms = x.norm(dim=0)
    assert norms[2] < norms[0] / 5 and norms[2] < norms[1] / 5

    chosen = select_neurons(gram, w, keep=2)
    by_norm = top_k(norms, 2)
    assert chosen.tolist() in ([0, 2], [1, 2]), chosen
    assert by_norm.tolist() == [0, 1]
    # Wanda-SP (‖x_j‖·‖W_j‖) is a norm score too and keeps the collinear pair.
    assert top_k(importance.wanda_sp(stats_of(x), w), 2).tolist() == [0, 1]

    kappa_chosen = condition_number(gram, w, chosen)
    kappa_norm = condition_number(gram, w, by_norm)
    assert kappa_chosen < 20 < 100 < kappa_norm
    # And the well-conditioned pair explains far more of the output after a least-squares refit.
    err_chosen = fit_output_projection(stats_of(x), w, None, chosen, mode="refit", ridge=1e-12, intercept=False).error_after
    err_norm = fit_output_projection(stats_of(x), w, None, by_norm, mode="refit", ridge=1e-12, intercept=False).error_after
    assert err_chosen < err_norm / 10


def test_error_curve_is_monotone_from_one_to_zero(collinear):
    x, w = collinear
    order, curve = pivot_order(x.T @ x, w)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert curve.shape == (4,)
    assert curve[0] == pytest.approx(1.0)
    assert curve[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(curve) <= 1e-12)


def test_error_curve_is_the_refit_error_of_each_prefix():
    """curve[k] = relative error of the least-squares refit on the first k pivots."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    order, curve = pivot_order(x.T @ x, w)
    assert np.all(np.diff(curve) <= 1e-12)
    stats = stats_of(x)
    for k in range(1, 8):
        fit = fit_output_projection(stats, w, None, order[:k].sort().values, mode="refit", ridge=1e-12, intercept=False)
        assert curve[k] == pytest.approx(fit.error_after, rel=1e-3, abs=1e-6), k


def test_output_weight_norms_steer_the_choice():
    """Two independent inputs of equal energy: the one whose output weights are larger wins."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=0)
    gram = x.T @ x
    assert select_neurons(gram, torch.tensor([[1.0, 3.0]], dtype=torch.float64), 1).tolist() == [1]
    assert select_neurons(gram, torch.tensor([[3.0, 1.0]], dtype=torch.float64), 1).tolist() == [0]
    w = torch.tensor([2.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(weighted_gram(gram, w), torch.diag(w) @ gram @ torch.diag(w))


def test_rank_deficient_gram_still_orders_every_column():
    """Fewer calibration tokens than columns: every column still gets a place, curve ends at 0."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    w = torch.randn(4, 12, generator=g, dtype=torch.float64)
    order, curve = pivot_order(x.T @ x, w)
    assert sorted(order.tolist()) == list(range(12))
    assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(curve) <= 1e-12)
    assert curve[5] < 1e-3  # 5 tokens: five pivots explain (almost) everything
    assert select_neurons(x.T @ x, w, 6).tolist() == order[:6].sort().values.tolist()


def test_top_k_is_sorted_and_breaks_ties_by_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])
    assert top_k(scores, 2).tolist() == [1, 2]
    assert top_k(scores, 4).tolist() == [0, 1, 2, 4]


def test_condition_number():
    gram = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    w = torch.eye(3, dtype=torch.float64)
    assert condition_number(gram, w, torch.tensor([0, 1])) == pytest.approx(2.0)
    assert condition_number(gram, w, torch.tensor([0])) == pytest.approx(1.0)
    assert condition_number(gram, w) == float("inf")  # a dead column: singular
