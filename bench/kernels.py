"""Fused SQDF ops against the same maths in eager PyTorch and under torch.compile.

    python bench/kernels.py --device cpu|cuda [--json PATH] [--ops ...] [--modes ...] [--batches ...]
                            [--dtypes ...] [--repeat N] [--warmup N] [--skip-compile] [--no-append]

For each op (policy_step, guided_policy_step, tweedie_x0, sqdf_loss), mode (forward, backward, full), shape and
dtype it times three implementations:

    fused    the public op (`sqdf_fast.ops`), on the backend `ops.backend_for(device)` names (`--backend`)
    eager    the same maths written in plain PyTorch the way a user would (diffusers DDIMScheduler.step style)
    compile  torch.compile(eager) (default mode, dynamic=False; compilation happens in the warm-up, untimed)

The peers' outputs are checked against the fused op's before timing (--no-check to skip). Modes are those of a
training step, with the inputs a step differentiates requiring grad (x and the policy's eps; reward and kl for the
loss): `forward` times the forward alone, `backward` times torch.autograd.grad with explicit grad_outputs on a
graph built once outside the timer (retain_graph=True), `full` times forward + backward.

Timing: median and min over --repeat calls after --warmup calls. CUDA: events around each call, the GPU idle
before it (so launch overhead counts) and L2 flushed (--no-flush-l2 to keep it); CPU: time.perf_counter, and the
load average is recorded because other processes on the cores distort it. GB/s counts the bytes that must move
(`bytes_moved`); the device's measured copy bandwidth (a large dst.copy_(src), bytes read + written) is the
roofline, and each row gets its percentage of it (`pct_copy_bw`; above 100 on the CPU where a case fits in cache).
On CUDA the extra memory one call allocates is recorded (`peak_extra_mb`) and, after all the timings, the kernels
one call launches at the B x 4 x 64 x 64 shapes are counted with torch.profiler (`launches`).

Prints a table (speedup of fused vs eager and vs compile); writes the rows as a JSON list to --json and appends
them to bench/results/kernels.jsonl (unless --no-append). Every row of a run carries the same `run_id`;
`bench/plot_kernels.py` draws the latest run per device.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from sqdf_fast import ops
from sqdf_fast.info import device_name

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.jsonl"
OPS = ("policy_step", "guided_policy_step", "tweedie_x0", "sqdf_loss")
MODES = ("forward", "backward", "full")
IMPLS = ("fused", "eager", "compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ETA, GUIDANCE, GAMMA, KL_COEF = 1.0, 7.5, 0.9, 0.1


# --- the eager peers: what a user writes without our ops ------------------------------------------------------
def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """A (B,) schedule value as (B, 1, 1, 1) in the sample's dtype (as diffusers casts alphas_cumprod)."""
    return value.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def eager_policy_step(x, eps, alpha_t, alpha_prev, eta, noise, eps_ref):
    """DDIMScheduler.step(eps, t, x, eta, variance_noise=noise) with per-sample alphas, plus the KL to the
    reference: mean over the latent of (mu - mu_ref)^2, divided by sigma^2."""
    alpha_prod_t = _per_sample(alpha_t, x)
    alpha_prod_t_prev = _per_sample(alpha_prev, x)
    beta_prod_t = 1 - alpha_prod_t
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5

    pred_original_sample = (x - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * eps
    mu = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    prev_sample = mu + std_dev_t * noise

    ref_original_sample = (x - beta_prod_t ** 0.5 * eps_ref) / alpha_prod_t ** 0.5
    ref_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * eps_ref
    mu_ref = alpha_prod_t_prev ** 0.5 * ref_original_sample + ref_sample_direction
    kl = ((mu - mu_ref) ** 2).mean(dim=tuple(range(1, x.dim()))) / std_dev_t.flatten() ** 2
    return prev_sample, kl.float()


def eager_guided_policy_step(x, eps_cond, eps_uncond, guidance, alpha_t, alpha_prev, eta, noise, eps_ref_cond,
                             eps_ref_uncond):
    """Classifier-free guidance on the policy and on the reference, then the DDIM step."""
    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
    eps_ref = eps_ref_uncond + guidance * (eps_ref_cond - eps_ref_uncond)
    return eager_policy_step(x, eps, alpha_t, alpha_prev, eta, noise, eps_ref)


def eager_tweedie_x0(x, eps, alpha_t):
    """pred_original_sample of DDIMScheduler.step: (x - sqrt(1 - a) eps) / sqrt(a)."""
    alpha_prod_t = _per_sample(alpha_t, x)
    return (x - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t ** 0.5


def eager_sqdf_loss(reward, kl, k, gamma, alpha, weight):
    """mean(weight * (-gamma^k * reward + alpha * kl))."""
    return (weight * (-(gamma ** k) * reward + alpha * kl)).mean()


EAGER = {"policy_step": eager_policy_step, "guided_policy_step": eager_guided_policy_step,
         "tweedie_x0": eager_tweedie_x0, "sqdf_loss": eager_sqdf_loss}


# --- the cases --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One op at one shape and dtype: its inputs, the three implementations and what backward differentiates."""
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    inputs: dict[str, object]
    grad_inputs: tuple[str, ...]          # the inputs that require grad (those a training step differentiates)
    fused: Callable
    eager: Callable
    outputs: Callable[[object], tuple[Tensor, ...]] = field(default=lambda out: out if isinstance(out, tuple)
                                                            else (out,))


def schedule_values(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-sample cumulative alphas alpha_t < alpha_prev spread over the middle of a DDIM chain (float32, (B,))."""
    alpha_prev = torch.linspace(0.2, 0.95, batch, device=device) if batch > 1 else torch.tensor([0.6], device=device)
    return alpha_prev * torch.linspace(0.95, 0.6, batch, device=device)[:batch], alpha_prev


def make_case(op: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0) -> Case:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(size=shape, dt=dtype):
        return torch.randn(size, generator=gen, device=device, dtype=torch.float32).to(dt)

    batch = shape[0]
    alpha_t, alpha_prev = schedule_values(batch, device)
    if op == "policy_step":
        inputs = {"x": rand(), "eps": rand(), "alpha_t": alpha_t, "alpha_prev": alpha_prev, "eta": ETA,
                  "noise": rand(), "eps_ref": rand()}
        return Case(op, shape, dtype, inputs, ("x", "eps"), ops.policy_step, eager_policy_step)
    if op == "guided_policy_step":
        inputs = {"x": rand(), "eps_cond": rand(), "eps_uncond": rand(), "guidance": GUIDANCE, "alpha_t": alpha_t,
                  "alpha_prev": alpha_prev, "eta": ETA, "noise": rand(), "eps_ref_cond": rand(),
                  "eps_ref_uncond": rand()}
        return Case(op, shape, dtype, inputs, ("x", "eps_cond", "eps_uncond"), ops.guided_policy_step,
                    eager_guided_policy_step)
    if op == "tweedie_x0":
        inputs = {"x": rand(), "eps": rand(), "alpha_t": alpha_t}
        return Case(op, shape, dtype, inputs, ("x", "eps"), ops.tweedie_x0, eager_tweedie_x0)
    if op == "sqdf_loss":
        # per-sample values, kept in float32 whatever the latent dtype; k = steps left after the trained one
        size = (batch,)
        k = torch.randint(0, 50, size, generator=gen, device=device)
        inputs = {"reward": rand(size, torch.float32), "kl": rand(size, torch.float32).abs(), "k": k,
                  "gamma": GAMMA, "alpha": KL_COEF, "weight": rand(size, torch.float32).abs()}
        return Case(op, size, torch.float32, inputs, ("reward", "kl"), ops.sqdf_loss, eager_sqdf_loss)
    raise ValueError(f"unknown op {op!r}")


# --- bytes that must move ----------------------------------------------------------------------------------------
# Per (op, mode): each input read once, each output written once. "big" tensors have the latent's shape and dtype,
# "small" ones are (B,) per-sample values (alpha_t, alpha_prev, kl and its gradient in float32, k in int64).
# Backward reads the incoming gradients and what it must recompute from, and writes one gradient per input that
# requires grad (x and the policy eps; the reference eps and the noise carry no gradient in a training step).
#
#   op                  mode      big reads (count)                         big writes (count)         small
#   policy_step         forward   x, eps, eps_ref, noise               (4)  x_prev                (1)  a_t, a_prev | kl
#                       backward  g_x_prev, eps, eps_ref (KL branch)   (3)  g_x, g_eps            (2)  a_t, a_prev, g_kl
#   guided_policy_step  forward   x, eps_c, eps_u, ref_c, ref_u, noise (6)  x_prev                (1)  a_t, a_prev | kl
#                       backward  g_x_prev, eps_c, eps_u, ref_c, ref_u (5)  g_x, g_eps_c, g_eps_u (3)  as policy_step
#   tweedie_x0          forward   x, eps                               (2)  x0                    (1)  a_t
#                       backward  g_x0                                 (1)  g_x, g_eps            (2)  a_t
#   sqdf_loss           forward   -                                         -                          reward, kl,
#                                                                                                      weight, k | loss
#                       backward  -                                         -                          g_loss, weight,
#                                                                                                      k | g_reward,
#                                                                                                      g_kl
#   any                 full      forward + backward
BYTES_TABLE = {  # (big reads, big writes, float32 small reads, float32 small writes, int64 small reads, scalars)
    ("policy_step", "forward"): (4, 1, 2, 1, 0, 0),
    ("policy_step", "backward"): (3, 2, 3, 0, 0, 0),
    ("guided_policy_step", "forward"): (6, 1, 2, 1, 0, 0),
    ("guided_policy_step", "backward"): (5, 3, 3, 0, 0, 0),
    ("tweedie_x0", "forward"): (2, 1, 1, 0, 0, 0),
    ("tweedie_x0", "backward"): (1, 2, 1, 0, 0, 0),
    ("sqdf_loss", "forward"): (0, 0, 3, 0, 1, 1),
    ("sqdf_loss", "backward"): (0, 0, 1, 2, 1, 1),
}


def bytes_moved(op: str, mode: str, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    if mode == "full":
        return bytes_moved(op, "forward", shape, dtype) + bytes_moved(op, "backward", shape, dtype)
    big_r, big_w, small_r, small_w, long_r, scalars = BYTES_TABLE[(op, mode)]
    numel, batch = 1, shape[0]
    for size in shape:
        numel *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (big_r + big_w) * numel * itemsize + (small_r + small_w) * batch * 4 + long_r * batch * 8 + scalars * 4


# --- timing -------------------------------------------------------------------------------------------------------
class Timer:
    """Median/min ms of a callable: CUDA events around each call with the GPU idle before it (and L2 flushed),
    or time.perf_counter on the CPU."""

    def __init__(self, device: torch.device, flush_l2: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        # larger than any L2 (H100: 50 MB, H200: 60 MB); zeroing it evicts the benchmark's data
        self.flush_buffer = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda and flush_l2 \
            else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def times(self, fn: Callable[[], object], repeat: int) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(repeat):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for start, end in events:
            if self.flush_buffer is not None:
                self.flush_buffer.zero_()
            torch.cuda.synchronize(self.device)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]


def copy_bandwidth(device: torch.device, mib: int, repeat: int = 10) -> float:
    """GB/s of dst.copy_(src) for a `mib` MiB buffer, counting the bytes read and written."""
    numel = mib * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device, flush_l2=False)
    for _ in range(3):
        dst.copy_(src)
    timer.sync()
    ms = statistics.median(timer.times(lambda: dst.copy_(src), repeat))
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def count_launches(fn: Callable[[], object], device: torch.device) -> int | None:
    """CUDA kernels one call launches (torch.profiler kernel events; memcpy/memset not counted)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    return len(kernels)


def mode_callable(case: Case, impl_fn: Callable, mode: str) -> Callable[[], object]:
    """What one timed call does in `mode`; for `backward` the forward runs here, once, outside the timer."""
    grad_inputs = [case.inputs[name] for name in case.grad_inputs]

    def forward():
        return case.outputs(impl_fn(**case.inputs))

    def grad_outputs_for(outs):
        gen = torch.Generator(device=outs[0].device).manual_seed(1)
        return [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype) for o in outs]

    if mode == "forward":
        return forward
    outs = forward()
    grads = grad_outputs_for(outs)
    if mode == "backward":
        return lambda: torch.autograd.grad(outs, grad_inputs, grads, retain_graph=True)
    if mode == "full":
        return lambda: torch.autograd.grad(forward(), grad_inputs, grads)
    raise ValueError(f"unknown mode {mode!r}")


def check_outputs(case: Case, name: str, got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> None:
    """The peers must compute what the fused op computes, or the comparison means nothing."""
    tol = 1e-4 if case.dtype == torch.float32 else 3e-2
    for index, (g, w) in enumerate(zip(got, want)):
        err = (g.double() - w.double()).abs().max().item()
        scale = w.double().abs().max().item()
        if not err <= tol * (1 + scale):
            raise RuntimeError(f"{case.op} {name} output {index} differs from the fused op by {err:.3g} "
                               f"(scale {scale:.3g}, {case.dtype})")


# --- environment ----------------------------------------------------------------------------------------------------
def triton_version() -> str | None:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def set_recompile_limit(limit: int) -> None:
    """dynamic=False compiles once per shape; the default limit (8 per function) would fall back to eager."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


# --- main -------------------------------------------------------------------------------------------------------------
def parse_list(text: str, allowed=None, cast=str) -> list:
    items = [cast(item.strip()) for item in text.split(",") if item.strip()]
    if allowed is not None:
        bad = [item for item in items if item not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(str, bad))}: must be among {', '.join(allowed)}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the rows of this run to PATH as a JSON list")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the rows are appended to")
    parser.add_argument("--no-append", action="store_true", help=f"do not append to --results ({RESULTS.name})")
    parser.add_argument("--ops", type=lambda s: parse_list(s, OPS), default=list(OPS))
    parser.add_argument("--modes", type=lambda s: parse_list(s, MODES), default=list(MODES))
    parser.add_argument("--impls", type=lambda s: parse_list(s, IMPLS), default=list(IMPLS))
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile peer")
    parser.add_argument("--batches", type=lambda s: parse_list(s, cast=int), default=[1, 8, 64],
                        help="batch sizes B of the B x LATENT shapes (default 1,8,64)")
    parser.add_argument("--latent", default="4x64x64", help="per-sample shape (default 4x64x64, SD latents)")
    parser.add_argument("--large", default="auto",
                        help="one more large shape, e.g. 1024x4x128x128 (the default on CUDA), or none "
                             "(the default on the CPU)")
    parser.add_argument("--dtypes", type=lambda s: parse_list(s, DTYPES),
                        help="default float32 on the CPU, float32,bfloat16 on CUDA")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "cpp", "triton"),
                        help="backend of the fused ops (auto: ops.backend_for, SQDF_KERNELS if set)")
    parser.add_argument("--repeat", type=int, help="timed calls per row (default 20 on the CPU, 100 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    parser.add_argument("--no-flush-l2", action="store_true", help="CUDA: do not flush L2 before each timed call")
    parser.add_argument("--copy-mib", type=int, help="buffer of the copy-bandwidth measurement "
                                                     "(default 1024 MiB on CUDA, 256 on the CPU)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: torch's choice)")
    parser.add_argument("--run-id", help="run id written into every row (default: timestamp-pid); give split "
                                             "invocations the same one to plot them as one run")
    parser.add_argument("--no-check", action="store_true", help="do not check the peers' outputs against fused")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    if args.skip_compile and "compile" in args.impls:
        args.impls.remove("compile")
    cuda = args.device.type == "cuda"
    args.dtypes = args.dtypes or (["float32", "bfloat16"] if cuda else ["float32"])
    args.repeat = args.repeat or (100 if cuda else 20)
    args.copy_mib = args.copy_mib or (1024 if cuda else 256)
    latent = tuple(int(s) for s in args.latent.split("x"))
    args.shapes = [(b,) + latent for b in args.batches]
    large = ("1024x4x128x128" if cuda else "none") if args.large == "auto" else args.large
    if large != "none":
        args.shapes.append(tuple(int(s) for s in large.split("x")))
    args.latent = latent
    return args


def fmt_shape(shape) -> str:
    return "x".join(map(str, shape))


def fmt_gbps(value: float) -> str:
    return f"{value:8.2f}" if value >= 1 else f"{value:8.4f}"


def fmt_speedup(row: dict, key: str) -> str:
    return f"{row[key]:7.2f}x" if row.get(key) is not None else ""


def print_table(rows: list[dict]) -> None:
    cuda = any(row["device_type"] == "cuda" for row in rows)
    header = (f"{'op':19s} {'mode':8s} {'shape':16s} {'dtype':8s} {'impl':7s} {'ms':>9s} {'min ms':>9s} "
              f"{'GB/s':>8s} {'%copy':>6s}" + (f" {'launch':>6s}" if cuda else "") + f" {'vs eager':>8s} "
              f"{'vs comp.':>8s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        launches = f" {row['launches'] if row.get('launches') is not None else '':>6}" if cuda else ""
        print(f"{row['op']:19s} {row['mode']:8s} {fmt_shape(row['shape']):16s} {row['dtype']:8s} {row['impl']:7s} "
              f"{row['ms']:9.4f} {row['min_ms']:9.4f} {fmt_gbps(row['gbps'])} {row['pct_copy_bw']:6.1f}{launches} "
              f"{fmt_speedup(row, 'speedup_vs_eager'):>8s} {fmt_speedup(row, 'speedup_vs_compile'):>8s}")


def run_case(case: Case, impls: dict[str, Callable], args, timer: Timer, device: torch.device) -> list[dict]:
    """The rows of one (op, shape, dtype): each mode, each implementation."""
    for name in case.grad_inputs:
        case.inputs[name].requires_grad_(True)
    # the first forward of each implementation, timed apart (torch.compile compiles the forward here)
    first_forward_s, outputs = {}, {}
    for impl in dict.fromkeys(["fused", *args.impls]):
        start = time.perf_counter()
        outputs[impl] = tuple(t.detach() for t in case.outputs(impls[impl](**case.inputs)))
        timer.sync()
        first_forward_s[impl] = round(time.perf_counter() - start, 3)
    if not args.no_check:
        for impl in args.impls:
            if impl != "fused":
                check_outputs(case, impl, outputs[impl], outputs["fused"])
    del outputs
    rows = []
    for mode in args.modes:
        group = {impl: measure(case, impl, impls[impl], mode, args, timer, device) for impl in args.impls}
        for impl, row in group.items():
            row.update(op=case.op, mode=mode, shape=list(case.shape), dtype=str(case.dtype).removeprefix("torch."),
                       grad_inputs=list(case.grad_inputs) if mode != "forward" else [],
                       first_forward_s=first_forward_s[impl])
            if impl == "fused":
                for peer in ("eager", "compile"):
                    if peer in group:
                        row[f"speedup_vs_{peer}"] = round(group[peer]["ms"] / row["ms"], 3)
        print_progress(list(group.values()))
        rows.extend(group.values())
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device, cuda = args.device, args.device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with ops.use_backend(args.backend):
        try:
            backend, backend_why = ops.backend_for(device)
        except (ImportError, ValueError) as err:
            sys.exit(f"kernels.py: the fused backend for {device} is not available ({type(err).__name__}: {err}); "
                     f"pass --backend torch (or set SQDF_KERNELS=torch) to benchmark the torch reference")
    print(f"fused ops on {device}: backend {backend} ({backend_why})")
    compiled = {}
    if "compile" in args.impls:
        set_recompile_limit(256)
        compiled = {op: torch.compile(EAGER[op], dynamic=False) for op in args.ops}
    loadavg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    copy_gbps = copy_bandwidth(device, args.copy_mib)
    print(f"copy bandwidth ({args.copy_mib} MiB dst.copy_(src), read + write): {copy_gbps:.1f} GB/s")
    if loadavg is not None and not cuda and loadavg > 0.5:
        print(f"warning: load average {loadavg:.2f} before the run; CPU timings share the cores with it")
    timer = Timer(device, flush_l2=cuda and not args.no_flush_l2)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    common = {
        "bench": "kernels", "run_id": args.run_id or f"{stamp}-{os.getpid()}", "device": device_name(device),
        "device_type": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "triton": triton_version(), "python": platform.python_version(), "timestamp": stamp,
        "command": "python " + shlex.join(sys.argv if argv is None else ["bench/kernels.py", *argv]),
        "warmup": args.warmup, "copy_gbps": round(copy_gbps, 2), "l2_flushed": timer.flush_buffer is not None,
        "loadavg_1m": loadavg,
    }
    rows: list[dict] = []
    with ops.use_backend(args.backend):
        for op, dtype, shape in cases(args):
            case = make_case(op, shape, dtype, device)
            rows.extend(run_case(case, {"fused": case.fused, "eager": case.eager, "compile": compiled.get(op)},
                                 args, timer, device))
            del case
        if cuda:  # after all the timings: a profiler session never precedes a timed call
            count_all_launches(rows, compiled, args, device)
    for row in rows:
        row.update(common)
        row["backend"] = backend if row["impl"] == "fused" else None
        row["backend_why"] = backend_why if row["impl"] == "fused" else None
        row["pct_copy_bw"] = round(100 * row["gbps"] / copy_gbps, 2)
    print()
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    if not args.no_append:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"appended {len(rows)} rows to {args.results}")
    return rows


def cases(args):
    """(op, dtype, shape) in run order; the loss takes (B,) float32 values whatever the latent dtype."""
    for op in args.ops:
        for dtype_name in args.dtypes:
            if op == "sqdf_loss" and dtype_name != "float32":
                continue
            for shape in args.shapes:
                yield op, DTYPES[dtype_name], shape


def count_all_launches(rows: list[dict], compiled: dict, args, device: torch.device) -> None:
    """Kernel launches per call at the B x latent shapes, into the rows' `launches`."""
    by_key = {(r["op"], r["mode"], tuple(r["shape"]), r["dtype"], r["impl"]): r for r in rows}
    for op, dtype, shape in cases(args):
        if shape[1:] != args.latent:
            continue
        case = make_case(op, shape, dtype, device)
        for name in case.grad_inputs:
            case.inputs[name].requires_grad_(True)
        impls = {"fused": case.fused, "eager": case.eager, "compile": compiled.get(op)}
        for mode in args.modes:
            for impl in args.impls:
                call = mode_callable(case, impls[impl], mode)
                call()
                call()
                row = by_key[(op, mode, tuple(case.shape), str(case.dtype).removeprefix("torch."), impl)]
                row["launches"] = count_launches(call, device)


def print_progress(rows: list[dict]) -> None:
    """Progress lines while the run goes (the full table is printed at the end)."""
    for row in rows:
        extra = f", {row['speedup_vs_eager']:.2f}x vs eager" if row.get("speedup_vs_eager") else ""
        print(f"  {row['op']} {row['mode']} {fmt_shape(row['shape'])} {row['dtype']} {row['impl']}: "
              f"{row['ms']:.4f} ms, {row['gbps']:.3f} GB/s{extra}", flush=True)


def measure(case: Case, impl: str, fn: Callable, mode: str, args, timer: Timer, device: torch.device) -> dict:
    """One row: warm-up (its first call timed apart as first_call_s: it compiles the backward for `compile`),
    the extra memory of one call on CUDA, then the timed calls."""
    start = time.perf_counter()
    call = mode_callable(case, fn, mode)
    first_call_s = None
    for index in range(max(args.warmup, 1)):
        call()
        if index == 0:
            timer.sync()
            first_call_s = time.perf_counter() - start
    timer.sync()
    peak_extra_mb = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        timer.sync()
        peak_extra_mb = round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 2)
    times = timer.times(call, args.repeat)
    ms = statistics.median(times)
    nbytes = bytes_moved(case.op, mode, case.shape, case.dtype)
    return {"impl": impl, "ms": round(ms, 5), "min_ms": round(min(times), 5), "repeats": len(times),
            "bytes": nbytes, "gbps": round(nbytes / (ms * 1e-3) / 1e9, 4), "launches": None,
            "peak_extra_mb": peak_extra_mb, "first_call_s": round(first_call_s, 3)}


if __name__ == "__main__":
    main()
