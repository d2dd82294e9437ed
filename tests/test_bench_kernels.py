"""bench/kernels.py on a tiny CPU configuration, and bench/plot_kernels.py on its rows (a few seconds)."""
from __future__ import annotations

import json

import torch
from bench_scripts import load_bench

from sqdf_fast import ops

KEYS = {"op", "impl", "mode", "shape", "dtype", "ms", "min_ms", "repeats", "gbps", "bytes", "device", "backend",
        "torch", "triton", "timestamp", "command", "run_id", "pct_copy_bw", "copy_gbps"}


def test_bytes_moved_counts_each_tensor_once():
    kernels = load_bench("kernels")
    numel = 2 * 4 * 8 * 8
    # forward: x, eps, eps_ref, noise read, x_prev written; alpha_t, alpha_prev read, kl written (float32, (B,))
    assert kernels.bytes_moved("policy_step", "forward", (2, 4, 8, 8), torch.float32) == 5 * numel * 4 + 3 * 2 * 4
    assert kernels.bytes_moved("tweedie_x0", "backward", (2, 4, 8, 8), torch.bfloat16) == 3 * numel * 2 + 2 * 4
    full = kernels.bytes_moved("guided_policy_step", "full", (2, 4, 8, 8), torch.float32)
    assert full == sum(kernels.bytes_moved("guided_policy_step", m, (2, 4, 8, 8), torch.float32)
                       for m in ("forward", "backward"))


def test_kernels_bench_rows_and_plot(tmp_path, capsys):
    """bench/kernels.py's main (all its `__main__` block runs) in this process: a subprocess would spend most of
    its time importing torch again."""
    out = tmp_path / "rows.json"
    results = tmp_path / "appended.jsonl"
    argv = ["--device", "cpu", "--batches", "1",
            "--ops", "policy_step,tweedie_x0", "--modes", "forward,full", "--dtypes", "float32,bfloat16",
            "--repeat", "2", "--warmup", "1", "--skip-compile", "--copy-mib", "8", "--no-append",
            "--results", str(results), "--json", str(out)]
    with torch.random.fork_rng():  # main seeds the global generator
        returned = load_bench("kernels").main(argv)
    stdout = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert len(returned) == len(rows)  # the rows written are the rows returned
    assert not results.exists(), "--no-append must not write the results file"
    assert len(rows) == 2 * 2 * 2 * 2  # ops x modes x dtypes x impls
    backend = ops.backend_for("cpu")[0]
    for row in rows:
        assert KEYS <= row.keys(), KEYS - row.keys()
        assert row["ms"] > 0 and row["min_ms"] > 0 and row["min_ms"] <= row["ms"] and row["gbps"] > 0
        assert row["repeats"] == 2 and row["shape"] == [1, 4, 64, 64]
        assert row["backend"] == (backend if row["impl"] == "fused" else None)
        assert "bench/kernels.py" in row["command"] and "--skip-compile" in row["command"]
    assert {r["impl"] for r in rows} == {"fused", "eager"}
    assert {r["op"] for r in rows} == {"policy_step", "tweedie_x0"}
    assert {r["mode"] for r in rows} == {"forward", "full"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert len({r["run_id"] for r in rows}) == 1
    assert all(r["speedup_vs_eager"] > 0 for r in rows if r["impl"] == "fused")
    assert "vs eager" in stdout  # the printed table

    png = load_bench("plot_kernels").main(["--results", str(out), "--out", str(tmp_path / "kernels.png")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
