"""Evaluation metrics on evaluator features: per-class Frechet distance ("fd") and diversity."""
from __future__ import annotations

import torch
from torch import Tensor


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) between two feature sets (n, F), in float64."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    # tr (C_a^1/2 C_b C_a^1/2)^1/2 = the nuclear norm of C_a^1/2 C_b^1/2: accurate for singular covariances
    cross = torch.linalg.svdvals(_sqrtm_psd(cov_a) @ _sqrtm_psd(cov_b)).sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


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
