"""bench/gpu_suite.sh --cpu-smoke end to end: every part of the GPU suite runs on this CPU with tiny sizes, through the
same script, staging and command lines a GPU run uses, so that it works the first time it meets a GPU. Its `check`
part is the equal-work test of bench/sqdf_step.py (ours and the reference-style step give the same loss and policy
adapter gradient on tiny networks, float32), and its `sqdf_step` part runs both implementations in their own
worker processes at micro-batch 1 and 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"impl", "micro_batch", "samples_per_s", "peak_mib", "stages", "device_name", "torch", "diffusers",
            "command", "run_id", "rollout_s_per_traj", "flops", "bound_s", "saved_mib", "peak_rss_mib"}


def test_gpu_suite_cpu_smoke(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {k for k, v in summary["parts"].items() if v != "ok"} <= {"summary"}, summary["parts"]

    check = json.loads((tmp_path / "check.json").read_text())
    assert check["ok"] and check["n_grads"] > 0 and check["grad_max_abs"] > 0
    assert check["loss_abs_diff"] <= check["loss_rtol"] * abs(check["loss_reference"])
    assert check["grad_max_abs_diff"] <= check["grad_rtol"] * check["grad_max_abs"]

    rows = json.loads((tmp_path / "sqdf_step.json").read_text())
    assert {(r["impl"], r["micro_batch"]) for r in rows} == {(i, b) for i in ("ours", "reference") for b in (1, 2)}
    for r in rows:
        assert ROW_KEYS <= r.keys(), ROW_KEYS - r.keys()
        assert r["samples_per_s"] > 0 and r["peak_mib"] > 0 and r["rollout_s_per_traj"] > 0
        assert r["flops"]["policy"] > 0 and r["flops"]["consistency"] > 0 and r["bound_s_total"] > 0
        assert r["cap_gib"] == 0.01 and r["max_micro_batch_under_cap"] in (0, 1, 2, 4)
        assert "--preset tiny" in r["command"] and r["device"] == "cpu"
    by = {(r["impl"], r["micro_batch"]): r for r in rows}
    for b in (1, 2):   # three UNets against one: the reference holds more parameters
        assert by["ours", b]["param_mib"] < by["reference", b]["param_mib"]
        assert by["reference", b]["stages"]["prompt_encode"] > 0 == by["ours", b]["stages"]["prompt_encode"]
    assert summary["comparison"] and summary["unet_flop_rate"]
    for name in ("kernels.json", "rollout.json", "tests.txt", "summary.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "ours vs reference-style SQDF step" in "\n".join(done.stdout.splitlines()[-30:])   # the table, last
