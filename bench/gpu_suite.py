"""Everything a GPU can tell us about sqdf_fast, in one prepared command; `bench/gpu_suite.sh` runs it.

    bash bench/gpu_suite.sh [--wheels DIR] [--out DIR] [--budget-s 450] [--only PART,...] [--cpu-smoke]

Parts, in this order, each in its own time box (seconds; the boxes are sized for an H100/H200 so that the whole,
start-up included, ends within 8 minutes; a part that overruns is stopped and marked, and the rest still runs):

    env         python, torch, triton, diffusers versions; the GPU; the backend of each op (sqdf_fast.info)
    check       bench/sqdf_step.py --check on the device: ours and the reference-style step give the same loss and
                adapter gradient (tiny networks, float32; Triton kernels on CUDA)
    sqdf_step   bench/sqdf_step.py --preset sd15 at micro-batch 1, 4, 8 for ours and the reference-style step, then
                the largest micro-batch of each within 24 GiB (torch.cuda.set_per_process_memory_fraction); again
                with --attention xformers when xformers imports
    cuda_tests  pytest on the op, Triton-launcher and CUDA-graph tests (their CUDA cases run on a GPU)
    kernels     bench/kernels.py --device cuda at B = 64 and the large shape 1024x4x128x128 (no torch.compile peer)
    rollout     bench/rollout.py on sd-random at batch 1, 8 and 32 with the LoRA-update check (no compile peer);
                again with --attention xformers when xformers imports
    summary     one table, printed last: ours against the reference-style step (samples/s, peak memory, the targets),
                the UNet forward+backward FLOP rate against the measured bfloat16 matmul, the wall-clock estimate of
                the paper's 2000-step aesthetic run, the kernels' and the rollout's headline figures

Everything is written under --out (default bench/results/gpu-suite-<time>): one JSON per part that makes one
(check.json, sqdf_step.json, kernels.json, rollout.json), tests.txt (pytest's output), summary.json and summary.txt.
Nothing is appended to the files under bench/results/ (copy the rows there with their command when committing).

`--cpu-smoke` runs the same parts on this CPU with tiny sizes (the `tiny` preset, the tiny SD pipeline; for the CUDA
tests only the pytest command's interpreter and files are checked), end to end in about 20 s: tests/test_gpu_suite.py
runs it, so that the script works the first time it meets a GPU. The bench parts run inside this one process (their
`main(argv)`, time-boxed by SIGALRM); pytest and bench/sqdf_step.py's per-implementation workers are subprocesses.

The lent GPU machines have Python 3.12, torch 2.11 and triton 3.6 but no diffusers: give the wheels of what is
missing with --wheels (prepared on a machine with network access, e.g. `pip download --no-deps --only-binary=:all:
--python-version 3.12 --platform manylinux2014_x86_64 -d wheels diffusers==0.42.1 importlib_metadata`);
bench/gpu_suite.sh installs them into a target folder on PYTHONPATH and runs this checkout's sqdf_fast from a staged
copy (sqdf_fast/ with kernels/ as sqdf_fast/kernels), so nothing needs building or installing there.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("env", "check", "sqdf_step", "cuda_tests", "kernels", "rollout", "summary")
# seconds per part on an H100/H200 (start-up and compilation included); the smoke run uses SMOKE_BOXES
BOXES = {"env": 30, "check": 60, "sqdf_step": 210, "cuda_tests": 120, "kernels": 90, "rollout": 120, "summary": 10}
SMOKE_BOXES = {"env": 30, "check": 60, "sqdf_step": 120, "cuda_tests": 60, "kernels": 30, "rollout": 60,
               "summary": 10}
CUDA_TEST_FILES = ("tests/test_ops.py", "tests/test_triton_launchers.py", "tests/test_graphs.py",
                   "tests/test_op_guided_step.py", "tests/test_op_x0_estimate.py", "tests/test_op_sqdf_loss.py")
# the authors' aesthetic SQDF run (their T2I/aesthetic.sh): 2 GPUs, each collecting and training train_batch_size 4
# x gradient accumulation 8 = 32 trajectories and 32 samples per optimizer step, 2000 steps
PAPER_RUN = {"steps": 2000, "gpus": 2, "samples_per_gpu_step": 32, "trajectories_per_gpu_step": 32,
             "micro_batch": 4}
TARGETS = {"cpu": {"speedup": 1.5, "memory_ratio": 0.5}, "cuda": {"speedup": 2.5, "memory_ratio": 0.4}}


class PartTimeout(Exception):
    pass


def load_bench(name: str):
    """bench/<name>.py as the module bench_<name> (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def time_box(seconds: float):
    """Raise PartTimeout in this (the main) thread after `seconds`."""
    def expire(signum, frame):
        raise PartTimeout(f"stopped after its {seconds:.0f} s box")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


# ---- the parts: each returns a dict (its headline) and writes its files ------------------------------------------
def part_env(ctx: dict) -> dict:
    from sqdf_fast import info
    lines = info.report()
    print("\n".join(lines))
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": info.version("triton"),
           "diffusers": info.version("diffusers"), "transformers": info.version("transformers"),
           "peft": info.version("peft"), "cuda_available": torch.cuda.is_available(),
           "device": info.device_name(torch.device(ctx["device"])), "xformers": xformers_available(),
           "report": lines}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}")
    return env


def part_check(ctx: dict) -> dict:
    result = load_bench("sqdf_step").equal_work(ctx["device"])
    (ctx["out"] / "check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    if not result["ok"]:
        raise RuntimeError(f"equal-work check failed: {result}")
    return {k: result[k] for k in ("ok", "loss_abs_diff", "grad_max_abs_diff", "grad_max_abs")}


def part_sqdf_step(ctx: dict) -> dict:
    bench = load_bench("sqdf_step")
    out = ctx["out"] / "sqdf_step.json"
    if ctx["smoke"]:
        argv = ["--preset", "tiny", "--warmup", "0", "--cap-gib", "0.01", "--cap-ladder", "1,2,4"]
    else:
        argv = ["--preset", "sd15", "--micro-batches", "1,4,8", "--cap-gib", "24", "--ours-args=--cuda-graphs"]
    argv += ["--no-append", "--label", "gpu_suite" + (" cpu-smoke" if ctx["smoke"] else "")]
    rows = bench.main(argv + ["--json", str(out)])
    if xformers_available() and not ctx["smoke"]:
        rows += bench.main(argv + ["--attention", "xformers", "--json", str(out.with_name("sqdf_step_xformers.json"))])
    else:
        print("xformers does not import: the xformers attention runs are skipped")
    out.write_text(json.dumps(rows, indent=1))
    return {"rows": len(rows)}


def part_cuda_tests(ctx: dict) -> dict:
    missing = [f for f in CUDA_TEST_FILES if not (ROOT / f).is_file()]
    if missing:
        raise RuntimeError(f"no such test file: {', '.join(missing)}")
    # run from the output folder, not the checkout: the current directory comes first on sys.path, and the
    # checkout's sqdf_fast/ has no kernels/ (the staged copy on PYTHONPATH has)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
            "--rootdir", str(ROOT)]
    # no CUDA here (the suite's own tests run in CI): the interpreter, flags and files are what the smoke checks
    argv += ["--version"] if ctx["smoke"] else [str(ROOT / f) for f in CUDA_TEST_FILES]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(argv, cwd=ctx["out"], env=env, capture_output=True, text=True, timeout=ctx["box"])
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        (ctx["out"] / "tests.txt").write_text(" ".join(argv) + "\n" + output)
        raise PartTimeout(f"pytest stopped after its {ctx['box']:.0f} s box") from err
    (ctx["out"] / "tests.txt").write_text(" ".join(argv) + "\n" + output)
    last = [line for line in output.strip().splitlines() if line.strip()][-1:] or [""]
    print(output[-3000:])
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last[0])}
    if code != 0:
        raise RuntimeError(f"pytest exited with {code}: {last[0]}")
    return {"result": last[0], **counts}


def part_kernels(ctx: dict) -> dict:
    out = ctx["out"] / "kernels.json"
    if ctx["smoke"]:
        argv = ["--device", "cpu", "--batches", "1", "--ops", "policy_step", "--modes", "full", "--repeat", "2",
                "--warmup", "1", "--copy-mib", "8"]
    else:
        argv = ["--device", "cuda", "--batches", "64", "--large", "1024x4x128x128", "--repeat", "50"]
    rows = load_bench("kernels").main(argv + ["--skip-compile", "--no-append", "--json", str(out)])
    largest = max(tuple(r["shape"]) for r in rows)
    head = {f"{r['op']}/{r['mode']}/{r['dtype']}": r.get("speedup_vs_eager") for r in rows
            if r["impl"] == "fused" and tuple(r["shape"]) == largest}
    return {"shape": list(largest), "fused_vs_eager": head}


def part_rollout(ctx: dict) -> dict:
    out = ctx["out"] / "rollout.json"
    if ctx["smoke"]:
        argv = ["--tiny", "--device", "cpu", "--batch-sizes", "1,2", "--steps", "2"]
    else:
        argv = ["--batch-sizes", "1,8,32"]
    argv += ["--repeat", "1", "--warmup", "1", "--no-compile"]
    bench = load_bench("rollout")
    rows = bench.main(argv + ["--json", str(out)])
    if xformers_available() and not ctx["smoke"]:
        rows += bench.main(argv + ["--attention", "xformers", "--json", str(out.with_name("rollout_x.json"))])
        out.write_text(json.dumps(rows, indent=1))
    recaptures = [r["recaptures"] for r in rows if r.get("recaptures") is not None]
    diffs = [r["max_abs_diff"] for r in rows if r.get("max_abs_diff") is not None]
    return {"rows": len(rows), "recaptures": max(recaptures, default=0), "max_abs_diff": max(diffs, default=None)}


def part_summary(ctx: dict) -> dict:
    summary = summarize(ctx["out"], ctx["device"], ctx["results"])
    (ctx["out"] / "summary.json").write_text(json.dumps(summary, indent=1))
    text = summary_text(summary, ctx["results"])
    (ctx["out"] / "summary.txt").write_text(text + "\n")
    ctx["summary_text"] = text
    return {"targets_met": summary.get("targets_met")}


def summarize(out: Path, device: str, results: dict) -> dict:
    """The headline figures from the parts' files."""
    summary: dict = {"device": device, "parts": {k: v["status"] for k, v in results.items()}}
    path = out / "sqdf_step.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if r.get("attention", "sdpa") == "sdpa"]
    targets = TARGETS["cuda" if device.startswith("cuda") else "cpu"]
    comparisons = []
    for mb in sorted({r["micro_batch"] for r in rows}):
        by_impl = {r["impl"]: r for r in rows if r["micro_batch"] == mb}
        ours, ref = by_impl.get("ours"), by_impl.get("reference")
        if not (ours and ref):
            continue
        speedup, memory = ours["samples_per_s"] / ref["samples_per_s"], ours["peak_mib"] / ref["peak_mib"]
        comparisons.append({"micro_batch": mb, "ours_samples_per_s": ours["samples_per_s"],
                            "reference_samples_per_s": ref["samples_per_s"], "speedup": speedup,
                            "ours_peak_mib": ours["peak_mib"], "reference_peak_mib": ref["peak_mib"],
                            "memory_ratio": memory, "meets": speedup >= targets["speedup"]
                            and memory <= targets["memory_ratio"]})
    summary["comparison"], summary["targets"] = comparisons, targets
    summary["targets_met"] = bool(comparisons) and all(c["meets"] for c in comparisons)
    caps = {r["impl"]: r.get("max_micro_batch_under_cap") for r in rows if r.get("cap_gib")}
    if caps:
        summary["cap"] = {"cap_gib": rows[0].get("cap_gib"), "max_micro_batch": caps,
                          "ours_at_least_4": (caps.get("ours") or 0) >= 4}
    rates = {}
    for r in rows:
        seconds = r["stages"].get("policy")
        if r.get("flops", {}).get("policy") and seconds:
            rates[f"{r['impl']}@{r['micro_batch']}"] = {
                "unet_fwd_bwd_tflops": r["flops"]["policy"] / seconds / 1e12,
                "matmul_tflops": r["matmul_tflops"],
                "fraction_of_matmul": r["flops"]["policy"] / seconds / 1e12 / r["matmul_tflops"]}
    summary["unet_flop_rate"] = rates
    estimates = {}
    for r in rows:
        if r["micro_batch"] == PAPER_RUN["micro_batch"]:
            per_step = (PAPER_RUN["trajectories_per_gpu_step"] * r["rollout_s_per_traj"]
                        + PAPER_RUN["samples_per_gpu_step"] / r["samples_per_s"])
            estimates[r["impl"]] = {"hours_on_2_gpus": PAPER_RUN["steps"] * per_step / 3600,
                                    "hours_on_1_gpu": PAPER_RUN["gpus"] * PAPER_RUN["steps"] * per_step / 3600,
                                    "s_per_step_per_gpu": per_step}
    summary["paper_run_estimate"] = {"run": PAPER_RUN, **estimates}
    for name in ("kernels", "rollout", "cuda_tests", "check", "env"):
        if name in results and results[name].get("result") is not None:
            summary[name] = results[name]["result"]
    return summary


def summary_text(summary: dict, results: dict) -> str:
    lines = [f"gpu_suite summary ({summary['device']})", f"{'part':12s} {'status':10s} {'seconds':>8s}  headline"]
    for name, r in results.items():
        if name == "summary":
            continue
        headline = r.get("error") or json.dumps(r.get("result"), default=str)
        lines.append(f"{name:12s} {r['status']:10s} {r['seconds']:8.1f}  {headline[:150]}")
    t = summary["targets"]
    lines.append(f"\nours vs reference-style SQDF step (targets: >= {t['speedup']}x samples/s, <= "
                 f"{100 * t['memory_ratio']:.0f}% peak memory):")
    lines.append(f"{'micro-batch':>11s} {'ours/s':>9s} {'ref/s':>9s} {'speedup':>8s} {'ours MiB':>9s} {'ref MiB':>9s} "
                 f"{'memory':>7s} {'meets':>6s}")
    for c in summary["comparison"]:
        lines.append(f"{c['micro_batch']:>11d} {c['ours_samples_per_s']:>9.3g} {c['reference_samples_per_s']:>9.3g} "
                     f"{c['speedup']:>7.2f}x {c['ours_peak_mib']:>9.0f} {c['reference_peak_mib']:>9.0f} "
                     f"{100 * c['memory_ratio']:>6.0f}% {str(c['meets']):>6s}")
    if "cap" in summary:
        lines.append(f"largest micro-batch within {summary['cap']['cap_gib']} GiB: {summary['cap']['max_micro_batch']}")
    for key, v in summary["unet_flop_rate"].items():
        lines.append(f"UNet forward+backward {key}: {v['unet_fwd_bwd_tflops']:.3g} TFLOP/s = "
                     f"{100 * v['fraction_of_matmul']:.0f}% of the measured matmul ({v['matmul_tflops']:.3g})")
    for impl, e in summary["paper_run_estimate"].items():
        if impl != "run":
            lines.append(f"paper's 2000-step aesthetic run, {impl}: {e['hours_on_2_gpus']:.1f} h on 2 GPUs "
                         f"({e['hours_on_1_gpu']:.1f} h on one)")
    return "\n".join(lines)


RUNNERS = {"env": part_env, "check": part_check, "sqdf_step": part_sqdf_step, "cuda_tests": part_cuda_tests,
           "kernels": part_kernels, "rollout": part_rollout, "summary": part_summary}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--cpu-smoke", action="store_true", help="the same parts on this CPU with tiny sizes")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting parts after this many seconds")
    p.add_argument("--only", help=f"comma-separated parts of {', '.join(PARTS)} (summary always runs)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: CUDA is not available here (use --cpu-smoke for the CPU smoke run)")
    out = args.out or ROOT / "bench" / "results" / f"gpu-suite-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    parts = [p for p in PARTS if args.only is None or p in args.only.split(",") or p == "summary"]
    boxes = SMOKE_BOXES if smoke else BOXES
    ctx = {"out": out, "smoke": smoke, "device": "cpu" if smoke else "cuda", "results": {}}
    if smoke:   # tiny sizes: intra-op threads would only contend (workers and pytest inherit the variable)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    for name in parts:
        left = args.budget_s - (time.perf_counter() - start) - (boxes["summary"] if name != "summary" else 0)
        entry = ctx["results"][name] = {"status": "skipped", "seconds": 0.0, "result": None}
        if left < 5:
            entry["error"] = "no time left in the budget"
            continue
        ctx["box"] = min(boxes[name], left)
        print(f"\n==== {name} (box {ctx['box']:.0f} s) ====", flush=True)
        t0 = time.perf_counter()
        try:
            with time_box(ctx["box"] + (15 if name == "cuda_tests" else 0)):
                entry["result"] = RUNNERS[name](ctx)
            entry["status"] = "ok"
        except PartTimeout as err:
            entry.update(status="timeout", error=str(err))
        except Exception as err:   # noqa: BLE001 -- a failing part is reported; the others still run
            traceback.print_exc()
            entry.update(status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0][:300])
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"==== {name}: {entry['status']} in {entry['seconds']} s", flush=True)
    print("\n" + ctx.get("summary_text", "(no summary)"), flush=True)
    print(f"\nwritten to {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return ctx["results"]


if __name__ == "__main__":
    results = main()
    sys.exit(0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1)
