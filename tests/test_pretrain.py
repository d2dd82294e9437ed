"""`python -m sqdf_fast.pretrain` is seeded and reproducible, and writes what the digits task loads."""
import json
import os
import shutil

from sqdf_fast import config, pretrain
from sqdf_fast.tasks import digits

TINY = ["--classifier-steps", "20", "--base-steps", "8", "--cm-steps", "4", "--measure-samples", "16",
        "--sample-steps", "5"]


def test_pretrain_is_reproducible_stage_by_stage_and_loadable(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain.main(["--out", str(a), *TINY])
    # b retrains every stage once, in two calls and another order, each loading the others' weights (every stage
    # loads all four files): a's copies, marked as not rewritten (mtime 0). Each stage has its own seed, so each
    # reproduces a's bytes whatever ran before it in the process.
    b.mkdir()
    for file in digits.WEIGHT_FILES:
        shutil.copyfile(a / file, b / file)
        os.utime(b / file, ns=(0, 0))
    pretrain.main(["--out", str(b), "--stages", "evaluator,base", *TINY])
    pretrain.main(["--out", str(b), "--stages", "reward,consistency", *TINY])
    assert all((b / file).stat().st_mtime_ns > 0 for file in digits.WEIGHT_FILES)   # all four rewritten
    for file in digits.WEIGHT_FILES:
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    report = json.loads((a / "pretrain_report.json").read_text())
    assert set(pretrain.STAGES) <= set(report) and "x0_estimate_by_noise_level" in report["measurements"]
    task = digits.make_task(config.TrainConfig(model=str(a)))
    assert task.consistency is not None and (a / "pretrain_samples.png").is_file()
