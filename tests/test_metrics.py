"""Evaluation metrics against closed forms and brute force, in float64."""
from __future__ import annotations

import itertools

import pytest
import torch

from sqdf_fast.metrics import frechet_distance, per_class_diversity, per_class_fd

F64 = torch.float64

def gaussian(gen: torch.Generator, n: int, mean: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """n draws of N(mean, L L^T)."""
    return mean + torch.randn(n, len(mean), generator=gen, dtype=F64) @ scale_tril.T


def random_gaussian(gen: torch.Generator, n: int, features: int) -> torch.Tensor:
    mean = torch.randn(features, generator=gen, dtype=F64)
    scale_tril = torch.randn(features, features, generator=gen, dtype=F64).tril() + 2 * torch.eye(features, dtype=F64)
    return gaussian(gen, n, mean, scale_tril)


def fd_closed_form(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2) from the unbiased sample moments.

    tr((C_a C_b)^1/2) is the sum of the square roots of the eigenvalues of C_a C_b (real and >= 0: the product is
    similar to C_a^1/2 C_b C_a^1/2), taken here with a general eigen solver on the non-symmetric product, so this
    shares no code path with the package's symmetric (eigh) square roots."""
    def moments(z):
        centred = z - z.mean(0)
        return z.mean(0), centred.T @ centred / (len(z) - 1)
    (mean_a, cov_a), (mean_b, cov_b) = moments(a), moments(b)
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b)
    assert eigenvalues.imag.abs().max() < 1e-8 * eigenvalues.real.abs().max()
    cross = eigenvalues.real.clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


# frechet_distance --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, features", [(200, 1), (200, 4), (500, 32)], ids=str)
def test_fd_of_a_set_with_itself_is_zero(gen, n, features):
    a = random_gaussian(gen, n, features)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a, a.clone())) < 1e-6


def test_fd_of_a_set_with_itself_with_fewer_samples_than_features(gen):
    """Singular covariance (10 samples of 32 features, as in a small per-class evaluation): the cross term must not
    take square roots of rounding noise on zero eigenvalues (a square root of eigenvalues of C^1/2 C C^1/2 = C^2
    would leave ~1e-8 |C| of error)."""
    a = random_gaussian(gen, 10, 32)
    assert abs(frechet_distance(a, a)) < 1e-6


@pytest.mark.parametrize("features", [2, 5, 16])
def test_fd_matches_closed_form_and_is_symmetric(gen, features):
    a, b = random_gaussian(gen, 400, features), random_gaussian(gen, 300, features)
    expected = fd_closed_form(a, b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-5)  # promoted to float64


def test_fd_in_one_dimension_is_mean_and_std_gaps(gen):
    a, b = 1.0 + 2.0 * torch.randn(300, 1, generator=gen, dtype=F64), torch.randn(200, 1, generator=gen, dtype=F64)
    expected = float((a.mean() - b.mean()).square() + (a.std() - b.std()).square())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_fd_approaches_the_population_value(gen):
    """Diagonal covariances: FD = |mu_a - mu_b|^2 + sum_i (sqrt(c_a,i) - sqrt(c_b,i))^2; sample error ~ 1/sqrt(n)."""
    mean_a, mean_b = torch.tensor([0.0, 1.0, -1.0], dtype=F64), torch.tensor([0.5, 1.0, 1.0], dtype=F64)
    std_a, std_b = torch.tensor([1.0, 2.0, 0.5], dtype=F64), torch.tensor([1.0, 0.5, 1.5], dtype=F64)
    a = gaussian(gen, 20_000, mean_a, torch.diag(std_a))
    b = gaussian(gen, 20_000, mean_b, torch.diag(std_b))
    population = float((mean_a - mean_b).square().sum() + (std_a - std_b).square().sum())  # 4.25 + 3.25 = 7.5
    assert frechet_distance(a, b) == pytest.approx(population, abs=0.1)


# per-class metrics -------------------------------------------------------------------------------------------------
def labelled_features(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """23 float32 feature vectors in classes 0 (8), 3 (6), 7 (8) and 9 (1: no pair), shuffled."""
    cond = torch.tensor([0] * 8 + [3] * 6 + [7] * 8 + [9])
    cond = cond[torch.randperm(len(cond), generator=gen)]
    return torch.randn(len(cond), 5, generator=gen) + cond[:, None].float(), cond


def test_per_class_diversity_is_the_mean_of_per_class_mean_pairwise_distances(gen):
    features, cond = labelled_features(gen)
    per_class = []
    for c in (0, 3, 7):  # class 9 has a single sample and no pairwise distance: it is left out
        rows = features[cond == c].double()
        per_class.append(sum(float((rows[i] - rows[k]).norm()) for i, k in itertools.combinations(range(len(rows)), 2))
                         / (len(rows) * (len(rows) - 1) / 2))
    assert per_class_diversity(features, cond) == pytest.approx(sum(per_class) / 3, rel=1e-12)


def test_per_class_diversity_without_pairs_is_nan():
    assert torch.isnan(torch.tensor(per_class_diversity(torch.randn(3, 2), torch.tensor([0, 1, 2]))))


def test_per_class_fd_averages_over_the_sampled_classes(gen):
    features, cond = labelled_features(gen)
    keep = cond != 9  # one sample has no covariance
    features, cond = features[keep], cond[keep]
    real = {c: torch.randn(50, 5, generator=gen, dtype=F64) + c for c in (0, 3, 7, 8)}  # 8: not sampled, ignored
    expected = sum(fd_closed_form(features[cond == c].double(), real[c]) for c in (0, 3, 7)) / 3
    assert per_class_fd(features, cond, real) == pytest.approx(expected, rel=1e-6)
