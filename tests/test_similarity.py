"""Hand-worked cases of the similarity maths."""

from __future__ import annotations

import math

import pytest
import torch

from loraplan.similarity import angular_similarity, is_constant, linear_cka, sample_variance_share, spearman


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_cka_of_a_matrix_with_itself_is_one(debiased):
    x = _rand(40, 16, 0)
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True], ids=["biased", "debiased"])
def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(debiased):
    x, y = _rand(50, 12, 1), _rand(50, 20, 2)
    y = y + 0.5 * torch.cat([x, x[:, :8]], dim=1)  # related, so CKA is well away from 0
    q, _ = torch.linalg.qr(_rand(20, 20, 3))
    reference = linear_cka(x, y, debiased=debiased)
    assert 0.05 < reference < 0.99
    assert linear_cka(x, y @ q, debiased=debiased) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(3.7 * x, y, debiased=debiased) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, 0.01 * y @ q, debiased=debiased) == pytest.approx(reference, abs=1e-10)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    x, y = _rand(50, 12, 4), _rand(50, 12, 5) + _rand(50, 12, 4)
    scale = torch.linspace(0.1, 10, 12, dtype=torch.float64)
    assert abs(linear_cka(x, y) - linear_cka(x * scale, y)) > 1e-3


def test_biased_cka_of_independent_wide_matrices_is_high_and_debiased_is_near_zero():
    x, y = _rand(128, 512, 6), _rand(128, 512, 7)
    biased = linear_cka(x, y)
    debiased = linear_cka(x, y, debiased=True)
    assert biased > 0.7  # the known small-n, large-d bias of the biased estimator
    assert abs(debiased) < 0.02


def test_cka_matches_the_feature_space_formula():
    x, y = _rand(30, 7, 8), _rand(30, 9, 9)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (xc.T @ yc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-12)


def test_cka_of_a_constant_representation_is_nan_not_zero():
    x = _rand(10, 4, 10)
    constant = torch.ones(10, 4) * 3.0
    assert is_constant(constant)
    assert not is_constant(x)
    assert math.isnan(linear_cka(constant, x))
    assert math.isnan(linear_cka(x, constant, debiased=True))


def test_cka_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(_rand(1, 3, 0), _rand(1, 3, 1))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(_rand(3, 3, 0), _rand(3, 3, 1), debiased=True)


def test_sample_variance_share_detects_one_sample_carrying_the_variance():
    spread = _rand(64, 8, 11)
    assert sample_variance_share(spread) < 0.1
    degenerate = torch.zeros(20, 8)
    degenerate[7] = 1.0
    # one row differs: it carries (1-1/n)^2 / ((1-1/n)^2 + (n-1)/n^2) = (n-1)/n of the variance
    assert sample_variance_share(degenerate) == pytest.approx(19 / 20)
    assert math.isnan(sample_variance_share(torch.ones(5, 3)))


def test_angular_similarity_hand_cases():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    same = a * 2.5  # same directions, other lengths
    orthogonal = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    opposite = -a
    sim = angular_similarity([a, same, orthogonal, opposite])
    assert sim[0][1] == pytest.approx(1.0)
    assert sim[0][2] == pytest.approx(0.5)  # arccos(0)/pi = 1/2
    assert sim[0][3] == pytest.approx(0.0)  # arccos(-1)/pi = 1
    assert all(sim[i][i] == 1.0 for i in range(4))
    assert all(sim[i][j] == sim[j][i] for i in range(4) for j in range(4))


def test_angular_similarity_averages_over_samples():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # sample 0 identical (0), sample 1 orthogonal (1/2)
    assert angular_similarity([a, b])[0][1] == pytest.approx(1 - 0.25)


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, float("nan"), 3, 4], [1, 5, 3, 4]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
