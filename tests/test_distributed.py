"""Data-parallel training: two CPU processes (gloo) started by torchrun on the digits task with tiny settings.

Three runs in two launches, shared by the tests through a module fixture (each launch costs ~10 s of start-up):
  B  stopped after 1 step, then A the same config for 4 steps uninterrupted, one after the other in ONE launch (a
     driver script joins the process group once and calls `sqdf_fast.train.main` for each run directory in turn, as
     an accelerate user would: the trainer uses the group it finds and leaves it alone);
  B' B resumed with 2 processes to step 4: a real fresh launch of `-m sqdf_fast.train`, which owns its group.
In every launch each rank other than 0 runs under an audit hook (a sitecustomize module on PYTHONPATH) that makes
any file it opens for writing, creates, renames or removes inside the launch's working directory fail the run.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqdf_fast import config, methods, ops, tasks, tracking
from sqdf_fast.adapters import adapter_state_dict, add_policy_lora
from sqdf_fast.distributed import Context, tensors_digest
from sqdf_fast.metrics import per_class_diversity
from sqdf_fast.rollout import rollout
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.train import evaluate, main, make_optimizer, rank_seed

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TINY = ["--batch-size", "8", "--rollout-batch", "8", "--buffer-size", "16", "--sample-steps", "5",
        "--eval-per-class", "2", "--log-every", "1", "--checkpoint-every", "2", "--no-progress"]
RUN_FILES = {"config.json", "metrics.jsonl", "summary.json", "samples_base.png", "samples_final.png", "curves.png",
             "checkpoint", "checkpoint/adapter.safetensors", "checkpoint/state.pt", "checkpoint/checksums.json"}

# ranks other than 0 may read anything but write nothing under SQDF_TEST_READ_ONLY
NO_WRITES_HOOK = textwrap.dedent('''
    import os, sys
    _rank, _root = os.environ.get("RANK"), os.environ.get("SQDF_TEST_READ_ONLY")
    if _rank not in (None, "0") and _root:
        _root = os.path.realpath(_root) + os.sep
        _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def _inside(path):
            try:
                return (os.path.realpath(os.fsdecode(path)) + os.sep).startswith(_root)
            except TypeError:   # a file descriptor
                return False

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE)
            elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
                path, writing = args[0], True
            else:
                return
            if writing and _inside(path):
                raise PermissionError(f"rank {_rank} wrote {path}: only rank 0 writes the run directory")

        sys.addaudithook(_hook)
''')


def torchrun(work: Path, args: list[str], target: tuple[str, ...] = ("-m", "sqdf_fast.train")) -> str:
    """`torchrun --standalone --nproc_per_node 2 -m sqdf_fast.train ARGS` (or another target) in `work`; stdout."""
    hook = work.parent / f"{work.name}-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(NO_WRITES_HOOK)
    work.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SQDF_TEST_READ_ONLY": str(work),
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(WORLD), *target, *args], cwd=work, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


# one launch, several runs, then the collectives' checks (COLLECTIVES, below) in the same process group: rank 0 prints
# a marker before each part so that the tests can split the output
RUNS_DRIVER = textwrap.dedent('''
    import os, sys
    import torch.distributed as dist
    from sqdf_fast.train import main

    dist.init_process_group("gloo")
    for run in sys.argv[1].split(","):
        if os.environ["RANK"] == "0":
            print(f"=== run {run} ===", flush=True)
        main(["--out", f"{run}/run", *sys.argv[2:]] + (["--steps", "1"] if run == "b" else ["--steps", "4"]))
    if os.environ["RANK"] == "0":
        print("=== collectives ===", flush=True)
    dist.barrier()
    exec(open(os.environ["SQDF_TEST_COLLECTIVES"]).read())
    dist.destroy_process_group()
''')


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


COLLECTIVES = textwrap.dedent('''
    import torch
    from sqdf_fast.distributed import launch

    with launch("cpu") as ctx:
        assert ctx.distributed and ctx.world == 2
        p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
        p.grad, q.grad = torch.full((3,), ctx.rank + 1.0), torch.full((2, 2), 10.0 * ctx.rank)
        # one rank's loss was not finite: both ranks skip, and the gradients are the means
        agreed = ctx.average_gradients([p, q], torch.tensor(ctx.rank == 0))
        assert not bool(agreed) and torch.equal(p.grad, torch.full((3,), 1.5)) and torch.equal(q.grad, q.grad * 0 + 5)
        assert bool(ctx.average_gradients([p, q], torch.tensor(True)))
        # rows of different lengths, in rank order
        gathered = ctx.gather_rows(torch.arange(ctx.rank + 1) + 10 * ctx.rank)
        assert gathered.tolist() == [0, 10, 11], gathered
        assert ctx.mean(torch.tensor([float(ctx.rank)])).tolist() == [0.5]
        # rank 0's failure reaches every rank instead of leaving them waiting
        try:
            ctx.on_main(lambda: int("not a number"))
        except ValueError as err:
            assert "not a number" in str(err), err
        else:
            raise AssertionError("no error")
        own = ctx.scatter([{"rank": r, "t": torch.full((2,), float(r))} for r in range(2)] if ctx.is_main else None)
        assert own["rank"] == ctx.rank and own["t"].tolist() == [ctx.rank] * 2
        gathered = ctx.gather({"rank": ctx.rank})
        assert gathered == ([{"rank": 0}, {"rank": 1}] if ctx.is_main else None)
        assert ctx.broadcast("from rank 0" if ctx.is_main else None) == "from rank 0"
        print(f"collectives ok on rank {ctx.rank}")
''')


def test_collectives_on_two_processes(runs):
    """The pieces the trainer's data parallelism rests on, on two real gloo processes started as torchrun does (run
    at the end of the fixture's first launch, in the group its driver joined; B' covers `launch` joining its own)."""
    assert runs["stdout_collectives"].count("collectives ok") == 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    work = root / "work"
    a, b = work / "a", work / "b"
    driver, collectives = root / "driver.py", root / "collectives.py"
    driver.write_text(RUNS_DRIVER)
    collectives.write_text(COLLECTIVES)
    os.environ["SQDF_TEST_COLLECTIVES"] = str(collectives)
    try:
        stdout = torchrun(work, ["b,a", *TINY], target=(str(driver),))
    finally:
        del os.environ["SQDF_TEST_COLLECTIVES"]
    before, stdout_b, stdout_a, stdout_collectives = re.split(r"=== (?:run \w|collectives) ===", stdout)
    assert "=== run b ===" + stdout_b + "=== run a ===" + stdout_a + "=== collectives ===" in stdout
    entries = sorted(p.name for p in work.iterdir())
    first_step = {"adapter": load_file(str(b / "run/checkpoint/adapter.safetensors")), "rows": read_rows(b / "run")}
    torchrun(b, ["--resume", "run", "--steps", "4"])
    return {"a": a, "b": b, "stdout_a": stdout_a, "stdout_collectives": stdout_collectives, "entries": entries,
            "first_step": first_step}


def test_ranks_hold_identical_adapters(runs):
    """Each rank records the digest of its own adapter in the checkpoint; all equal that of the saved adapter."""
    state = torch.load(runs["a"] / "run/checkpoint/state.pt", weights_only=True)
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    saved = tensors_digest(load_file(str(runs["a"] / "run/checkpoint/adapter.safetensors")))
    assert [entry["adapter_digest"] for entry in state["ranks"]] == [saved] * WORLD
    # ... while their random streams and buffer shards are their own
    generators = [entry["generator"] for entry in state["ranks"]]
    assert not torch.equal(*generators)
    assert not torch.equal(*(entry["method"]["buffer"]["states"] for entry in state["ranks"]))
    assert all(entry["method"]["buffer"]["states"].shape[0] == 16 // WORLD for entry in state["ranks"])


def test_only_rank_0_writes(runs):
    """Ranks other than 0 ran under the no-writes hook (else the launch fails); one rank printed; rows once."""
    out = runs["a"] / "run"
    files = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert {name for name in files if not name.startswith("tensorboard")} == RUN_FILES
    if tracking.resolve("auto"):   # --log-to auto: rank 0's one TensorBoard writer
        assert len([name for name in files if name.startswith("tensorboard/events.out.tfevents.")]) == 1
    assert [p.name for p in runs["a"].iterdir()] == ["run"]
    assert runs["entries"] == ["a", "b"]   # nothing else in the launch's working directory
    assert runs["stdout_a"].count("base model:") == 1 and runs["stdout_a"].count("step    4/4") == 1
    assert "2 processes (gloo)" in runs["stdout_a"]
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 4]   # base eval, 4 log rows, final eval


def reference_first_step(cfg: config.TrainConfig) -> tuple[dict, dict]:
    """One optimizer step of one process whose global batch is the two ranks' batches: micro-batch r is what rank r
    draws (rank r's seed stream, a rollout of rollout_batch / 2 into its own buffer shard, batch_size / 2 pairs
    from it), weighted 1/2 as gradient accumulation weighs micro-batches. Returns the adapter after the step and the
    metrics the trainer logs (its training row, its base and step-1 evaluations)."""
    with ops.use_backend(cfg.kernels):
        ctx = Context()
        task = tasks.build(cfg, ctx.device)
        schedule = DDIMSchedule.build(task.scheduler_config, cfg.sample_steps, ctx.device)
        params = add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
        # rank r's method: its share of the counts and its own buffer shard, on the one shared policy
        rank_methods = [methods.build(task, schedule, cfg, WORLD) for _ in range(WORLD)]
        optimizer = make_optimizer(params, cfg, ctx.device)
        base, _, _ = evaluate(rank_methods[0], cfg, ctx, base=True)
        per_rank = []
        for rank, method in enumerate(rank_methods):
            assert method.buffer.capacity == cfg.buffer_size // WORLD
            assert (method.rollout_size, method.micro_size) == (cfg.rollout_batch // WORLD, cfg.batch_size // WORLD)
            generator = torch.Generator().manual_seed(rank_seed(cfg.seed, rank))
            fresh = method.collect(method.rollout_size, generator)
            method.buffer.add(fresh["states"], fresh["cond"], fresh["reward"])
            x, j, cond, weight = method.draw(0, generator)
            loss, stats = method.loss(x, j, cond, weight, generator)
            (loss / WORLD).backward()
            per_rank.append({"loss": float(loss.detach()), "reward": float(fresh["reward"].mean()),
                             **{k: float(v) for k, v in stats.items()}, "fresh": fresh})
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        final, _, _ = evaluate(rank_methods[0], cfg, ctx)
    row = {k: sum(r[k] for r in per_rank) / WORLD for k in ("loss", "reward", "reward_q", "kl_term")}
    features = task.features(torch.cat([r["fresh"]["images"] for r in per_rank]))
    row.update(grad_norm=grad_norm, diversity=per_class_diversity(features, torch.cat([r["fresh"]["cond"]
                                                                                        for r in per_rank])))
    return adapter_state_dict(task.unet), {"row": row, "base": base, "final": final}


def test_two_ranks_match_one_process_on_the_same_global_batch(runs, one_thread):
    """The 2-rank run after one step equals one process computing the same global batch.

    Why this comparison: both ranks' streams come from their own seeds, so no single-process run of the trainer
    draws the same samples. Instead the test recomputes rank r's micro-batch in this process with the trainer's
    own pieces (rollout, buffer shard, draw, loss from rank r's generator), accumulates the gradient over the two
    micro-batches as one process with grad_accum 2 would (mean of the two losses), clips and steps. That is the
    single-process step on the 2-rank global batch; the distributed run must land on the same adapter. Without
    the all-reduce each rank would step on its own gradient (Adam's first step moves each weight by about lr
    times the sign of its gradient, so the adapters would differ by ~lr where the signs differ); a sum instead of
    a mean would leave Adam's step almost unchanged, so the logged pre-clip gradient norm is compared as well,
    and so are every logged mean and the base and step-1 evaluations (each rank samples half of the conditions).
    Tolerances: the ranks run the same kernels on the same shapes as this process; only the order of adding the
    two halves differs (rows), and the evaluation's UNet batch is 10 per rank against 20 here.
    """
    cfg = config.from_dict(json.loads((runs["b"] / "run/config.json").read_text()), "config.json")
    adapter, expected = reference_first_step(cfg)
    got = runs["first_step"]["adapter"]
    assert got.keys() == adapter.keys()
    moved = max(float((adapter[k] - v).abs().max()) for k, v in adapter_state_dict_at_init(cfg).items())
    assert moved > 0.5 * cfg.lr   # the step is a real one
    for key in adapter:
        # Adam's first step is about lr * g / (|g| + eps): where a gradient element is near 0, float rounding in g
        # moves it by a visible fraction of lr (3.4e-3 lr seen at 2 threads), while a missing all-reduce moves it
        # by ~lr; the reference runs on one thread, as the launched ranks do
        torch.testing.assert_close(got[key], adapter[key], rtol=0, atol=2e-2 * cfg.lr)
    rows = runs["first_step"]["rows"]
    train_row = next(r for r in rows if r["step"] == 1 and "loss" in r)
    for key, value in expected["row"].items():
        assert train_row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 1]
    for row, metrics in zip(evals, (expected["base"], expected["final"])):
        for key, value in metrics.items():
            assert row[f"eval_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def adapter_state_dict_at_init(cfg: config.TrainConfig) -> dict:
    task = tasks.build(cfg, torch.device("cpu"))
    add_policy_lora(task.unet, task.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    return adapter_state_dict(task.unet)


def test_resume_with_two_ranks_equals_uninterrupted(runs):
    a, b = runs["a"] / "run", runs["b"] / "run"
    adapter_a = load_file(str(a / "checkpoint/adapter.safetensors"))
    adapter_b = load_file(str(b / "checkpoint/adapter.safetensors"))
    assert adapter_a.keys() == adapter_b.keys()
    for key in adapter_a:
        torch.testing.assert_close(adapter_a[key], adapter_b[key], rtol=0, atol=0)
    summary_a, summary_b = (json.loads((run / "summary.json").read_text()) for run in (a, b))
    for key in ("reward_final", "diversity_final", "fd_final", "path_kl_final"):
        assert summary_a[key] == summary_b[key], key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    # b's own final evaluation at step 1 came after its checkpoint: the resume dropped it and recorded its change
    rows_b = strip(read_rows(b))
    assert [r for r in rows_b if "resumed_with" in r] == [{"step": 1, "resumed_with": {"steps": [1, 4]}}]
    assert strip(read_rows(a)) == [r for r in rows_b if "resumed_with" not in r]


def test_resume_with_another_number_of_processes_fails(runs, monkeypatch):
    """One process cannot continue a 2-process run (its ranks' RNG and buffer shards): a clear error, no writes."""
    out = runs["a"] / "run"
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as err:
        main(["--resume", str(out), "--steps", "5"])
    message = str(err.value)
    assert "written by 2 process(es)" in message and "this run has 1" in message, message
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.mark.parametrize("args, name", [
    (["--batch-size", "7", "--rollout-batch", "8", "--buffer-size", "16"], "batch_size"),
    (["--batch-size", "8", "--grad-accum", "8"], "grad_accum"),   # 4 per process: 8 micro-batches do not fit
    (["--rollout-batch", "7"], "rollout_batch"),
    (["--buffer-size", "513"], "buffer_size"),
    (["--device", "cuda:1"], "device"),
])
def test_config_refuses_sizes_the_processes_cannot_split(tmp_path, monkeypatch, args, name):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as err:
        config.parse(args + ["--out", str(tmp_path / "run")])
    message = str(err.value)
    assert message.startswith(f"error: {name}=") and "\n" not in message, message
    if name != "device":
        assert "2 processes" in message or "WORLD_SIZE" in message, message


def test_a_shard_of_the_evaluation_draws_its_rows_of_the_noise():
    """rollout(batch_rows=(rows, n)) on rows of x_T and cond gives those rows of the whole batch's rollout."""
    schedule = DDIMSchedule.build(dict(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=False,
                                       steps_offset=1), 4, "cpu")
    denoiser = lambda x, t, cond: rollout_eps(x, cond)  # noqa: E731
    x_T, cond = torch.randn(7, 3, generator=torch.Generator().manual_seed(1)), torch.arange(7).float()
    states, x0, _ = rollout(denoiser, schedule, x_T, cond, 1.0, torch.Generator().manual_seed(2))
    for world in (2, 3):
        for rank in range(world):
            rows = Context(rank=rank, world=world).shard(7)
            part_states, part_x0, _ = rollout(denoiser, schedule, x_T[rows], cond[rows], 1.0,
                                              torch.Generator().manual_seed(2), batch_rows=(rows, 7))
            torch.testing.assert_close(part_x0, x0[rows], rtol=0, atol=0)
            torch.testing.assert_close(part_states, states[rows], rtol=0, atol=0)
    sizes = [len(range(7)[Context(rank=r, world=3).shard(7)]) for r in range(3)]
    assert sizes == [3, 2, 2]


def rollout_eps(x, cond):
    from sqdf_fast.rollout import GuidedEps
    return GuidedEps(0.1 * x + cond[:, None], None, 1.0)
