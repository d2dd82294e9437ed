"""Online black-box optimisation (sqdf_fast.bbo): the proxy and its bonuses, oracles, budgets, the loop and its
resume after a kill."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqdf_fast.bbo import loop, oracles
from sqdf_fast.bbo.proxy import ProxyNet, ProxyReward, UCBBonus, fit

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny networks: intra-op threads only spin
TESTS = Path(__file__).resolve().parent
# a gmm2d budget that runs in seconds: 3 rounds of 32, 64, 128 queries
GMM_OPTIONS = ["--task", "gmm2d", "--sample-steps", "10", "--batch-size", "64", "--rollout-batch", "64",
               "--buffer-size", "256", "--rounds", "3", "--queries", "32", "--oracle-batch", "32",
               "--steps-per-round", "8", "--eval-per-class", "128", "--log-every", "4", "--lr", "0.01",
               "--proxy-holdout", "0.1", "--no-progress"]


def smooth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1].square()


def fitted(heads: int, n: int = 800, seed: int = 0) -> tuple[ProxyNet, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 2), generator=gen) * 4 - 2
    net = ProxyNet(2, 64, heads, torch.Generator().manual_seed(1))
    fit(net, x, smooth(x).double(), gen, holdout=0.1, epochs=400, patience=40, lr=3e-3, batch_size=128)
    return net, x, smooth(x)


# ---- the proxy ------------------------------------------------------------------------------------------------
def test_proxy_recovers_a_known_smooth_function():
    net, _, y = fitted(heads=1)
    test = torch.rand((500, 2), generator=torch.Generator().manual_seed(5)) * 4 - 2
    with torch.no_grad():
        error = (net(test)[0] - smooth(test)).square().mean().sqrt()
    assert error < 0.1 * y.std(), f"proxy RMSE {error:.3f} against a label std of {y.std():.3f}"


def test_fit_stops_early_on_the_newest_queries_and_keeps_the_best_epoch():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((200, 2), generator=gen)
    net = ProxyNet(2, 16, 1, torch.Generator().manual_seed(1))
    result = fit(net, x, smooth(x), gen, holdout=0.05, epochs=500, patience=5, lr=1e-2, batch_size=64)
    assert (result.train_rows, result.val_rows) == (190, 10)
    assert result.epochs < 500 and result.epochs - result.best_epoch == 5
    with torch.no_grad():   # the kept weights are the best epoch's: their held-out error is the one reported
        assert math.isclose(float((net(x[-10:]).mean(0) - smooth(x[-10:])).square().mean().sqrt()),
                            result.val_rmse, rel_tol=1e-5)
    with pytest.raises(ValueError, match="held out"):
        fit(net, x[:10], smooth(x[:10]), gen, holdout=0.05, epochs=5, patience=5, lr=1e-2, batch_size=64)


def test_ucb_bonus_equals_its_closed_form_and_shrinks_where_data_was_queried():
    net, x, _ = fitted(heads=1, n=300)
    train = x[x[:, 0] < 0]   # queries only on the left half
    bonus = UCBBonus(net, train, scale=0.7, ridge=1e-2)
    probe = torch.tensor([[-1.0, 0.5], [-0.5, -1.0], [1.5, 0.5], [1.8, -1.5]])
    with torch.no_grad():
        phi_train, phi = net.penultimate(train)[0].double(), net.penultimate(probe)[0].double()
        n = phi_train.shape[0]
        sigma = phi_train.T @ phi_train / n + 1e-2 * torch.eye(phi_train.shape[1], dtype=torch.float64)
        expected = 0.7 / math.sqrt(n) * torch.einsum("bh,hk,bk->b", phi, torch.linalg.inv(sigma), phi).sqrt()
        got = bonus(phi.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-6)
    assert got[:2].max() < got[2:].min(), f"bonus where queried {got[:2]} vs elsewhere {got[2:]}"
    # more queries: a smaller bonus at the same point (the 1/sqrt(n) of the linear-UCB width)
    more = UCBBonus(net, torch.cat([train, train]), scale=0.7, ridge=1e-2)
    with torch.no_grad():
        torch.testing.assert_close(more(phi.float()), got / math.sqrt(2), rtol=1e-3, atol=1e-6)


def test_bootstrap_heads_differ_and_the_optimistic_rules_bound_their_mean():
    net, _, _ = fitted(heads=4, n=200)
    probe = torch.rand((64, 2), generator=torch.Generator().manual_seed(9)) * 6 - 3   # mostly off the data
    with torch.no_grad():
        heads = net(probe)
    assert heads.shape == (4, 64)
    assert heads.std(0).mean() > 1e-3, "bootstrap heads fitted to different resamples must disagree"
    identity = lambda images: images   # noqa: E731
    best = ProxyReward(net, identity, "bootstrap", rule="max")(probe, None)
    upper = ProxyReward(net, identity, "bootstrap", rule="mean-std", scale=1.0)(probe, None)
    torch.testing.assert_close(best, heads.max(0).values)
    torch.testing.assert_close(upper, heads.mean(0) + heads.std(0))


def test_proxy_reward_is_differentiable_in_the_images_and_frozen():
    net, _, _ = fitted(heads=1, n=200)
    reward = ProxyReward(net, lambda images: images * 1.0, "ucb", UCBBonus(net, torch.rand(50, 2), 1.0, 1e-2))
    points = torch.rand((5, 2), requires_grad=True)
    reward(points, None).sum().backward()
    assert points.grad is not None and torch.isfinite(points.grad).all() and points.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


# ---- oracles --------------------------------------------------------------------------------------------------
def test_compactness_is_the_share_of_ink_in_the_centre():
    images = -torch.ones((3, 1, 16, 16))
    images[0, 0, 6:10, 6:10] = 1.0             # all ink inside the central 8x8
    images[1, 0, 0:2, :] = 1.0                  # all ink in the top rows
    images[2, 0, 4:12, 0:16] = 1.0              # half inside
    torch.testing.assert_close(oracles.compactness(images, None), torch.tensor([1.0, 0.0, 0.5]))
    assert float(oracles.compactness(-torch.ones((1, 1, 16, 16)), None)) == 0.0   # no ink at all


def _oracle(name: str, drop: bool = False) -> oracles.Oracle:
    return oracles.Oracle(name, oracles.load_callable(f"bbo_oracles:{name}", "oracle", ("images", "cond")),
                          batch_size=4, images_01=False, drop_nonfinite=drop)


@pytest.fixture
def tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.mark.usefixtures("tests_on_path")
@pytest.mark.parametrize("name, message", [
    ("raises", r"oracle 'raises', batch of rows 4\.\.7 raised RuntimeError: instrument offline"),
    ("wrong_shape", r"batch of rows 4\.\.7 returned shape \(5,\), expected \(4,\)"),
    ("not_numbers", r"batch of rows 4\.\.7 returned list, not numbers"),
    ("some_nan", r"batch of rows 4\.\.7 returned 2 non-finite value\(s\) \(first at row 4\)"),
])
def test_a_bad_oracle_is_named_with_its_batch(name, message):
    oracle = _oracle(name)
    points = torch.randn((8, 2))
    with pytest.raises(oracles.OracleError, match=message):
        oracle.query(points[4:], torch.zeros(4), first_row=4)


@pytest.mark.usefixtures("tests_on_path")
def test_oracle_answers_in_any_number_format_and_drops_nonfinite_on_request(monkeypatch, tmp_path):
    points = torch.randn((10, 2))
    expected = _oracle("as_numpy")(points, torch.zeros(10))
    assert expected.dtype == torch.float64 and expected.shape == (10,)
    monkeypatch.setenv("SQDF_TEST_ORACLE_LOG", str(tmp_path / "log"))
    torch.testing.assert_close(_oracle("logged")(points, torch.zeros(10)), expected)
    assert len((tmp_path / "log").read_text().splitlines()) == 3          # batches of 4: 4 + 4 + 2
    labels = _oracle("some_nan", drop=True)(points, torch.zeros(10))
    assert torch.isnan(labels).sum() == 5   # rows 0 and 3 of each batch of 4 (0 of the last): kept as NaN


def test_builtin_oracles_for_each_task():
    from sqdf_fast import config, tasks
    task = tasks.build(config.from_dict({"task": "gmm2d"}, "test"), torch.device("cpu"))
    oracle = oracles.build_oracle("auto", task, batch_size=8)
    points = torch.randn((5, 2))
    torch.testing.assert_close(oracle(points, torch.zeros(5, dtype=torch.long)),
                               task.reward(points, None).double())
    with pytest.raises(ValueError, match="compactness: scores 16x16 digits"):
        oracles.build_oracle("compactness", task, batch_size=8)
    with pytest.raises(ValueError, match="built-in oracles are"):
        oracles.build_oracle("nonsense", task, batch_size=8)


# ---- budgets and options --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "rounds=0: must be >= 1"),
    (["--queries", "8"], "queries='8': round 1's 8 queries hold out none at proxy_holdout=0.05"),
    (["--queries", "64,64"], "queries='64,64': 2 sizes for rounds=4"),
    (["--queries", "0,64,64,64"], "round 1 needs queries"),
    (["--queries", "a lot"], "a number or a comma list"),
    (["--proxy-holdout", "0"], "proxy_holdout=0.0: must lie in (0, 1)"),
    (["--steps", "40"], "steps: the black-box loop trains rounds x steps_per_round"),
    (["--steps-per-round", "7"], "must be a multiple of replay_ratio=2"),
    (["--bonus", "bootstrap", "--bootstrap-heads", "1"], "bootstrap_heads=1: must be >= 2"),
    (["--method", "draft", "--kl-to", "previous"], "method 'draft' has no KL term"),
    (["--oracle", "nonsense"], "oracle='nonsense'"),
    (["--lr", "-1"], "lr=-1.0: must be > 0"),
])
def test_impossible_budgets_and_options_are_refused_before_any_work(argv, message, tmp_path):
    with pytest.raises(SystemExit) as stop:
        loop.parse(argv + ["--out", str(tmp_path / "run")])
    assert message in str(stop.value) and stop.value.code == 2   # a usage error
    assert not (tmp_path / "run").exists()


def test_query_schedules():
    assert loop.query_schedule(loop.BBOConfig(queries="64", rounds=4)) == [64, 128, 256, 512]
    assert loop.query_schedule(loop.BBOConfig(queries="10,20,0", rounds=3)) == [10, 20, 0]
    assert loop.query_schedule(loop.BBOConfig(queries="64", rounds=3, non_adaptive=True)) == [448, 0, 0]


def test_every_training_option_is_accepted_and_the_task_budget_applies():
    train, bbo, _ = loop.parse(["--task", "gmm2d", "--alpha", "0.5", "--bonus", "greedy"])
    assert train.alpha == 0.5 and train.task == "gmm2d" and bbo.bonus == "greedy"
    assert bbo.steps_per_round == loop.TASK_DEFAULTS["gmm2d"]["steps_per_round"]
    assert train.steps == bbo.rounds * bbo.steps_per_round


# ---- the loop -------------------------------------------------------------------------------------------------
def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("tests_on_path")
def test_gmm2d_run_raises_the_oracle_reward_and_resumes_after_a_kill_without_querying_again(tmp_path, monkeypatch):
    oracle = ["--oracle", "bbo_oracles:logged"]
    # uninterrupted
    full = tmp_path / "full"
    monkeypatch.setenv("SQDF_TEST_ORACLE_LOG", str(tmp_path / "full.log"))
    train, cfg, _ = loop.parse(GMM_OPTIONS + oracle + ["--out", str(full)])
    summary = loop.optimise(train, cfg)
    rows = read_rows(full)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["queries"] for r in rows] == [0, 32, 96, 224]
    rewards = [r["oracle_reward"] for r in rows]
    assert rewards[-1] > rewards[0] + 0.1 and rewards[2] > rewards[0], rewards
    for name in ("config.json", "queries.safetensors", "oracle_curve.png", "samples_round3.png", "summary.json",
                 "metrics.jsonl", "checkpoint/state.pt"):
        assert (full / name).exists(), name
    assert {f"time_{k}_s" for k in loop.TIME_KEYS} <= set(rows[-1])
    full_calls = (tmp_path / "full.log").read_text().split()
    # 224 training queries in batches of 32, and 4 evaluations of 128 samples: 7 + 16 calls
    assert len(full_calls) == 23 and summary["eval_queries"] == 512

    # killed by SIGKILL inside round 2, at its third query batch (call 4 + 1 + 4 + 3 = 12)
    killed = tmp_path / "killed"
    log = tmp_path / "killed.log"
    env = {**os.environ, "SQDF_TEST_ORACLE_LOG": str(log), "SQDF_TEST_KILL_AT": "12", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "sqdf_fast.bbo", *GMM_OPTIONS, *oracle, "--out", str(killed)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert [r["round"] for r in read_rows(killed)] == [0, 1]
    answered = log.read_text().split()
    assert len(answered) == 11

    monkeypatch.setenv("SQDF_TEST_ORACLE_LOG", str(log))
    train, cfg, resume = loop.parse(["--resume", str(killed)])
    resumed = loop.optimise(train, cfg, resume)
    calls = log.read_text().split()
    assert len(calls) == len(set(calls)), "a batch already labelled was queried again"
    assert sorted(calls) == sorted(full_calls), "the killed and resumed run asked other questions"
    for key in ("oracle_reward_final", "oracle_reward_max_final", "queries", "eval_queries", "diversity_final",
                "fd_final", "kl_final", "proxy_val_error_final", "dist_to_target_final"):
        assert resumed[key] == summary[key], key
    train, cfg, resume = loop.parse(["--resume", str(killed)])   # a finished run: its summary again, no query
    again = loop.optimise(train, cfg, resume)
    assert again["dist_to_target_final"] == summary["dist_to_target_final"]
    assert log.read_text().split() == calls


@pytest.mark.usefixtures("tests_on_path")
def test_an_oracle_failing_mid_run_stops_it_with_every_label_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("SQDF_TEST_ORACLE_LOG", str(tmp_path / "log"))
    # calls: round 0's evaluation (4 batches of 32), round 1's query batch and evaluation (1 + 4), round 2's first
    # query batch; the 11th is round 2's second
    monkeypatch.setenv("SQDF_TEST_RAISE_AT", "11")
    train, cfg, _ = loop.parse(GMM_OPTIONS + ["--oracle", "bbo_oracles:logged", "--out", str(tmp_path / "run")])
    with pytest.raises(oracles.OracleError, match=r"oracle 'bbo_oracles:logged', batch of rows 32\.\.63 raised "
                                                  "TimeoutError: the instrument did not answer"):
        loop.optimise(train, cfg)
    saved = loop.QuerySet(tmp_path / "run" / loop.QUERIES)
    saved.load(last_round=2)
    assert saved.count == 32 + 32 and saved.round.tolist() == [1] * 32 + [2] * 32


@pytest.mark.usefixtures("tests_on_path")
def test_kl_to_the_previous_round_with_a_kept_relabelled_buffer_and_bootstrap(tmp_path):
    train, cfg, _ = loop.parse(GMM_OPTIONS + ["--kl-to", "previous", "--keep-buffer", "--buffer-sampler",
                                              "reward-gamma", "--bonus", "bootstrap", "--out", str(tmp_path / "run")])
    summary = loop.optimise(train, cfg)
    assert summary["oracle_reward_final"] > summary["oracle_reward_base"] + 0.1
    assert summary["kl_final"] > 0   # the path KL reported is to the base model, whatever the training's reference
