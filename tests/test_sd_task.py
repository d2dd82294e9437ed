"""The Stable Diffusion task on tiny pipeline folders: loading, folder errors, adapters (policy, reference, LCM on one
UNet), the prompt cache, gradient checkpointing, parameter and activation memory, and a short training run."""
import copy
import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from sd_fixtures import (
    TINY_RESOLUTION,
    TINY_UNET_CONFIG,
    make_tiny_lcm_lora,
    make_tiny_pipeline,
    tiny_lcm_lora_state_dict,
    tiny_sd_config,
)
from transformers import CLIPTextModel, CLIPVisionConfig

from sqdf_fast import checkpoint, config, ops, tasks
from sqdf_fast.adapters import POLICY, adapter_state_dict, adapters_disabled, add_policy_lora, only_adapter
from sqdf_fast.consistency import ConsistencyModel, boundary_scalings
from sqdf_fast.memory import Checkpointed, parameter_bytes, saved_tensor_bytes
from sqdf_fast.methods.sqdf import SQDF
from sqdf_fast.schedule import DDIMSchedule
from sqdf_fast.tasks import CheckedReward, sd
from sqdf_fast.train import run

TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
                   image_size=56, projection_dim=16, hidden_act="quick_gelu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    model = make_tiny_pipeline(root / "pipeline")
    return model, make_tiny_lcm_lora(root / "lcm" / "pytorch_lora_weights.safetensors", model)


def base_unet(model) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(model / "unet", local_files_only=True).requires_grad_(False).eval()


def randomise_policy(unet, seed: int = 3) -> None:
    """The policy starts equal to the base (B = 0): give it weights so that it differs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if f"lora_B.{POLICY}." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def inputs(task, batch: int = 2):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((batch, *task.sample_shape), generator=generator)
    return x, torch.tensor([700, 40])[:batch], torch.tensor([0, 7])[:batch]


def test_loads_tiny_pipeline(tiny):
    model, _ = tiny
    task = sd.make_task(tiny_sd_config(model, "unused"))
    assert task.name == "sd" and task.sample_shape == (4, 8, 8)   # 64 px / 8
    table = task.frozen[0]
    assert table.embeddings.shape == (45 + 6 + 1, 32, 32) and table.prompts[-1] == ""
    assert task.null_condition(torch.tensor([3, 4])).tolist() == [51, 51]
    assert task.eval_conditions(2).tolist() == [45, 45, 46, 46, 47, 47, 48, 48, 49, 49, 50, 50]
    cond = task.sample_conditions(64, torch.Generator().manual_seed(0))
    assert int(cond.max()) < 45 and cond.dtype == torch.long
    assert "skip_prk_steps" not in task.scheduler_config and task.scheduler_config["beta_end"] == 0.012
    assert task.consistency is None and task.real_features is None
    images = task.decode(torch.randn(3, *task.sample_shape))
    assert images.shape == (3, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert task.reward(images, cond[:3]).shape == (3,)
    assert task.features(images).shape == (3, 3 * 64)


@pytest.mark.parametrize("remove", sd.SUBFOLDERS)
def test_missing_subfolder_is_named(tiny, tmp_path, remove):
    broken = shutil.copytree(tiny[0], tmp_path / "pipeline")
    shutil.rmtree(broken / remove)
    with pytest.raises(ValueError, match=f"no {remove}/ folder"):
        sd.make_task(tiny_sd_config(broken, "unused"))


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "unet" / "config.json").unlink(), "unet/ has no config.json"),
    (lambda root: (root / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "vae/ has no weights"),
    (lambda root: (root / "text_encoder" / "model.safetensors").unlink(), "text_encoder/ has no weights"),
    (lambda root: (root / "tokenizer" / "merges.txt").unlink(), "tokenizer/ has neither"),
    (lambda root: (root / "scheduler" / "scheduler_config.json").unlink(), "scheduler/ has no scheduler_config"),
    (lambda root: (root / "unet" / "config.json").write_text("{not json"), "cannot load unet/"),
    (lambda root: (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**sd.SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})), "only epsilon-prediction"),
])
def test_malformed_folder_is_named(tiny, tmp_path, damage, message):
    broken = shutil.copytree(tiny[0], tmp_path / "pipeline")
    damage(broken)
    with pytest.raises(ValueError, match=message):
        sd.make_task(tiny_sd_config(broken, "unused"))


def test_bad_arguments(tiny, tmp_path):
    model, _ = tiny
    with pytest.raises(ValueError, match="needs --model"):
        sd.make_task(dataclasses.replace(tiny_sd_config(model, "unused"), model=None))
    with pytest.raises(ValueError, match="builds its own random weights"):
        sd.make_random_task(tiny_sd_config(model, "unused", task="sd-random"))
    with pytest.raises(ValueError, match="prompts='nowhere.txt'"):
        sd.make_task(tiny_sd_config(model, "unused", prompts="nowhere.txt"))
    with pytest.raises(ValueError, match="resolution=60"):
        sd.make_task(tiny_sd_config(model, "unused", resolution=60))
    with pytest.raises(ValueError, match="consistency=.*no such file"):
        tiny_sd_config(model, "unused", consistency=str(tmp_path / "none"))   # validate() names it
    not_a_lora = tmp_path / "empty"
    not_a_lora.mkdir()
    with pytest.raises(ValueError, match="neither an LCM-LoRA"):
        sd.make_task(tiny_sd_config(model, "unused", consistency=str(not_a_lora)))


def test_prompt_file(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n  a blue whale  \n" + "".join(f"animal {i}\n" for i in range(8)))
    train, evaluation = sd.load_prompts(str(prompts))
    assert train[:2] == ["a red fox", "a blue whale"] and len(train) == 10
    assert evaluation == train[:6]
    task = sd.make_task(tiny_sd_config(tiny[0], "unused", prompts=str(prompts)))
    assert task.frozen[0].embeddings.shape[0] == 10 + 1   # evaluation prompts are among the training ones


def test_prompts_are_encoded_once(tiny, monkeypatch):
    encoded = []
    original = CLIPTextModel.forward

    def counting(self, input_ids=None, **kwargs):
        encoded.append(input_ids.shape[0])
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", counting)
    cfg = tiny_sd_config(tiny[0], "unused", consistency=str(tiny[1]))
    task = sd.make_task(cfg)
    assert sum(encoded) == 45 + 6 + 1   # every distinct prompt and the empty one, once
    add_policy_lora(task.unet, task.lora_targets, 4, 4.0, 0)
    method = SQDF(task, DDIMSchedule.build(task.scheduler_config, cfg.sample_steps), cfg)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, _, cond = inputs(task)
        method.loss(x, torch.tensor([0, 1]), cond, None, generator)[0].backward()
    assert sum(encoded) == 52   # no text-encoder call in a training step


def test_reference_policy_and_consistency_on_one_unet(tiny):
    model, lcm = tiny
    task = sd.make_task(tiny_sd_config(model, "unused", consistency=str(lcm)))
    assert isinstance(task.consistency, sd.AdapterConsistency)
    x, t, cond = inputs(task)
    base = base_unet(model)

    def base_eps(unet):
        return sd.unet_eps(unet, task.frozen[0], x, t, cond)

    with torch.no_grad():
        torch.testing.assert_close(task.eps(x, t, cond), base_eps(base), rtol=0, atol=0)  # lcm inactive
    params = add_policy_lora(task.unet, task.lora_targets, 4, 4.0, 0)
    randomise_policy(task.unet)
    trainable = {id(p) for p in task.unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    assert all(not p.requires_grad for name, p in task.unet.named_parameters() if f".{sd.LCM}." in name)

    # the same policy on a UNet without the lcm adapter
    policy_only = base_unet(model)
    add_policy_lora(policy_only, task.lora_targets, 4, 4.0, 0)
    from sqdf_fast.adapters import load_adapter_state_dict
    load_adapter_state_dict(policy_only, adapter_state_dict(task.unet))
    # the LCM-LoRA merged into a copy of the base by diffusers itself
    pipe = StableDiffusionPipeline(unet=base_unet(model), vae=task.frozen[1], text_encoder=None, tokenizer=None,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(lcm.parent))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = pipe.unet

    with torch.no_grad():
        policy = task.eps(x, t, cond)
        torch.testing.assert_close(policy, base_eps(policy_only), rtol=1e-5, atol=1e-5)
        assert (policy - base_eps(base)).abs().max() > 1e-2   # the policy adapter is on
        with adapters_disabled(task.unet):
            torch.testing.assert_close(task.eps(x, t, cond), base_eps(base), rtol=0, atol=0)
        with only_adapter(task.unet, sd.LCM):
            lcm_eps = task.eps(x, t, cond)
        torch.testing.assert_close(lcm_eps, base_eps(merged), rtol=1e-5, atol=1e-5)
        assert (lcm_eps - base_eps(base)).abs().max() > 1e-2
        alphas = task.consistency.alphas_cumprod
        expected = ops.consistency_x0(x, base_eps(merged), alphas[t], *boundary_scalings(t))
        torch.testing.assert_close(task.consistency(x, t, cond), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(task.eps(x, t, cond), policy, rtol=0, atol=0)   # state restored
    assert {id(p) for p in task.unet.parameters() if p.requires_grad} == trainable
    with pytest.raises(ValueError, match="no such adapter"):
        with only_adapter(task.unet, "missing"):
            pass


@pytest.mark.parametrize("alpha", [4.0, 2.0])
def test_kohya_lcm_lora_loads_like_diffusers_keys(tiny, tmp_path, alpha):
    """The published LCM-LoRA files use kohya's keys with alphas: each layer's update is scaled by alpha / rank, and
    at alpha = rank the same weights act exactly as in diffusers' keys."""
    model, lcm = tiny
    kohya = make_tiny_lcm_lora(tmp_path / "kohya.safetensors", model, kohya_alpha=alpha)
    outputs = {}
    for name, source in (("diffusers", lcm), ("kohya", kohya)):
        task = sd.make_task(tiny_sd_config(model, "unused", consistency=str(source)))
        x, t, cond = inputs(task)
        with torch.no_grad(), only_adapter(task.unet, sd.LCM):
            outputs[name] = task.eps(x, t, cond)
    layers = [m for m in task.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == len(tiny_lcm_lora_state_dict(model)) // 2
    assert {layer.scaling[sd.LCM] for layer in layers} == {alpha / 4}   # the fixture's rank is 4
    if alpha == 4:
        torch.testing.assert_close(outputs["kohya"], outputs["diffusers"], rtol=1e-6, atol=1e-6)


def test_parameter_memory_is_one_unet_plus_adapters(tiny, tmp_path):
    model, lcm = tiny
    task = sd.make_task(tiny_sd_config(model, "unused", consistency=str(lcm)))
    add_policy_lora(task.unet, task.lora_targets, 4, 4.0, 0)
    base, table, vae = parameter_bytes([base_unet(model)]), *task.frozen[:2]
    lora_bytes = {name: sum(p.numel() * p.element_size() for n, p in task.unet.named_parameters() if f".{name}." in n)
                  for name in (sd.LCM, POLICY)}
    assert parameter_bytes([task.unet]) == base + lora_bytes[sd.LCM] + lora_bytes[POLICY]
    held = parameter_bytes([task.unet, *task.frozen])
    extras = parameter_bytes([table]) + parameter_bytes([vae]) + parameter_bytes([task.consistency])
    assert held == base + sum(lora_bytes.values()) + extras
    assert parameter_bytes([task.consistency]) == 1000 * 4   # its alphas table only: no UNet of its own
    # a full LCM UNet folder is held as a second UNet, as it comes
    base_unet(model).save_pretrained(tmp_path / "lcm_unet")
    full = sd.make_task(tiny_sd_config(model, "unused", consistency=str(tmp_path / "lcm_unet")))
    assert isinstance(full.consistency, ConsistencyModel)
    assert parameter_bytes([full.unet, *full.frozen]) == parameter_bytes([full.unet]) * 2 + extras


def test_full_lcm_unet_with_guidance_embedding(tiny, tmp_path):
    model, _ = tiny
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        UNet2DConditionModel(**TINY_UNET_CONFIG, time_cond_proj_dim=16).save_pretrained(tmp_path / "lcm" / "unet")
    task = sd.make_task(tiny_sd_config(model, "unused", consistency=str(tmp_path / "lcm"), guidance=3.0))
    x, t, cond = inputs(task)
    lcm_unet = task.consistency.net
    w = sd.guidance_embedding(torch.full((2,), 2.0), 16)
    with torch.no_grad():
        eps = lcm_unet(x, t, encoder_hidden_states=task.frozen[0](cond), timestep_cond=w).sample
        expected = ops.consistency_x0(x, eps, task.consistency.alphas_cumprod[t], *boundary_scalings(t))
        torch.testing.assert_close(task.consistency(x, t, cond), expected)


def tiny_reward_task(model, lcm_state, **overrides):
    cfg = tiny_sd_config(model, "unused", **overrides)
    reward = sd.random_aesthetic_reward(CLIPVisionConfig(**TINY_VISION), torch.Generator().manual_seed(0),
                                        torch.float32)
    task = sd.build_task("sd", cfg, sd.load_pipeline(model, torch.float32), reward, lcm_state)
    params = add_policy_lora(task.unet, task.lora_targets, 4, 4.0, 0)
    randomise_policy(task.unet)
    return cfg, task, params


def test_checkpointing_keeps_gradients_and_saves_memory(tiny):
    model, _ = tiny
    lcm_state = tiny_lcm_lora_state_dict(model)
    results = {}
    # (estimator, decoder, reward): all off, each alone, all on
    for flags in [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
                  (True, True, True)]:
        cfg, task, params = tiny_reward_task(model, lcm_state, checkpoint_estimator=flags[0],
                                             checkpoint_decoder=flags[1], checkpoint_reward=flags[2])
        assert task.features(torch.rand(2, 3, 64, 64)).shape == (2, 16)   # the reward's CLIP embedding
        method = SQDF(task, DDIMSchedule.build(task.scheduler_config, cfg.sample_steps), cfg)
        x, _, cond = inputs(task)
        j = torch.tensor([0, 1])   # not the last transition: the consistency model is on the gradient path
        loss, saved = saved_tensor_bytes(lambda: method.loss(x, j, cond, None, torch.Generator().manual_seed(0))[0],
                                         exclude=[p for m in (task.unet, *task.frozen) for p in m.parameters()])
        loss.backward()
        results[flags] = (loss.detach(), [p.grad.clone() for p in params], saved)
    reference_loss, reference_grads, all_off = results[(False, False, False)]
    assert any(g.abs().max() > 0 for g in reference_grads)
    for flags, (loss, grads, saved) in results.items():
        torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
        for g, ref in zip(grads, reference_grads):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    # each switch alone saves memory, and together they save the most
    for i in range(3):
        one_on = tuple(k == i for k in range(3))
        assert results[one_on][2] < all_off, one_on
    assert results[(True, True, True)][2] == min(r[2] for r in results.values())


def test_build_puts_a_named_reward_under_the_tasks_checkpointing_switch(tiny):
    import rewards_for_tests
    for on in (False, True):
        cfg = tiny_sd_config(tiny[0], "unused", reward="rewards_for_tests:image_mean", checkpoint_reward=on)
        task = tasks.build(cfg, torch.device("cpu"))
        assert isinstance(task.reward, Checkpointed) and task.reward.enabled is on
        # the user's reward, checked at each call, inside the switch
        assert isinstance(task.reward.fn, CheckedReward) and task.reward.fn.fn is rewards_for_tests.image_mean


def test_saved_tensor_bytes_counts_distinct_storages():
    x = torch.randn(1000, requires_grad=True)
    weight = torch.randn(1000, requires_grad=True)
    _, saved = saved_tensor_bytes(lambda: (x.sin() * weight).sum())
    assert saved == 3 * 4000   # sin saves x; the product saves sin(x) and weight
    _, saved = saved_tensor_bytes(lambda: (x.sin() * weight).sum(), exclude=[weight, x])
    assert saved == 4000


def test_train_run_writes_the_run_directory(tiny, tmp_path):
    model, lcm = tiny
    cfg = tiny_sd_config(model, tmp_path / "run", consistency=str(lcm), steps=2, reward="rewards_for_tests:image_mean")
    summary = run(cfg)
    assert 0 < summary["reward_base"] < 1   # the mean of images in [0, 1]
    out = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "summary.json", "samples_base.png", "samples_final.png",
                 "curves.png", "checkpoint/adapter.safetensors"):
        assert (out / name).is_file(), name
    assert summary["steps"] == 2 and summary["path_kl_final"] > 0
    assert abs(summary["fd_base"]) < 1e-6 and summary["fd_final"] > 0   # fd: drift from the base model's samples
    _, state = checkpoint.load(out)
    assert sorted(state["base_features"]) == list(range(45, 51))
    resumed, resume_dir = config.parse(["--resume", str(out), "--steps", "3"])
    assert run(resumed, resume_dir)["fd_base"] == summary["fd_base"]


def test_sd_random_configs_are_sd15_sized():
    """The SD-1.5 architecture without building it (that takes a minute): parameter counts from meta tensors."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPVisionModelWithProjection
    with init_empty_weights():
        counts = {
            "unet": UNet2DConditionModel(**sd.SD15_UNET_CONFIG),
            "vae": AutoencoderKL(**sd.SD_VAE_CONFIG),
            "text": CLIPTextModel(CLIPTextConfig(**sd.CLIP_L14_TEXT_CONFIG)),
            "vision": CLIPVisionModelWithProjection(CLIPVisionConfig(**sd.CLIP_L14_VISION_CONFIG)),
        }
    millions = {k: round(sum(p.numel() for p in m.parameters()) / 1e6) for k, m in counts.items()}
    assert millions == {"unet": 860, "vae": 84, "text": 123, "vision": 304}
    assert len(sd.SIMPLE_ANIMALS) == len(set(sd.SIMPLE_ANIMALS)) == 45
    assert not set(sd.SIMPLE_ANIMALS) & set(sd.HELD_OUT_ANIMALS)
    assert config.from_dict({"task": "sd-random"}, "test").sample_steps == 50


def test_random_lora_fills_a_copy_exactly():
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    state = sd.random_lora_state_dict(unet, ["to_q", "conv1"], 2, torch.Generator().manual_seed(0))
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in state)
    target = copy.deepcopy(unet)
    sd.load_lcm_lora(target, state, torch.float32)
    assert sum(f".{sd.LCM}." in n for n, _ in target.named_parameters()) == len(state)
    with pytest.raises(ValueError, match="fit no layer|not a LoRA"):
        bad = {k.replace("unet.", "unet.nowhere."): v for k, v in state.items()}
        sd.load_lcm_lora(copy.deepcopy(unet), bad, torch.float32)


def test_bfloat16_weights_keep_a_float32_policy(tiny):
    model, lcm = tiny
    cfg = tiny_sd_config(model, "unused", consistency=str(lcm), weights_dtype="bfloat16")
    task = sd.make_task(cfg)
    params = add_policy_lora(task.unet, task.lora_targets, 4, 4.0, 0)
    assert {p.dtype for p in params} == {torch.float32}
    frozen = [p for m in (task.unet, *task.frozen) for p in m.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16} and task.frozen[0].embeddings.dtype == torch.bfloat16
    method = SQDF(task, DDIMSchedule.build(task.scheduler_config, cfg.sample_steps), cfg)
    x, _, cond = inputs(task)
    loss, _ = method.loss(x, torch.tensor([0, 1]), cond, None, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in params) and any(p.grad.abs().sum() > 0 for p in params)
