"""`python -m sqdf_fast.compare` on a tiny configuration: rows, report, plot, continuation, bad input."""
import json

import pytest

from sqdf_fast import compare

TINY = ["--set", "steps=1", "--set", "batch_size=4", "--set", "eval_per_class=4", "--set", "sample_steps=4",
        "--set", "rollout_batch=4", "--set", "buffer_size=8", "--set", "log_every=1"]


def test_tiny_comparison_writes_rows_report_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    rows = compare.main(["--task", "digits", "--methods", "sqdf,sqdf-no-discount", "--seeds", "2",
                         "--out", str(out), *TINY])
    assert [(r["method"], r["seed"]) for r in rows] == [("sqdf", 0), ("sqdf", 1), ("sqdf-no-discount", 0),
                                                         ("sqdf-no-discount", 1)]
    for row in rows:
        assert {"method", "seed", "reward", "diversity", "fd", "kl", "wall_s", "base_reward"} <= row.keys()
    assert json.loads((out / "results.json").read_text()) == rows
    report = (out / "report.md").read_text()
    assert "| base model | 2 |" in report and "| sqdf-no-discount | 2 |" in report
    assert (out / "pareto.png").stat().st_size > 0
    # the variant really ran with its option
    assert json.loads((out / "runs" / "sqdf-no-discount-seed0" / "config.json").read_text())["gamma"] == 1.0
    # same seed, same base model whatever the method
    assert rows[0]["base_reward"] == rows[2]["base_reward"]

    capsys.readouterr()
    rows_file = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps(rows_file[:-1]))   # as if interrupted during the last run
    rows = compare.main(["--task", "digits", "--methods", "sqdf,sqdf-no-discount", "--seeds", "2",
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


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nonsense"], "method='nonsense'"),
    (["--set", "alpha=-1"], "alpha=-1"),
    (["--set", "no_such_option=3"], "no_such_option"),
])
def test_bad_configurations_fail_before_any_run(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--task", "digits", "--seeds", "1", "--out", str(tmp_path / "cmp"), *argv])
    assert message in str(exit_info.value)
    assert not (tmp_path / "cmp" / "runs").exists()
