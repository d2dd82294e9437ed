"""CUDA-graph rollouts (sqdf_fast.graphs) and the in-place adapter copy they rely on.

On the CPU: the eager fallback equals `rollout`, the static-buffer path the graph captures (run uncaptured,
`emulate=True`) equals `rollout` for the same generator, before and after an in-place LoRA update, a parameter
given new storage drops the cache, and SQDF's own sampler (`method.sampler`) follows --cuda-graphs. On CUDA
(skipped here): the captured replay equals the eager rollout, also after an in-place LoRA update, and one graph per
batch size is cached."""
import dataclasses

import pytest
import torch

from sqdf_fast import config
from sqdf_fast.adapters import POLICY, adapter_state_dict, add_policy_lora, copy_adapter_in_place
from sqdf_fast.graphs import GraphRollout
from sqdf_fast.methods.base import Method
from sqdf_fast.methods.sqdf import SQDF
from sqdf_fast.rollout import rollout
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks.sd_tiny import TINY_RESOLUTION, tiny_task

pytestmark = pytest.mark.usefixtures("one_thread")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def build(device: str = "cpu", steps: int = 3, **overrides) -> Method:
    values = dict(task="sd", resolution=TINY_RESOLUTION, sample_steps=steps, guidance=2.0, eta=1.0, device=device,
                  weights_dtype="float32")
    values.update(overrides)
    cfg = config.TrainConfig(**values)
    task = tiny_task(cfg)
    add_policy_lora(task.unet, task.lora_targets, 4, 4.0, seed=0)
    task.to(torch.device(device))
    return Method(task, DDIMSchedule.build(task.scheduler_config, steps, device), cfg)


def perturbed_adapter(method: Method, seed: int, scale: float = 0.3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = adapter_state_dict(method.task.unet)
    return {k: torch.randn(v.shape, generator=generator) * scale for k, v in state.items()}


def inputs(method: Method, batch: int, seed: int):
    device = method.schedule.timesteps.device
    generator = torch.Generator(device).manual_seed(seed)
    cond = method.task.sample_conditions(batch, generator)
    x_T = torch.randn((batch, *method.task.sample_shape), generator=generator, device=device)
    return x_T, cond


def eager(method: Method, x_T, cond, seed: int):
    generator = torch.Generator(x_T.device).manual_seed(seed)
    return rollout(method.policy_eps, method.schedule, x_T, cond, method.cfg.eta, generator)


def sampled(sampler: GraphRollout, x_T, cond, seed: int):
    return sampler(x_T, cond, torch.Generator(x_T.device).manual_seed(seed))


@pytest.fixture(scope="module")
def method():
    m = build()
    copy_adapter_in_place(m.task.unet, perturbed_adapter(m, 11))   # a policy that differs from the base
    return m


def test_fallback_off_cuda_equals_rollout(method):
    sampler = GraphRollout(method.policy_eps, method.schedule, method.cfg.eta, modules=[method.task.unet])
    x_T, cond = inputs(method, 2, 0)
    states, x0, kl = sampled(sampler, x_T, cond, 1)
    ref_states, ref_x0, _ = eager(method, x_T, cond, 1)
    assert kl is None and sampler.eager_calls == 1 and sampler.captures == 0
    assert torch.equal(states, ref_states) and torch.equal(x0, ref_x0)


def test_static_buffer_path_equals_rollout(method):
    """The body the graph captures, run uncaptured: pre-drawn noise and static buffers give the eager numbers, and a
    second call with new inputs reuses the buffers (outputs are clones, so the first result is not overwritten)."""
    sampler = GraphRollout(method.policy_eps, method.schedule, method.cfg.eta, modules=[method.task.unet],
                           emulate=True)
    results = []
    for seed in (0, 1):
        x_T, cond = inputs(method, 2, seed)
        results.append((sampled(sampler, x_T, cond, 10 + seed), eager(method, x_T, cond, 10 + seed)))
    for (states, x0, _), (ref_states, ref_x0, _) in results:
        assert torch.equal(states, ref_states) and torch.equal(x0, ref_x0)
    assert sampler.captures == 1 and sampler.replays == 2 and sampler.eager_calls == 0
    x_T, cond = inputs(method, 3, 2)   # another batch size: another buffer set
    states, x0, _ = sampled(sampler, x_T, cond, 5)
    assert torch.equal(x0, eager(method, x_T, cond, 5)[1]) and sampler.captures == 2


def test_copy_adapter_in_place_keeps_storages_and_changes_outputs():
    m = build()
    unet = m.task.unet
    params = {n: p for n, p in unet.named_parameters() if f".{POLICY}." in n}
    pointers = {n: p.data_ptr() for n, p in params.items()}
    sampler = GraphRollout(m.policy_eps, m.schedule, m.cfg.eta, modules=[unet], emulate=True)
    x_T, cond = inputs(m, 2, 0)
    before = sampled(sampler, x_T, cond, 3)[1]
    state = perturbed_adapter(m, 12)
    copy_adapter_in_place(unet, state)
    assert {n: p.data_ptr() for n, p in params.items()} == pointers
    assert all(p.requires_grad for p in params.values())
    loaded = adapter_state_dict(unet)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    after = sampled(sampler, x_T, cond, 3)[1]
    assert not torch.allclose(before, after)
    assert torch.equal(after, eager(m, x_T, cond, 3)[1])           # the "replay" sees the new weights
    assert sampler.recaptures == 0 and sampler.captures == 1        # same storages: nothing re-captured
    with pytest.raises(ValueError, match="missing keys"):
        copy_adapter_in_place(unet, dict(list(state.items())[1:]))
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        copy_adapter_in_place(unet, {**state, key: torch.zeros(1)})


def test_new_storage_drops_the_cache():
    m = build()
    sampler = GraphRollout(m.policy_eps, m.schedule, m.cfg.eta, modules=[m.task.unet], emulate=True)
    x_T, cond = inputs(m, 2, 0)
    sampled(sampler, x_T, cond, 3)
    p = next(p for n, p in m.task.unet.named_parameters() if f".{POLICY}." in n)
    p.data = p.data.clone()   # what a graph could not see: it is re-captured
    states, x0, _ = sampled(sampler, x_T, cond, 3)
    assert sampler.recaptures == 1 and sampler.captures == 2
    assert torch.equal(x0, eager(m, x_T, cond, 3)[1])


def test_collect_sampler_follows_the_flag(method):
    assert config.TrainConfig().cuda_graphs is False
    sqdf = SQDF(method.task, method.schedule, method.cfg)
    on = sqdf.sampler   # built once, in the constructor
    assert isinstance(on, GraphRollout) and on.enabled is False and on.modules == [method.task.unet]
    x_T, cond = inputs(method, 2, 0)
    assert torch.equal(sampled(on, x_T, cond, 4)[1], eager(method, x_T, cond, 4)[1])
    # collect samples with that sampler: the same object, one eager call more
    calls = on.eager_calls
    fresh = sqdf.collect(2, torch.Generator().manual_seed(5))
    assert sqdf.sampler is on and on.eager_calls == calls + 1
    generator = torch.Generator().manual_seed(5)
    cond, x_T = sqdf.new_chain_start(2, generator)
    states, x0, _ = rollout(method.policy_eps, method.schedule, x_T, cond, method.cfg.eta, generator)
    assert torch.equal(fresh["cond"], cond) and torch.equal(fresh["states"], states)
    assert torch.equal(fresh["images"], method.task.decode(x0))
    assert SQDF(method.task, method.schedule, dataclasses.replace(method.cfg, cuda_graphs=True)).sampler.enabled


# ---- CUDA only ---------------------------------------------------------------------------------------------------
@needs_cuda
def test_captured_replay_equals_eager_and_follows_lora_updates():
    m = build("cuda", steps=4)
    unet = m.task.unet
    copy_adapter_in_place(unet, perturbed_adapter(m, 11))
    sampler = GraphRollout(m.policy_eps, m.schedule, m.cfg.eta, modules=[unet])
    for batch in (1, 3):
        x_T, cond = inputs(m, batch, batch)
        states, x0, _ = sampled(sampler, x_T, cond, 7)
        ref_states, ref_x0, _ = eager(m, x_T, cond, 7)
        torch.testing.assert_close(states, ref_states, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x0, ref_x0, atol=1e-5, rtol=1e-5)
    assert sampler.captures == 2 and all(c.graph is not None for c in sampler._cache.values())
    x_T, cond = inputs(m, 3, 3)
    before = sampled(sampler, x_T, cond, 8)[1]
    with torch.no_grad():   # an optimizer-style in-place update
        for n, p in unet.named_parameters():
            if f".{POLICY}." in n:
                p.add_(torch.randn_like(p) * 0.2)
    after = sampled(sampler, x_T, cond, 8)[1]
    assert sampler.captures == 2 and sampler.recaptures == 0      # replayed, not re-captured
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, eager(m, x_T, cond, 8)[1], atol=1e-5, rtol=1e-5)
    copy_adapter_in_place(unet, perturbed_adapter(m, 13))          # a checkpoint load
    torch.testing.assert_close(sampled(sampler, x_T, cond, 9)[1], eager(m, x_T, cond, 9)[1], atol=1e-5, rtol=1e-5)
    assert sampler.recaptures == 0


@needs_cuda
def test_optimizer_step_is_seen_by_the_replay():
    m = build("cuda", steps=3)
    params = [p for n, p in m.task.unet.named_parameters() if f".{POLICY}." in n]
    sampler = GraphRollout(m.policy_eps, m.schedule, m.cfg.eta, modules=[m.task.unet])
    x_T, cond = inputs(m, 2, 0)
    sampled(sampler, x_T, cond, 1)
    optimizer = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    torch.testing.assert_close(sampled(sampler, x_T, cond, 2)[1], eager(m, x_T, cond, 2)[1], atol=1e-5, rtol=1e-5)
    assert sampler.recaptures == 0
