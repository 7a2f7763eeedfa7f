"""Gradient-free mask tuning: ridge least squares on Gram statistics, folded into the output projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from llmprune.compress.calibration import GramCollector, collect_grams
from llmprune.compress.mask_tuning import fit_output_projection

stats_of = GramCollector.of


@pytest.fixture
def problem():
    """Correlated inputs X [400, 10] (non-zero mean), a projection W [6, 10], a bias, a kept set."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    x = x + torch.linspace(-1, 2, 10, dtype=torch.float64)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 8, 9])
    return x, w, b, keep


def relative_error(x, w, b, v, c, keep, centered=False):
    """‖Y − Ŷ‖² / ‖XWᵀ‖², the reference centered when an intercept is fitted (output variance)."""
    y = x @ w.T + b
    y_hat = x[:, keep] @ v.T + c
    ref = (x - x.mean(0)) @ w.T if centered else x @ w.T
    return float(((y - y_hat) ** 2).sum() / (ref ** 2).sum())


@pytest.mark.parametrize("intercept", [False, True])
def test_tuning_lowers_the_reconstruction_error(problem, intercept):
    x, w, b, keep = problem
    stats = stats_of(x)
    scales = fit_output_projection(stats, w, b, keep, mode="scales", ridge=1e-6, intercept=intercept)
    refit = fit_output_projection(stats, w, b, keep, mode="refit", ridge=1e-6, intercept=intercept)
    plain = fit_output_projection(stats, w, b, keep, mode="none", ridge=1e-6, intercept=intercept)
    assert scales.error_after < scales.error_before
    assert refit.error_after < refit.error_before
    assert refit.error_after <= scales.error_after + 1e-12
    assert scales.error_before == pytest.approx(refit.error_before)
    assert plain.error_after == pytest.approx(plain.error_before)
    assert refit.weight.shape == scales.weight.shape == (6, keep.numel())
    # Scales only rescale the kept columns.
    ratio = scales.weight / w[:, keep]
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
    # The reported errors are the real ones, measured on the data with the returned weight and bias
    # (relative to the output variance when an intercept is fitted).
    for fit in (scales, refit, plain):
        bias = fit.bias if intercept else b
        assert relative_error(x, w, b, fit.weight, bias, keep, intercept) == pytest.approx(fit.error_after, rel=1e-6)
    if intercept:  # plain pruning, its lost mean restored by the bias
        torch.testing.assert_close(plain.bias, b + w @ x.mean(0) - w[:, keep] @ x[:, keep].mean(0))
    else:
        assert relative_error(x, w, b, w[:, keep], b, keep) == pytest.approx(plain.error_before, rel=1e-9)


def test_refit_is_the_least_squares_solution(problem):
    x, w, b, keep = problem
    fit = fit_output_projection(stats_of(x), w, None, keep, mode="refit", ridge=1e-12, intercept=False)
    solution, *_ = np.linalg.lstsq(x[:, keep].numpy(), (x @ w.T).numpy(), rcond=None)
    np.testing.assert_allclose(fit.weight.numpy(), solution.T, rtol=1e-7, atol=1e-9)
    assert fit.bias is None


def test_refit_with_intercept_is_least_squares_with_a_constant_column(problem):
    x, w, b, keep = problem
    fit = fit_output_projection(stats_of(x), w, b, keep, mode="refit", ridge=1e-12, intercept=True)
    design = np.concatenate([x[:, keep].numpy(), np.ones((x.shape[0], 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, (x @ w.T + b).numpy(), rcond=None)
    np.testing.assert_allclose(fit.weight.numpy(), solution[:-1].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fit.bias.numpy(), solution[-1], rtol=1e-6, atol=1e-8)


def test_scales_are_the_least_squares_multipliers(problem):
    """min_m ‖XWᵀ − X_S diag(m) W_Sᵀ‖²: a linear least-squares problem in m."""
    x, w, b, keep = problem
    fit = fit_output_projection(stats_of(x), w, None, keep, mode="scales", ridge=1e-12, intercept=False)
    columns = [np.outer(x[:, j].numpy(), w[:, j].numpy()).ravel() for j in keep.tolist()]
    m, *_ = np.linalg.lstsq(np.stack(columns, axis=1), (x @ w.T).numpy().ravel(), rcond=None)
    np.testing.assert_allclose(fit.weight.numpy(), (w[:, keep] * torch.from_numpy(m)).numpy(), rtol=1e-6, atol=1e-9)


def test_keeping_everything_changes_nothing(problem):
    x, w, b, _ = problem
    keep = torch.arange(10)
    fit = fit_output_projection(stats_of(x), w, b, keep, mode="refit", ridge=1e-12, intercept=False)
    torch.testing.assert_close(fit.weight, w, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(fit.bias, b)
    assert fit.error_before == pytest.approx(0.0, abs=1e-20)
    assert fit.error_after < 1e-12


def test_ridge_shrinks_the_refit(problem):
    x, w, _, keep = problem
    stats = stats_of(x)
    small = fit_output_projection(stats, w, None, keep, mode="refit", ridge=1e-9, intercept=False)
    large = fit_output_projection(stats, w, None, keep, mode="refit", ridge=10.0, intercept=False)
    assert large.weight.norm() < small.weight.norm()
    assert large.error_after > small.error_after


def test_float32_weights_come_back_float32_from_hooked_statistics():
    """The path the pipeline uses: statistics from a forward pre-hook on a float32 layer."""
    g = torch.Generator().manual_seed(1)
    down = nn.Linear(16, 8)
    x = torch.randn(3, 20, 16, generator=g)
    with collect_grams({"down": down}) as grams, torch.no_grad():
        y = down(x)
    keep = torch.arange(0, 16, 2)
    fit = fit_output_projection(grams["down"], down.weight.detach(), down.bias.detach(), keep, mode="refit",
                                ridge=1e-8, intercept=True)
    assert fit.weight.dtype == torch.float32 and fit.bias.dtype == torch.float32
    assert fit.error_after < fit.error_before
    with torch.no_grad():
        y_fit = x[..., keep] @ fit.weight.T + fit.bias
        y_plain = x[..., keep] @ down.weight[:, keep].T + down.bias
    assert (y - y_fit).norm() < (y - y_plain).norm()


def test_unknown_mode(problem):
    x, w, b, keep = problem
    with pytest.raises(ValueError, match="unknown fit mode"):
        fit_output_projection(stats_of(x), w, b, keep, mode="bogus")
