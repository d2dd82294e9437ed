"""`python -m sqdf_fast.compare` on a tiny configuration: rows, report, plot, continuation, bad input."""
import json

import pytest

from sqdf_fast import compare, config

TINY = ["--set", "steps=1", "--set", "batch_size=4", "--set", "eval_per_class=2", "--set", "sample_steps=4",
        "--set", "rollout_batch=4", "--set", "buffer_size=8", "--set", "log_every=1"]


def test_tiny_comparison_writes_rows_report_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    rows = compare.main(["--task", "digits", "--methods", "sqdf,sqdf-no-discount,sqdf@alpha=0.5", "--seeds", "2",
                         "--out", str(out), *TINY])
    assert [(r["method"], r["seed"]) for r in rows] == [("sqdf", 0), ("sqdf", 1), ("sqdf-no-discount", 0),
                                                         ("sqdf-no-discount", 1), ("sqdf@alpha=0.5", 0),
                                                         ("sqdf@alpha=0.5", 1)]
    for row in rows:
        assert {"method", "seed", "reward", "diversity", "fd", "path_kl", "wall_s", "base_reward"} <= row.keys()
    assert json.loads((out / "results.json").read_text()) == rows
    report = (out / "report.md").read_text()
    assert "| base model | 2 |" in report and "| sqdf-no-discount | 2 |" in report
    assert "## At matched reward" in report and "(sqdf, sqdf@alpha=0.5)" in report.replace("sqdf@alpha=0.5, sqdf",
                                                                                          "sqdf, sqdf@alpha=0.5")
    # digits: against the KL-tilted real digits (sqdf_fast/tasks/digits.py), said so in the legend
    assert "fd_to_target" in report and "the real digits of each class weighted by exp(r / alpha)" in report
    assert all("fd_to_target" in row for row in rows)
    assert (out / "pareto.png").stat().st_size > 0
    # the variant and the sweep point really ran with their options
    assert json.loads((out / "runs" / "sqdf-no-discount-seed0" / "config.json").read_text())["gamma"] == 1.0
    assert json.loads((out / "runs" / "sqdf@alpha=0.5-seed0" / "config.json").read_text())["alpha"] == 0.5
    # same seed, same base model whatever the method
    assert rows[0]["base_reward"] == rows[2]["base_reward"]

    capsys.readouterr()
    rows_file = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(rows_file[:-1]))   # as if interrupted during the last run
    rows = compare.main(["--task", "digits", "--methods", "sqdf,sqdf-no-discount,sqdf@alpha=0.5", "--seeds", "2",
                         "--out", str(out), *TINY])
    assert [(r["method"], r["seed"]) for r in rows] == [(r["method"], r["seed"]) for r in rows_file]
    assert "removing the unfinished run" in capsys.readouterr().out
    again = compare.main(["--task", "digits", "--methods", "sqdf", "--seeds", "2", "--out", str(out), *TINY])
    assert again == rows                                   # nothing re-run: every (method, seed) was done
    assert "seed" not in capsys.readouterr().out.split("wrote")[0]


def test_a_failed_run_is_recorded_and_the_comparison_goes_on(tmp_path):
    """A run the non-finite guard stops (here: a reward that is always NaN) is a failed row; the report lists it."""
    out = tmp_path / "cmp"
    rows = compare.main(["--task", "digits", "--methods", "sqdf", "--seeds", "2", "--out", str(out), *TINY,
                         "--set", "reward=rewards_for_tests:always_nan", "--set", "max_nonfinite_steps=1"])
    assert [r["seed"] for r in rows] == [0, 1] and all("non-finite" in r["failed"] for r in rows)
    report = (out / "report.md").read_text()
    assert "| sqdf | 0 | 2 |" in report and "Failed runs" in report


def test_labels_options_and_the_pinned_target(tmp_path):
    """A label's own options win over --set, which wins over the variant and the task's method defaults; every run
    of a comparison measures against the target of the task's (or --set's) alpha."""
    cfg = compare.run_config("gmm2d", "sqdf-no-buffer@alpha=0.3@lr=0.01", 1, {"alpha": 2.0, "buffer": True},
                             tmp_path)
    assert (cfg.alpha, cfg.lr, cfg.buffer, cfg.seed, cfg.target_alpha) == (0.3, 0.01, True, 1, 2.0)
    cfg = compare.run_config("gmm2d", "draft-kl", 0, {}, tmp_path)
    assert cfg.target_alpha == 1.0 and cfg.alpha == config.from_dict({"task": "gmm2d", "method": "draft-kl"},
                                                                      "test").alpha
    assert compare.run_config("gmm2d", "sqdf", 0, {"target_alpha": 0.5}, tmp_path).target_alpha == 0.5
    assert compare.family("sqdf@alpha=0.3") == "sqdf" and compare.parse_label("sqdf") == ("sqdf", {})
    with pytest.raises(ValueError, match="NAME@KEY=VALUE"):
        compare.parse_label("sqdf@alpha")


def test_the_sqdf_front_is_read_between_its_points():
    table = [{"method": "base model", "reward": (-2.0, 0), "diversity": (9.0, 0)},
             {"method": "sqdf", "reward": (0.0, 0), "diversity": (2.0, 0)},
             {"method": "sqdf@alpha=4", "reward": (-1.0, 0), "diversity": (3.0, 0)},
             {"method": "draft", "reward": (-0.25, 0), "diversity": (1.0, 0)}]
    assert compare.front_at(table, -0.25, "diversity") == pytest.approx(2.25)
    assert compare.front_at(table, 0.5, "diversity") is None and compare.front_at(table, -1.5, "diversity") is None
    lines = compare.matched_reward_lines(table, None)
    assert "| draft | -0.25 | 1 | 2.25 |" in lines and not any("base model" in line for line in lines)
    assert compare.matched_reward_lines(table[:2] + table[3:], None) == []   # one SQDF point is no front


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nonsense"], "method='nonsense'"),
    (["--methods", "sqdf@alpha"], "NAME@KEY=VALUE"),
    (["--set", "target_alpha=0"], "target_alpha=0"),
    (["--set", "alpha=-1"], "alpha=-1"),
    (["--set", "no_such_option=3"], "no_such_option"),
])
def test_bad_configurations_fail_before_any_run(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--task", "digits", "--seeds", "1", "--out", str(tmp_path / "cmp"), *argv])
    assert message in str(exit_info.value)
    assert not (tmp_path / "cmp" / "runs").exists()
