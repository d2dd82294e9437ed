"""bench/rollout.py end to end on the tiny SD pipeline on the CPU (a few seconds): rows, table, and that our sampler
and the diffusers-style loop produce the same latents (same generator, same noise)."""
from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rollout_bench_tiny(tmp_path, capsys):
    bench = load_bench("rollout")
    out = tmp_path / "rows.json"
    before = bench.RESULTS.read_text() if bench.RESULTS.exists() else None
    rows = bench.main(["--tiny", "--device", "cpu", "--batch-sizes", "1,2", "--steps", "2", "--repeat", "1",
                       "--no-compile", "--json", str(out)])
    assert (bench.RESULTS.read_text() if bench.RESULTS.exists() else None) == before   # no --results: not appended
    assert json.loads(out.read_text()) == rows
    assert {(r["impl"], r["phase"], r["batch"]) for r in rows} == {
        (impl, phase, batch) for impl in ("ours", "eager") for phase in ("initial", "after-lora") for batch in (1, 2)}
    for r in rows:
        assert r["images_per_s"] > 0 and r["device"] == "cpu" and r["task"] == "sd-tiny" and r["steps"] == 2
        assert r["max_abs_diff"] < 1e-4   # ours equals diffusers' DDIMScheduler loop up to float rounding
        assert r["recaptures"] in (None, 0)
    assert "images/s" in capsys.readouterr().out
