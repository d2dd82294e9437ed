"""Per-call cost of the public ops at small sizes, where Python overhead, not the kernel, sets the time.

    python bench/op_overhead.py [--label NAME] [--shapes 1x4x8x8,...] [--samples N] [--inner N] [--no-append]

Times `ops.policy_step` (on the backend `ops.backend_for("cpu")` names) against the same maths in eager PyTorch
(`eager_policy_step` of bench/kernels.py: what a user writes without our ops), float32 on the CPU, x and eps
requiring grad as in a training step, in two modes: `forward` and `full` (forward + torch.autograd.grad of both
outputs with fixed grad_outputs). Each sample times --inner back-to-back calls; ours and eager alternate sample by
sample so that other processes on the cores slow both alike. A row holds, in microseconds per call, the medians over
--samples samples (`ours_us`, `eager_us`, `ratio` = ours / eager: below 1, ours is cheaper); the median of the
ratios of adjacent samples (`paired_ratio`: robust to contention that comes and goes, since neighbours share it);
and the 10th percentiles (`*_p10_us`, `p10_ratio`: the cost without contention, on a shared machine).

Prints a table and appends the rows (with the command, the label and a shared run_id) to
bench/results/op_overhead.jsonl unless --no-append. Runs against whichever `sqdf_fast` is importable first
(PYTHONPATH=/some/other/checkout measures that one).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
try:
    import sqdf_fast  # noqa: F401 -- an installed or PYTHONPATH copy wins over this checkout
except ImportError:
    sys.path.insert(0, str(BENCH.parent))
from sqdf_fast import ops

RESULTS = BENCH / "results" / "op_overhead.jsonl"
MODES = ("forward", "full")


def _eager_policy_step():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH / "kernels.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module.eager_policy_step


def case(shape: tuple[int, ...]) -> dict:
    gen = torch.Generator().manual_seed(0)
    x, eps, eps_ref, noise, g_x = (torch.randn(shape, generator=gen) for _ in range(5))
    batch = shape[0]
    alpha_prev = torch.linspace(0.2, 0.95, batch) if batch > 1 else torch.tensor([0.6])
    return dict(x=x.requires_grad_(), eps=eps.requires_grad_(), alpha_t=alpha_prev * 0.8, alpha_prev=alpha_prev,
                eta=1.0, noise=noise, eps_ref=eps_ref, grad_outputs=(g_x, torch.rand(batch, generator=gen)))


def call(fn, c: dict, mode: str):
    if mode == "forward":
        return lambda: fn(c["x"], c["eps"], c["alpha_t"], c["alpha_prev"], c["eta"], c["noise"], c["eps_ref"])

    def full():
        outs = fn(c["x"], c["eps"], c["alpha_t"], c["alpha_prev"], c["eta"], c["noise"], c["eps_ref"])
        return torch.autograd.grad(outs, (c["x"], c["eps"]), c["grad_outputs"])
    return full


def time_us(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e6


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="", help="what this run measures (e.g. before, after)")
    parser.add_argument("--shapes", default="1x4x8x8,4x4x32x32,1x4x64x64")
    parser.add_argument("--samples", type=int, default=101)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--no-append", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    eager = _eager_policy_step()
    backend = ops.backend_for("cpu")[0]
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv])
    env = {k: os.environ[k] for k in ("PYTHONPATH", "SQDF_KERNELS") if k in os.environ}
    run_id, rows = uuid.uuid4().hex[:12], []
    for shape in (tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")):
        c = case(shape)
        for mode in MODES:
            impls = {"ours": call(ops.policy_step, c, mode), "eager": call(eager, c, mode)}
            for fn in impls.values():
                for _ in range(args.warmup):
                    fn()
            times = {name: [] for name in impls}
            for i in range(args.samples):  # interleaved, alternating which goes first: contention hits both alike
                for name in sorted(impls, reverse=i % 2 == 1):
                    times[name].append(time_us(impls[name], args.inner))
            ours, peer = (statistics.median(times[n]) for n in ("ours", "eager"))
            paired = statistics.median(o / e for o, e in zip(times["ours"], times["eager"]))
            fast = {n: statistics.quantiles(times[n], n=10)[0] for n in impls}
            rows.append(dict(op="policy_step", mode=mode, shape=list(shape), dtype="float32", backend=backend,
                             ours_us=round(ours, 2), eager_us=round(peer, 2), ratio=round(ours / peer, 3),
                             paired_ratio=round(paired, 3), ours_p10_us=round(fast["ours"], 2),
                             eager_p10_us=round(fast["eager"], 2), p10_ratio=round(fast["ours"] / fast["eager"], 3),
                             samples=args.samples, inner=args.inner, threads=torch.get_num_threads(),
                             label=args.label, sqdf_fast=str(Path(ops.__file__).parent.parent), env=env,
                             command=command, run_id=run_id, torch=torch.__version__, python=platform.python_version(),
                             loadavg=os.getloadavg()[0], timestamp=time.strftime("%Y-%m-%dT%H:%M:%S")))
            row = rows[-1]
            print(f"{'x'.join(map(str, shape)):>12s} {mode:8s} ours {row['ours_us']:9.1f} us  "
                  f"eager {row['eager_us']:9.1f} us  ours/eager {row['ratio']:.3f} (paired {row['paired_ratio']:.3f}, "
                  f"p10 {row['ours_p10_us']:.1f} / {row['eager_p10_us']:.1f} = {row['p10_ratio']:.3f})  ({backend})",
                  flush=True)
    if not args.no_append:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return rows


if __name__ == "__main__":
    main()
