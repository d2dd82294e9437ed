"""Evaluation metrics on evaluator features: per-class Frechet distance ("fd") and diversity; Frechet and energy
distances to a weighted reference set (a KL-tilted target, sqdf_fast.tasks.digits)."""
from __future__ import annotations

import torch
from torch import Tensor


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: Tensor, b: Tensor, weights: Tensor | None = None) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) between two feature sets (n, F), in float64.
    With `weights` (m,) on b (self-normalised here), b's mean is sum_j w_j b_j and its covariance the unbiased
    weighted one, sum_j w_j (b_j - mu_b)(b_j - mu_b)^T / (1 - sum_j w_j^2)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double(), b.double()
    if weights is None:
        mean_b, cov_b = b.mean(0), torch.atleast_2d(torch.cov(b.T))
    else:
        weights = weights.double() / weights.double().sum()
        mean_b, cov_b = weights @ b, torch.atleast_2d(torch.cov(b.T, aweights=weights))
    cov_a = torch.atleast_2d(torch.cov(a.T))
    # tr (C_a^1/2 C_b C_a^1/2)^1/2 = the nuclear norm of C_a^1/2 C_b^1/2: accurate for singular covariances
    cross = torch.linalg.svdvals(_sqrtm_psd(cov_a) @ _sqrtm_psd(cov_b)).sum()
    return float((a.mean(0) - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def energy_distance(x: Tensor, y: Tensor, weights: Tensor | None = None) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| with unbiased within-set means (pdist leaves out i = j). With `weights` (m,)
    on y (self-normalised here): E|X - Y| = mean_i sum_j w_j |x_i - y_j| and E|Y - Y'| = sum_{j != k} w_j w_k
    |y_j - y_k| / (1 - sum_j w_j^2), which is pdist's mean for equal weights."""
    if weights is None:
        return float(2 * torch.cdist(x, y).mean() - torch.pdist(x).mean() - torch.pdist(y).mean())
    x, y = x.double(), y.double()
    weights = weights.double() / weights.double().sum()
    cross = (torch.cdist(x, y) @ weights).mean()
    within = weights @ torch.cdist(y, y) @ weights / (1 - weights.square().sum())   # the diagonal is 0
    return float(2 * cross - torch.pdist(x).mean() - within)


def effective_sample_size(weights: Tensor) -> float:
    """(sum w)^2 / sum w^2: how many equally weighted samples the weighted set is worth."""
    weights = weights.double()
    return float(weights.sum().square() / weights.square().sum())


def per_class_fd(features: Tensor, cond: Tensor, real: dict[int, Tensor]) -> float:
    """Mean over classes (those with at least 2 samples) of the Frechet distance between sample and real features."""
    classes = [c for c in torch.unique(cond).tolist() if int((cond == c).sum()) > 1]
    if not classes:
        return float("nan")
    return sum(frechet_distance(features[cond == c], real[c]) for c in classes) / len(classes)


def per_class_diversity(features: Tensor, cond: Tensor) -> float:
    """Mean over classes of the mean pairwise Euclidean distance between sample features of that class."""
    values = [torch.pdist(features[cond == c].double()).mean() for c in torch.unique(cond).tolist()
              if int((cond == c).sum()) > 1]
    return float(torch.stack(values).mean()) if values else float("nan")
