"""Reliability (README, "Reliability"): nothing a run writes is lost or misread, `--resume` changes only what it may
and records it, and every bad input ends in one clear line before any work, never in a traceback."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import tiny

from sqdf_fast import compare, export, files, sample
from sqdf_fast.train import main, run

TINY = ["--steps", "2", "--batch-size", "8", "--rollout-batch", "8", "--buffer-size", "16", "--sample-steps", "3",
        "--eval-per-class", "2", "--log-every", "1", "--checkpoint-every", "2", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny finished digits run (4 steps, checkpoints at 2 and 4), copied by the tests that change it."""
    cfg = tiny(tmp_path_factory.mktemp("finished"))
    run(cfg)
    return Path(cfg.out)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def resume_fails(out: Path, capsys, *extra) -> str:
    """Resume `out` expecting one error line and no file of the run touched; returns the line."""
    before = snapshot(out)
    line = exits_with_one_error_line(lambda: main(["--resume", str(out), *extra]), capsys)
    assert snapshot(out) == before
    return line


# ---- 1. nothing lost ---------------------------------------------------------------------------------------------
def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def killed(tmp):
        tmp.write_text("half of the new")
        raise KeyboardInterrupt   # the process dies before the rename

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(path, killed)
    assert path.read_text() == "old\n"
    files.write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and not (tmp_path / "metrics.jsonl.tmp").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "partial line", "changed", "missing"])
def test_a_damaged_metrics_file_is_refused_on_resume(finished, tmp_path, capsys, damage):
    out = copy_run(finished, tmp_path)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    if damage == "missing":
        metrics.unlink()
    else:
        metrics.write_text({"empty": "", "truncated": "".join(lines[:2]), "partial line": "".join(lines[:-3])
                            + lines[-3][:10], "changed": "".join(lines).replace('"step": 2', '"step": 3', 1)}[damage])
    message = resume_fails(out, capsys, "--steps", "6")
    expected = {"empty": "metrics.jsonl is truncated: it holds 0 complete row(s)", "truncated": "is truncated",
                "partial line": "is truncated", "changed": "differ from those the checkpoint",
                "missing": "no metrics.jsonl there"}[damage]
    assert expected in message


def test_rows_after_the_checkpoint_are_dropped_on_resume(finished, tmp_path):
    """A kill while a row was being appended after the last checkpoint leaves a partial last line: the resume keeps
    the rows the checkpoint counted and rewrites the file (atomically) without it."""
    out = copy_run(finished, tmp_path)
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss"')
    main(["--resume", str(out), "--steps", "5"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 5]   # log_every 2, and the last step


@pytest.mark.parametrize("name", ["adapter.safetensors", "state.pt"])
def test_a_flipped_byte_in_a_checkpoint_is_detected(finished, tmp_path, capsys, name):
    out = copy_run(finished, tmp_path)
    path = out / "checkpoint" / name
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01   # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))
    assert f"{name} does not match its checksum" in resume_fails(out, capsys, "--steps", "6")


def test_non_finite_values_are_written_as_null_and_counted(tmp_path, capsys):
    text, replaced = files.dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}
    assert replaced == ["a", "b[1]", "c.d"]
    # a reward that is NaN for half of the evaluation samples: counted, left out of the mean, the files strict JSON
    cfg = tiny(tmp_path, reward="rewards_for_tests:nan_at_evaluation")
    summary = run(cfg)
    assert summary["nonfinite_samples_base"] == summary["nonfinite_samples_final"] == 10   # of 20 (2 per class)
    assert math.isfinite(summary["reward_final"])
    assert "10 of 20 evaluation samples" in capsys.readouterr().err

    def refuse(constant):
        raise AssertionError(f"{constant} in a file the project wrote")

    for name in ("summary.json", "config.json"):
        json.loads((Path(cfg.out) / name).read_text(), parse_constant=refuse)
    for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


# ---- 2. --resume means exactly what it says -----------------------------------------------------------------------
def test_resume_applies_and_records_the_options_it_may_change(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    main(["--resume", str(out), "--steps", "6", "--lr", "0.01", "--log-every", "1"])
    saved = json.loads((out / "config.json").read_text())
    assert (saved["steps"], saved["lr"], saved["log_every"]) == (6, 0.01, 1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if "resumed_with" in r] == [
        {"step": 4, "resumed_with": {"steps": [4, 6], "lr": [0.001, 0.01], "log_every": [2, 1]}}]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 5, 6]
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [0.01]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    main(["--resume", str(out), "--steps", "7"])   # a plain later resume keeps the recorded lr
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [0.01]


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "0.5"], "--alpha cannot change on resume (the run has 2.0, given 0.5)"),
    (["--task", "gmm2d"], "--task cannot change on resume (the run has 'digits', given 'gmm2d')"),
    (["--out", "elsewhere"], "a resumed run continues in its own folder"),
])
def test_resume_refuses_the_options_it_may_not_change(finished, tmp_path, capsys, extra, message):
    out = copy_run(finished, tmp_path)
    assert message in resume_fails(out, capsys, "--steps", "6", *extra)


# ---- 3. bad input: one clear line, before any work -----------------------------------------------------------------
def config_file(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


TRAIN_CASES = {
    "wrong type: bool": (lambda t: ["--config", config_file(t, "c.json", b'{"buffer": "no"}')],
                         "buffer='no' must be true or false, got a JSON string"),
    "wrong type: number": (lambda t: ["--config", config_file(t, "c.json", b'{"lr": "0.1"}')],
                           "lr='0.1' must be a number, got a JSON string"),
    "wrong type: integer": (lambda t: ["--config", config_file(t, "c.json", b'{"lora_rank": 2.5}')],
                            "lora_rank=2.5 must be an integer, got a JSON number"),
    "a list": (lambda t: ["--config", config_file(t, "c.json", b'[1, 2]')],
               "expected a JSON object of option names and values, got a JSON array"),
    "not UTF-8": (lambda t: ["--config", config_file(t, "c.json", b'{"lr": "\xff\xfe"}')], "c.json is not UTF-8"),
    "not JSON": (lambda t: ["--config", config_file(t, "c.json", b'{"lr": 0.1')], "c.json is not valid JSON"),
    "eta 1.5": (lambda t: ["--eta", "1.5"], "eta=1.5: must lie in (0, 1]"),
    "eta inf": (lambda t: ["--eta", "inf"], "eta=inf: must be a finite number"),
    "alpha nan": (lambda t: ["--alpha", "nan"], "alpha=nan: must be a finite number"),
    "lr inf": (lambda t: ["--lr", "inf"], "lr=inf: must be a finite number"),
    "lora_alpha nan": (lambda t: ["--lora-alpha", "nan"], "lora_alpha=nan: must be a finite number"),
    "guidance inf": (lambda t: ["--guidance", "inf"], "guidance=inf: must be a finite number"),
    "out a file": (lambda t: ["--out", config_file(t, "a-file", b"")], "a-file': is a file, not a folder"),
    "task not a Task": (lambda t: ["--task", "rewards_for_tests:not_a_task"],
                        "the factory returned a dict, not a sqdf_fast.tasks.Task"),
    "reward not callable": (lambda t: ["--reward", "rewards_for_tests:not_callable"],
                            "reward='rewards_for_tests:not_callable' is a float, not a callable (images, cond)"),
    "reward shape": (lambda t: ["--reward", "rewards_for_tests:wrong_shape"], "of shape (20, 256); expected"),
    "reward 0-dim": (lambda t: ["--reward", "rewards_for_tests:zero_dim"], "of shape (); expected"),
    "reward list": (lambda t: ["--reward", "rewards_for_tests:a_list"], "returned a list; expected"),
    "reward integer": (lambda t: ["--reward", "rewards_for_tests:integer"], "returned a torch.int64 tensor"),
    "reward detached": (lambda t: ["--reward", "rewards_for_tests:detached"], "carries no gradient to the images"),
    "reward unknown": (lambda t: ["--reward", "nope"], "reward='nope': unknown reward"),
    "reward signature": (lambda t: ["--reward", "rewards_for_tests:not_a_task"],
                         "reward='rewards_for_tests:not_a_task' takes (cfg), but is called with (images, cond)"),
    "task signature": (lambda t: ["--task", "rewards_for_tests:image_mean"],
                       "task='rewards_for_tests:image_mean' takes (images, cond), but is called with (cfg)"),
    "out empty": (lambda t: ["--out", ""], "out='': must name a folder"),
    "seed too large": (lambda t: ["--seed", str(2 ** 64)], "seed=18446744073709551616: must lie in [0, 2**62)"),
    "option the task ignores": (lambda t: ["--resolution", "64"], "resolution=64: task 'digits' does not use it"),
    "bad choice": (lambda t: ["--method", "ppo"], "argument --method: invalid choice"),
    "not a number": (lambda t: ["--steps", "many"], "argument --steps: invalid int value"),
}


def exits_with_one_error_line(call, capsys) -> str:
    """`call()` must exit non-zero with exactly one line holding 'error:' (its message or argparse's) and no
    traceback; returns that line."""
    with pytest.raises(SystemExit) as err:
        call()
    captured = capsys.readouterr()
    code = err.value.code
    assert code not in (0, None)
    text = captured.err + (code if isinstance(code, str) else "")
    lines = [line for line in text.splitlines() if "error:" in line]
    assert len(lines) == 1, text
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_bad_train_command_lines_end_in_one_line(tmp_path, capsys, case):
    argv, message = TRAIN_CASES[case]
    line = exits_with_one_error_line(lambda: main([*TINY, "--out", str(tmp_path / "run"), *argv(tmp_path)]), capsys)
    assert message in line


def test_bad_input_exits_in_one_line_from_the_shell(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sqdf_fast.train", "--eta", "1.5", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2   # a usage error (sqdf_fast.cli)
    assert result.stderr.strip().splitlines() == ["error: eta=1.5: must lie in (0, 1] (at eta = 0 the policy is "
                                                  "deterministic and the KL divides by zero; above 1 the DDIM noise "
                                                  "exceeds the step's variance)"]


def test_other_commands_end_in_one_line(finished, tmp_path, capsys):
    line = exits_with_one_error_line(lambda: export.main([str(finished)]), capsys)
    assert "a run of task 'digits', whose model is a DigitsUNet; export writes the LoRA of a Stable Diffusion" in line
    model, lora = tmp_path / "model", tmp_path / "not-a-lora"
    model.mkdir()
    lora.mkdir()
    for argv, message in (
            (["--resolution", "12"], "--resolution 12: must be a positive multiple of 8"),
            (["--resolution", "0"], "--resolution 0: must be a positive multiple of 8"),
            (["--guidance", "nan"], "--guidance nan: must be a finite number >= 0"),
            (["--eta", "-1"], "--eta -1.0: must lie in [0, 1]"),
            (["--prompts", ";"], "prompts=';': no prompt in it"),
            (["--lora", str(lora)], "not a LoRA (a .safetensors file, or a folder holding"),
            (["--device", "tpu"], "--device tpu: must be auto, cpu, cuda or cuda:N")):
        line = exits_with_one_error_line(lambda: sample.main(["--model", str(model), *argv]), capsys)
        assert message in line, argv
    if not torch.cuda.is_available():
        line = exits_with_one_error_line(lambda: sample.main(["--model", str(model), "--device", "cuda"]), capsys)
        assert "CUDA is not available" in line
    line = exits_with_one_error_line(lambda: compare.main(["--out", str(tmp_path / "cmp"), "--methods", "sqdf",
                                                           "--seeds", "1", "--set", "steps=many"]), capsys)
    assert "--set: steps='many' must be an integer, got a JSON string" in line
    from sqdf_fast.bbo import compare as bbo_compare
    line = exits_with_one_error_line(lambda: bbo_compare.main(["--out", str(tmp_path / "bbo"), "--methods", ","]),
                                     capsys)
    assert "--methods ',': names no method" in line


def test_samples_that_are_not_images_run_to_the_end_without_a_grid(tmp_path, capsys, one_thread):
    cfg = tiny(tmp_path, task="rewards_for_tests:points_without_plot", eval_per_class=16, sample_steps=4)
    summary = run(cfg)
    assert summary["steps"] == 4
    assert "note: no samples_base.png: task 'gmm2d' has samples of shape (2,), not images" in capsys.readouterr().out
    assert not (Path(cfg.out) / "samples_final.png").exists() and (Path(cfg.out) / "summary.json").is_file()
