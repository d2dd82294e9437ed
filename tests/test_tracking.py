"""--log-to (sqdf_fast.tracking): TensorBoard events read back with TensorBoard's own reader, wandb's offline run
folder, resume, results unchanged by tracking, and a clear line when a tracker's package is missing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train import tiny

from sqdf_fast import config, tracking
from sqdf_fast.train import main, run

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN_TAGS = {"train/reward", "train/kl_term", "train/loss", "train/diversity", "train/grad_norm", "train/reward_q",
              "train/nonfinite_steps", "adapter/update_norm_total"}
EVAL_TAGS = {"eval/reward", "eval/diversity", "eval/fd", "eval/path_kl"}


def events(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0,
                                                                "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps(items) -> list[int]:
    return [item.step for item in items]


def run_files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.relative_to(out).parts[0] not in ("tensorboard", "wandb", "checkpoint")}


def test_tensorboard_events_hold_the_curves_grids_config_and_updates(tmp_path):
    pytest.importorskip("tensorboard")
    tracked = tiny(tmp_path / "tb", log_to="tensorboard", eval_every=2, steps=3, log_every=1)
    summary = run(tracked)
    out = Path(tracked.out)
    log = events(out / "tensorboard")
    tags = log.Tags()
    assert TRAIN_TAGS | EVAL_TAGS <= set(tags["scalars"])
    assert steps(log.Scalars("train/reward")) == [1, 2, 3]
    assert steps(log.Scalars("eval/fd")) == [0, 2, 3]                 # base, eval_every, final
    assert tags["images"] == ["eval/samples"] and steps(log.Images("eval/samples")) == [0, 2, 3]
    assert tags["histograms"] == ["adapter/update_norm"] and steps(log.Histograms("adapter/update_norm")) == [1, 2, 3]
    assert {"config/text_summary", "eval/samples/caption/text_summary"} <= set(tags["tensors"])
    caption = log.Tensors("eval/samples/caption/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "conditions: class 0; class 1;" in caption
    config_text = log.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"log_to": "tensorboard"' in config_text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in log.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows if "loss" in r])
    assert log.Scalars("eval/reward")[-1].value == pytest.approx(summary["reward_final"])

    # the same run without a tracker: the same results and the same files (the trackers draw no random number)
    plain = tiny(tmp_path / "none", log_to="none", eval_every=2, steps=3, log_every=1)
    assert {k: v for k, v in run(plain).items() if k != "wall_s"} == {k: v for k, v in summary.items()
                                                                       if k != "wall_s"}
    assert not (Path(plain.out) / "tensorboard").exists()
    a, b = load_file(str(out / "checkpoint/adapter.safetensors")), load_file(str(Path(plain.out) /
                                                                                   "checkpoint/adapter.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    strip = lambda files: {k: v for k, v in files.items() if k not in ("config.json", "metrics.jsonl")}  # noqa: E731
    assert strip(run_files(out)).keys() == strip(run_files(Path(plain.out))).keys()

    # a resume appends to the same folder: the curves continue
    main(["--resume", str(out), "--steps", "5"])
    log = events(out / "tensorboard")
    assert steps(log.Scalars("train/reward")) == [1, 2, 3, 4, 5]
    assert steps(log.Images("eval/samples"))[-1] == 5


def test_wandb_offline_writes_its_run_folder_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install 'sqdf_fast[wandb]'), not in the test extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny(tmp_path, log_to="wandb", steps=2)
    run(cfg)
    out = Path(cfg.out)
    run_id = (out / tracking.WANDB_ID_FILE).read_text().strip()
    folders = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1 and (folders[0] / f"run-{run_id}.wandb").stat().st_size > 0
    assert not (out / "tensorboard").exists()
    main(["--resume", str(out), "--steps", "4"])
    assert (out / tracking.WANDB_ID_FILE).read_text().strip() == run_id   # the same wandb run continues
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_log_to_choices_and_a_missing_package_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)   # as if not installed: find_spec gives None
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert tracking.resolve("auto") == [] and tracking.resolve("none") == []
    for log_to, message in (("wandb", "the wandb package is not installed: pip install wandb (or the project's "
                                      "extra, pip install 'sqdf_fast[wandb]')"),
                            ("tensorboard,wandb", "the tensorboard package is not installed"),
                            ("mlflow", "expected a comma-separated list of auto, none, tensorboard, wandb"),
                            ("none,tensorboard", "auto and none stand alone")):
        with pytest.raises(ValueError, match=f"log_to='{log_to}': ") as err:
            config.validate(config.TrainConfig(log_to=log_to))
        assert message in str(err.value)
    assert isinstance(tracking.open_tracker("auto", Path("unused"), {}), tracking.Tracker)


def test_neither_tracker_is_needed_to_import_or_run(tmp_path):
    """With tensorboard and wandb unimportable, the package imports, the default config resolves to no tracker and
    asking for one is one error line (exit 2)."""
    script = ("import sys; sys.modules['tensorboard'] = sys.modules['wandb'] = None; "
              "import sqdf_fast.train, sqdf_fast.compare, sqdf_fast.bbo, sqdf_fast.info; "
              "from sqdf_fast import config, tracking; "
              "assert tracking.resolve(config.parse([])[0].log_to) == []; print('ok', flush=True); "
              "sqdf_fast.train.main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", script, "--log-to", "tensorboard", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.strip() == "ok", result.stderr
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: log_to='tensorboard': the tensorboard package is not installed: pip install tensorboard (or the "
        "project's extra, pip install 'sqdf_fast[tensorboard]')"]


def test_compare_logs_one_tracker_run_per_method_and_seed(tmp_path):
    pytest.importorskip("tensorboard")
    from sqdf_fast import compare
    out = tmp_path / "cmp"
    compare.main(["--task", "digits", "--methods", "sqdf,draft", "--seeds", "1", "--out", str(out),
                  "--log-to", "tensorboard", "--set", "steps=1", "--set", "batch_size=4", "--set", "eval_per_class=2",
                  "--set", "sample_steps=3", "--set", "rollout_batch=4", "--set", "buffer_size=8",
                  "--set", "log_every=1"])
    for label in ("sqdf", "draft"):
        run_dir = out / "runs" / f"{label}-seed0"
        assert json.loads((run_dir / "config.json").read_text())["log_group"] == "cmp"
        assert steps(events(run_dir / "tensorboard").Scalars("eval/reward")) == [0, 1]
    shutil.rmtree(out)
