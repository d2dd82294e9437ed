"""The commands' conventions (sqdf_fast.cli): exit status 0 / 1 / 2 (done / an error while running / a usage
error), one `error:` line on stderr, and a grouped --help that says which options take a file or a folder."""
import shutil
from pathlib import Path

import pytest
from test_train import tiny

from sqdf_fast import compare, export, sample
from sqdf_fast.bbo import compare as bbo_compare
from sqdf_fast.bbo import loop
from sqdf_fast.train import main, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    cfg = tiny(tmp_path_factory.mktemp("finished"), steps=2, log_to="none")
    run(cfg)
    return Path(cfg.out)


def exit_status(call, capsys) -> tuple[int, str]:
    """(exit status, the one stderr line) of a command that stops with an error."""
    with pytest.raises(SystemExit) as err:
        call()
    stderr = capsys.readouterr().err.strip().splitlines()   # argparse's errors come after its usage lines
    errors = [line for line in stderr if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in "\n".join(stderr), stderr
    return err.value.code, errors[0]


def test_usage_errors_exit_2_and_run_errors_exit_1(finished, tmp_path, capsys):
    out = str(tmp_path / "run")
    cases = [
        # usage: bad options or values, found before any work
        (lambda: main(["--eta", "1.5", "--out", out]), 2, "eta=1.5: must lie in (0, 1]"),
        (lambda: main(["--steps", "many"]), 2, "argument --steps: invalid int value"),
        (lambda: main(["--log-to", "mlflow", "--out", out]), 2, "log_to='mlflow'"),
        (lambda: main(["--out", str(finished), "--steps", "3"]), 2, "already holds a run"),
        (lambda: main(["--resume", str(finished), "--alpha", "0.5"]), 2, "--alpha cannot change on resume"),
        (lambda: compare.main(["--out", str(tmp_path / "cmp"), "--methods", "nonsense", "--seeds", "1"]), 2,
         "method='nonsense'"),
        (lambda: loop.main(["--rounds", "0", "--out", out]), 2, "rounds=0: must be >= 1"),
        (lambda: bbo_compare.main(["--out", str(tmp_path / "bbo"), "--seeds", "0"]), 2, "--seeds 0: must be >= 1"),
        (lambda: export.main([str(tmp_path)]), 2, "no config.json there (not a run directory)"),
        (lambda: export.main([str(finished)]), 2, "export writes the LoRA of a Stable Diffusion UNet"),
        (lambda: sample.main(["--model", str(tmp_path), "--prompts", ";"]), 2, "prompts=';': no prompt in it"),
        # run errors: found while working
        (lambda: main([*tiny_argv(tmp_path / "shape"), "--reward", "rewards_for_tests:wrong_shape"]), 1,
         "of shape (20, 256); expected"),
        (lambda: main([*tiny_argv(tmp_path / "nan"), "--reward", "rewards_for_tests:always_nan",
                       "--max-nonfinite-steps", "1"]), 1, "1 non-finite steps in a row"),
    ]
    for call, code, message in cases:
        status, line = exit_status(call, capsys)
        assert (status, message in line) == (code, True), (line, code)
    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    (broken / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    status, line = exit_status(lambda: main(["--resume", str(broken), "--steps", "4"]), capsys)
    assert status == 1 and "state.pt does not match its checksum" in line


def tiny_argv(out: Path) -> list[str]:
    return ["--steps", "2", "--batch-size", "4", "--rollout-batch", "4", "--buffer-size", "8", "--sample-steps", "3",
            "--eval-per-class", "2", "--log-every", "1", "--no-progress", "--log-to", "none", "--out", str(out)]


@pytest.mark.parametrize("command, expected", [
    (main, ["--config FILE", "--resume DIR", "--out DIR", "--model DIR", "--reward-weights PATH",
            "--prompts NAME|FILE", "--log-to TRACKERS", "\ntask:\n", "\nsampling:\n", "\nlogging:\n", "Exit status"]),
    (loop.main, ["--config FILE", "--out DIR", "\nblack-box:\n", "Exit status"]),
    (compare.main, ["--out DIR", "--set KEY=VALUE", "--log-to TRACKERS", "Exit status"]),
    (bbo_compare.main, ["--out DIR", "--log-to TRACKERS", "Exit status"]),
    (export.main, ["RUN_DIR", "--out DIR", "Exit status"]),
    (sample.main, ["--model DIR", "--lora PATH", "--out FILE", "Exit status"]),
])
def test_help_is_grouped_and_names_files_and_folders(command, expected, capsys):
    with pytest.raises(SystemExit) as err:
        command(["--help"])
    assert err.value.code == 0
    text = capsys.readouterr().out
    for piece in expected:
        assert piece in text, piece
    assert text.startswith("usage: python -m sqdf_fast.")
