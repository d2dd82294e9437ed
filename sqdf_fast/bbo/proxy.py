"""The learned proxy of the oracle, its optimism bonus, and the differentiable reward the fine-tuning climbs.

    ProxyNet        K MLP heads (features -> hidden -> hidden -> 1) as one batched network: weights (K, ., .),
                    one einsum per layer for every head; inputs and labels standardised with the query set's
                    statistics. K = 1 for greedy and UCB; K > 1 for bootstrap (each head fits its own resample).
    fit             all queries so far, warm-started from the network as it stands (the last round's), AdamW on
                    mini-batches, early-stopped on the newest `holdout` share of queries (held out of the fit),
                    the best epoch's weights kept.
    UCBBonus        c sqrt(phi^T (Phi^T Phi / n + lambda I)^-1 phi) on the penultimate features phi of the fitted
                    head, Phi those of the n training queries: one Cholesky factorisation per round, then a
                    triangular solve per batch (never an inverse).
    ProxyReward     (images, cond) -> proxy(features(images)) + bonus, differentiable in the images; the network
                    frozen. Bootstrap: max over the heads, or mean + c std.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BONUSES = ("greedy", "ucb", "bootstrap")
BOOTSTRAP_RULES = ("max", "mean-std")


class ProxyNet(nn.Module):
    """`heads` MLPs in one module: forward (B, F) -> (K, B) in label units; `penultimate` (B, F) -> (K, B, H)."""

    def __init__(self, in_features: int, hidden: int, heads: int, generator: torch.Generator):
        super().__init__()
        shapes = [(in_features, hidden), (hidden, hidden), (hidden, 1)]
        # each head's layers initialised as nn.Linear would (uniform in +- 1/sqrt(fan_in)), from `generator`
        self.weights = nn.ParameterList(
            nn.Parameter((torch.rand((heads, i, o), generator=generator) * 2 - 1) / math.sqrt(i)) for i, o in shapes)
        self.biases = nn.ParameterList(
            nn.Parameter((torch.rand((heads, 1, o), generator=generator) * 2 - 1) / math.sqrt(i)) for i, o in shapes)
        for name in ("x_mean", "x_std", "y_mean", "y_std"):
            self.register_buffer(name, torch.zeros(in_features) if name.startswith("x") else torch.zeros(()))
        self.x_std.fill_(1.0)
        self.y_std.fill_(1.0)

    @property
    def heads(self) -> int:
        return self.weights[0].shape[0]

    def standardise(self, features: Tensor, labels: Tensor) -> None:
        """Set the input and label statistics from the data the network is about to fit."""
        self.x_mean.copy_(features.mean(0))
        self.x_std.copy_(features.std(0).clamp(min=1e-6) if features.shape[0] > 1 else torch.ones_like(self.x_std))
        self.y_mean.copy_(labels.mean())
        self.y_std.copy_(labels.std().clamp(min=1e-6) if labels.shape[0] > 1 else torch.ones_like(self.y_std))

    def penultimate(self, features: Tensor) -> Tensor:
        h = ((features.to(self.x_mean.dtype) - self.x_mean) / self.x_std).expand(self.heads, -1, -1)
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = F.silu(torch.baddbmm(b, h, w))
        return h

    def standardised(self, features: Tensor) -> Tensor:
        """(K, B) predictions in standardised label units."""
        return torch.baddbmm(self.biases[-1], self.penultimate(features), self.weights[-1]).squeeze(-1)

    def forward(self, features: Tensor) -> Tensor:
        return self.standardised(features) * self.y_std + self.y_mean


@dataclass
class FitResult:
    val_rmse: float      # the head mean's error on the held-out queries, in label units
    epochs: int          # epochs run (early stopping included)
    best_epoch: int
    train_rows: int
    val_rows: int


def holdout_rows(n: int, share: float) -> int:
    """Held-out queries of a set of n: the newest floor(n * share) (at least one is required)."""
    return int(n * share)


@contextlib.contextmanager
def one_thread():
    """The proxy's matrices are a few hundred rows wide: intra-op threads would only spin, and on a machine whose
    cores are busy a fit took 30x longer with them (measured: 178 s against 6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit(net: ProxyNet, features: Tensor, labels: Tensor, generator: torch.Generator, *, holdout: float,
        epochs: int, patience: int, lr: float, batch_size: int, weight_decay: float = 0.0) -> FitResult:
    """Fit `net` (warm start: as it stands) to (features, labels), in query order (newest last): the newest
    `holdout` share is the validation set. Every head sees the same mini-batches; bootstrap heads weight each row by
    its count in their own resample of the training rows (drawn once per fit), so all heads train in one pass.
    Runs on the CPU in one thread (`one_thread`)."""
    with one_thread():
        return _fit(net, features, labels, generator, holdout, epochs, patience, lr, batch_size, weight_decay)


def _fit(net, features, labels, generator, holdout, epochs, patience, lr, batch_size, weight_decay) -> FitResult:
    n = features.shape[0]
    n_val = holdout_rows(n, holdout)
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"proxy fit: {n} queries leave {n_val} held out and {n - n_val} to fit (holdout "
                         f"{holdout}); need at least one of each")
    features, labels = features.float(), labels.float()
    x_train, y_train, x_val, y_val = features[:-n_val], labels[:-n_val], features[-n_val:], labels[-n_val:]
    n_train = x_train.shape[0]
    net.standardise(x_train, y_train)
    target = (y_train - net.y_mean) / net.y_std
    if net.heads > 1:   # bootstrap: counts of each row in each head's resample (multinomial, mean 1)
        picks = torch.randint(0, n_train, (net.heads, n_train), generator=generator)
        counts = torch.zeros(net.heads, n_train).scatter_add_(1, picks, torch.ones(net.heads, n_train))
    else:
        counts = torch.ones(1, n_train)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

    def val_rmse() -> float:
        with torch.no_grad():
            return float((net(x_val).mean(0) - y_val).square().mean().sqrt())

    best, best_epoch, best_state, epoch = val_rmse(), 0, copy.deepcopy(net.state_dict()), 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n_train, generator=generator)
        for rows in order.split(batch_size):
            err = (net.standardised(x_train[rows]) - target[rows]).square()
            loss = (counts[:, rows] * err).sum() / counts[:, rows].sum().clamp(min=1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        current = val_rmse()
        if current < best:
            best, best_epoch, best_state = current, epoch, copy.deepcopy(net.state_dict())
        elif epoch - best_epoch >= patience:
            break
    net.load_state_dict(best_state)
    return FitResult(best, epoch, best_epoch, n_train, n_val)


class UCBBonus(nn.Module):
    """(c / sqrt(n)) sqrt(phi^T Sigma^-1 phi), Sigma = Phi^T Phi / n + lambda I over the fit's penultimate features
    Phi (n, H). The 1/sqrt(n) makes it the linear-UCB width sqrt(phi^T (Phi^T Phi + n lambda I)^-1 phi): the bonus
    shrinks as queries accumulate, and lambda is a share of the features' second moment whatever n is. Sigma's
    Cholesky factor L is computed once (here); each call solves L v = phi and returns (c / sqrt(n)) |v|."""

    def __init__(self, net: ProxyNet, train_features: Tensor, scale: float, ridge: float):
        super().__init__()
        with torch.no_grad():
            phi = net.penultimate(train_features.float())[0].double()          # (n, H)
            sigma = phi.T @ phi / phi.shape[0] + ridge * torch.eye(phi.shape[1], dtype=phi.dtype)
            self.register_buffer("cholesky", torch.linalg.cholesky(sigma).float())
        self.scale = scale / math.sqrt(phi.shape[0])

    def forward(self, phi: Tensor) -> Tensor:
        """phi (B, H) -> (B,)."""
        v = torch.linalg.solve_triangular(self.cholesky, phi.T, upper=False)   # (H, B)
        return self.scale * v.square().sum(0).clamp(min=1e-12).sqrt()


class ProxyReward(nn.Module):
    """The fine-tuning reward: the fitted proxy (plus its optimism bonus) of `features(images)`, differentiable in the
    images; frozen. greedy: the head's prediction; ucb: prediction + UCBBonus; bootstrap: max over heads
    (`rule` max) or mean + scale * std (`rule` mean-std)."""

    def __init__(self, net: ProxyNet, features: Callable[[Tensor], Tensor], bonus: str,
                 ucb: UCBBonus | None = None, rule: str = "max", scale: float = 1.0):
        super().__init__()
        self.net, self.ucb = net, ucb
        self.features, self.bonus, self.rule, self.scale = features, bonus, rule, scale
        self.requires_grad_(False).eval()

    def update(self, fitted: ProxyNet, ucb: UCBBonus | None) -> None:
        """Take a new fit's weights (copied in place) and bonus."""
        device = self.net.weights[0].device
        self.net.load_state_dict(fitted.state_dict())
        self.ucb = None if ucb is None else ucb.to(device)

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        x = self.features(images).float()
        if self.bonus == "ucb":
            phi = self.net.penultimate(x)
            mean = torch.baddbmm(self.net.biases[-1], phi, self.net.weights[-1])[0, :, 0]
            return mean * self.net.y_std + self.net.y_mean + self.ucb(phi[0]) * self.net.y_std
        heads = self.net(x)
        if self.bonus == "greedy":
            return heads[0]
        if self.rule == "max":
            return heads.max(0).values
        return heads.mean(0) + self.scale * heads.std(0)
