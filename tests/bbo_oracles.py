"""Oracles for tests/test_bbo.py (loaded as `bbo_oracles:NAME` with tests/ on the path).

`logged` scores gmm2d points with the task's quadratic reward and appends a digest of every batch it answered to
the file named by SQDF_TEST_ORACLE_LOG; with SQDF_TEST_KILL_AT=n it kills its own process with SIGKILL when called
the n-th time (counted in that file), before answering: a run killed inside a round, mid-query; with
SQDF_TEST_RAISE_AT=n it raises there instead (an instrument that fails mid-run).
"""
from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import numpy as np
import torch

from sqdf_fast.tasks.gmm2d import REWARD_CENTRE, REWARD_LENGTH, QuadraticReward

_reward = QuadraticReward(REWARD_CENTRE, REWARD_LENGTH)


def logged(points: torch.Tensor, cond: torch.Tensor) -> list[float]:
    log = Path(os.environ["SQDF_TEST_ORACLE_LOG"])
    calls = len(log.read_text().splitlines()) if log.exists() else 0
    if calls + 1 == int(os.environ.get("SQDF_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if calls + 1 == int(os.environ.get("SQDF_TEST_RAISE_AT", "0")):
        raise TimeoutError("the instrument did not answer")
    digest = hashlib.sha256(points.double().numpy().tobytes()).hexdigest()[:16]
    with open(log, "a") as handle:
        handle.write(digest + "\n")
    return _reward(points, cond).tolist()   # a list of floats: any sequence of numbers is an answer


def as_numpy(points, cond):
    return np.asarray(_reward(points, cond))


def raises(points, cond):
    raise RuntimeError("instrument offline")


def wrong_shape(points, cond):
    return torch.zeros(points.shape[0] + 1)


def not_numbers(points, cond):
    return ["good"] * points.shape[0]


def some_nan(points, cond):
    values = _reward(points, cond).clone()
    values[::3] = float("nan")
    return values
