"""The trainer end to end on the digits task with tiny settings: outputs, learning, resume, guards, bad input."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqdf_fast import config
from sqdf_fast.train import SUMMARY_KEYS, main, run


def tiny(tmp_path, **overrides) -> config.TrainConfig:
    values = dict(out=str(tmp_path / "run"), steps=4, batch_size=8, rollout_batch=8, buffer_size=16,
                  sample_steps=5, eval_per_class=2, log_every=2, checkpoint_every=2, progress=False)
    values.update(overrides)
    cfg = config.TrainConfig(**values)
    config.validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[config.TrainConfig, dict]:
    """One tiny 4-step run, shared by the tests that only read it (or corrupt a copy of it)."""
    cfg = tiny(tmp_path_factory.mktemp("finished"))
    return cfg, run(cfg)


def test_run_directory_contract(finished):
    cfg, summary = finished
    out = Path(cfg.out)
    keys = tuple(json.loads((out / "summary.json").read_text()))
    assert keys[:len(SUMMARY_KEYS)] == SUMMARY_KEYS   # then the digits task's target metrics (tasks/digits.py)
    assert set(keys[len(SUMMARY_KEYS):]) == {f"{name}_{when}" for when in ("base", "final") for name in
                                             ("fd_to_target", "dist_to_target", "target_ess", "target_reward")}
    assert summary["steps"] == 4
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert all(k in rows[1] for k in ("reward", "kl_term", "diversity", "nonfinite_steps"))
    assert [r["step"] for r in rows if "eval_fd" in r] == [0, 4]   # base and final evaluations
    assert [r["step"] for r in rows if "eval_path_kl" in r] == [0, 4]
    for name in ("samples_base.png", "samples_final.png", "curves.png", "checkpoint/adapter.safetensors",
                 "checkpoint/state.pt"):
        assert (out / name).is_file(), name
    assert summary["path_kl_final"] > 0   # the policy moved away from the base


def test_resume_equals_uninterrupted(tmp_path):
    straight = tiny(tmp_path / "a", log_every=1)
    run(straight)
    interrupted = tiny(tmp_path / "b", steps=3, log_every=1)   # stops between two rollouts (replay_ratio 2)
    run(interrupted)
    with pytest.raises(SystemExit):   # the same out again without --resume refuses to overwrite
        main(["--config", str(tmp_path / "b" / "run" / "config.json")])
    resumed, resume_dir = config.parse(["--resume", interrupted.out, "--steps", "4"])
    run(resumed, resume_dir)
    a = load_file(str(tmp_path / "a/run/checkpoint/adapter.safetensors"))
    b = load_file(str(tmp_path / "b/run/checkpoint/adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    summary_a = json.loads((tmp_path / "a/run/summary.json").read_text())
    summary_b = json.loads((tmp_path / "b/run/summary.json").read_text())
    for key in ("reward_final", "diversity_final", "fd_final", "path_kl_final"):
        assert summary_a[key] == summary_b[key], key
    rows_a = [json.loads(l) for l in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(l) for l in (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    # b's own final evaluation at step 3 came after its checkpoint, so the resume dropped it; the resume recorded
    # what it changed, in metrics.jsonl and config.json
    assert [r for r in rows_b if "resumed_with" in r] == [{"step": 3, "resumed_with": {"steps": [3, 4]}}]
    assert strip(rows_a) == [r for r in strip(rows_b) if "resumed_with" not in r]
    assert json.loads((tmp_path / "b/run/config.json").read_text())["steps"] == 4


def test_resume_missing_or_corrupt_checkpoint(tmp_path, capsys, finished):
    out = tmp_path / "run"
    shutil.copytree(finished[0].out, out)   # a finished run with its checkpoint
    state = out / "checkpoint" / "state.pt"
    state.write_bytes(b"not a checkpoint")
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SystemExit) as err:
        main(["--resume", str(out), "--steps", "6"])
    assert "state.pt does not match its checksum" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before   # nothing overwritten
    with pytest.raises(SystemExit) as err:
        main(["--resume", str(tmp_path / "nowhere")])
    assert "resume" in str(err.value)


@pytest.mark.parametrize("left", ["checkpoint.prev", "metrics.jsonl", "config.json"])
def test_a_folder_holding_any_part_of_a_run_is_refused_without_resume(tmp_path, finished, left):
    """A run killed during the checkpoint swap leaves only checkpoint.prev/, its only checkpoint: a new run in that
    folder must not overwrite config.json and metrics.jsonl or delete it."""
    out = tmp_path / "run"
    out.mkdir()
    source = Path(finished[0].out) / ("checkpoint" if left == "checkpoint.prev" else left)
    (shutil.copytree if source.is_dir() else shutil.copyfile)(source, out / left)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as err:
        main(["--out", str(out), "--steps", "2"])
    assert f"already holds a run ({left}): " in str(err.value)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_nonfinite_reward_skips_steps_then_stops(tmp_path):
    cfg = tiny(tmp_path, steps=6, log_every=1, max_nonfinite_steps=3, reward="rewards_for_tests:always_nan")
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows if "nonfinite_steps" in r] == [1, 2]
    # the checkpoint written at step 2 holds the untouched (zero-initialised) adapter, not NaNs
    adapter = load_file(str(tmp_path / "run" / "checkpoint" / "adapter.safetensors"))
    assert all(torch.isfinite(v).all() for v in adapter.values())
    assert all(not v.any() for k, v in adapter.items() if "lora_B" in k)


def test_nonfinite_step_leaves_adapter_and_optimizer_untouched(tmp_path):
    from sqdf_fast.train import guarded_step, make_optimizer
    p = torch.nn.Parameter(torch.ones(3))
    cfg = tiny(tmp_path)
    optimizer = make_optimizer([p], cfg, torch.device("cpu"))
    p.grad = torch.full((3,), float("nan"))
    guarded_step(optimizer, torch.tensor(False))
    assert torch.equal(p.detach(), torch.ones(3))
    assert float(optimizer.state[p]["step"]) == 0 and not optimizer.state[p]["exp_avg"].any()
    p.grad = torch.ones(3)
    guarded_step(optimizer, torch.tensor(True))
    assert (p.detach() < 1).all() and float(optimizer.state[p]["step"]) == 1


@pytest.mark.parametrize("args, name", [
    (["--gamma", "0"], "gamma"), (["--gamma", "1.5"], "gamma"), (["--alpha", "-1"], "alpha"),
    (["--eta", "0"], "eta"), (["--buffer-size", "4", "--batch-size", "8"], "buffer_size"),
    (["--task", "nonesuch"], "task"), (["--model", "/no/such/folder"], "model"),
    (["--grad-accum", "3"], "grad_accum"), (["--device", "tpu"], "device"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, name):
    with pytest.raises(SystemExit) as err:
        config.parse(args + ["--out", str(tmp_path / "run")])
    message = str(err.value)
    assert message.startswith(f"error: {name}=") and "\n" not in message
    assert not (tmp_path / "run").exists()


def test_unknown_method_and_bad_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        config.parse(["--method", "ppo"])
    assert "method" in capsys.readouterr().err
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"gamma": 0.5, "not_a_field": 1}))
    with pytest.raises(SystemExit) as err:
        config.parse(["--config", str(bad)])
    assert "not_a_field" in str(err.value)


def test_model_folder_missing_weights(tmp_path):
    with pytest.raises(SystemExit) as err:
        main(["--model", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"])
    assert "base_unet.safetensors" in str(err.value)


def test_config_file_and_cli_precedence(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"gamma": 0.5, "alpha": 0.1}))
    cfg, resume = config.parse(["--config", str(file), "--alpha", "0.3", "--no-buffer"])
    assert (cfg.gamma, cfg.alpha, cfg.buffer, resume) == (0.5, 0.3, False, None)


def test_task_and_method_defaults_yield_to_explicit_options():
    """dataclass < the task's CONFIG_DEFAULTS < its METHOD_DEFAULTS for the chosen method < config file < CLI."""
    assert config.parse(["--method", "draft-kl"])[0].alpha == 0.035   # digits' DRaFT+KL alpha (sum over T steps)
    assert config.parse([])[0].alpha == 2.0
    gmm = config.parse(["--task", "gmm2d", "--method", "draft-kl"])[0]
    assert (gmm.alpha, gmm.target_alpha, gmm.sample_steps) == (0.0175, 1.0, 50)
    assert config.parse(["--task", "gmm2d", "--method", "draft-kl", "--alpha", "0.5"])[0].alpha == 0.5
    assert config.parse(["--task", "gmm2d"])[0].target_alpha is None   # SQDF's target follows its own alpha
    assert config.parse(["--task", "gmm2d", "--target-alpha", "0.5"])[0].target_alpha == 0.5   # a float, not "0.5"


def test_short_run_raises_reward(tmp_path):
    """A short SQDF run on the shipped digits model makes its samples (same evaluation seeds) bolder."""
    cfg = tiny(tmp_path, steps=12, batch_size=16, rollout_batch=16, buffer_size=64, sample_steps=10,
               eval_per_class=8, log_every=6, checkpoint_every=12, lr=5e-3)
    summary = run(cfg)
    assert summary["reward_final"] > summary["reward_base"] + 0.2, summary
