"""The reward zoo on tiny CLIP models built from configs and saved to tmp folders (offline): values against hand
computations, gradients against finite differences, the weights layout and its errors, the trainer's wiring."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModel

from sqdf_fast import config, tasks
from sqdf_fast.memory import Checkpointed
from sqdf_fast.rewards import CLIP_MEAN, CLIP_STD, build_reward, clip_preprocess
from sqdf_fast.train import main, run

PROMPTS = ["a cat", "a dog", "a cat", "red fish"]   # indexed by cond; "a cat" twice
IMAGE = 32


def tiny_clip_config(projection_dim: int = 768) -> CLIPConfig:
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=projection_dim)
    text = dict(common, vocab_size=60, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(common, image_size=IMAGE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def write_tokenizer(folder) -> None:
    """A character-level CLIP BPE vocabulary (no merges): enough to tell the test prompts apart."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: 2 + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": 28 + i for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def laion_head_state(in_features: int = 768, seed: int = 0) -> dict:
    """A head in the published layout: the LAION MLP class holds this nn.Sequential as `layers`."""
    torch.manual_seed(seed)
    laion = nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                          nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return {"layers." + k: v for k, v in laion.state_dict().items()}


def make_weights(root, projection_dim: int = 768, head: dict | None = None, head_name: str = "aesthetic_head.pth"):
    torch.manual_seed(1)
    clip = root / "clip"
    CLIPModel(tiny_clip_config(projection_dim)).save_pretrained(clip)
    write_tokenizer(clip)
    state = laion_head_state() if head is None else head
    if head_name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / head_name))
    else:
        torch.save(state, root / head_name)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights(tmp_path_factory.mktemp("reward_weights"))


def normalise_by_hand(images):
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def images_01(n=2, h=IMAGE, w=IMAGE, seed=0, dtype=torch.float32):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 0.6 + 0.2


def pixel_gradcheck(reward, images, cond, n_pixels=6):
    """torch.autograd.gradcheck in float64 through the reward, varying a few pixels of `images`."""
    base = images.double()
    index = torch.randperm(base.numel(), generator=torch.Generator().manual_seed(3))[:n_pixels]

    def f(pixels):
        return reward(base.flatten().index_put((index,), pixels).view_as(base), cond)

    pixels = base.flatten()[index].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (pixels,), eps=1e-6, atol=1e-5, rtol=1e-4)


# --- preprocessing ---

def test_preprocess_at_size_only_normalises():
    x = torch.rand(2, 3, 224, 224)
    assert torch.equal(clip_preprocess(x), normalise_by_hand(x))
    small = torch.rand(1, 3, 20, 20)
    assert torch.equal(clip_preprocess(small, size=20), normalise_by_hand(small))


def test_preprocess_maps_0_1_range_and_crops_the_centre():
    """0 and 1 map to -mean/std and (1 - mean)/std; a wide image is resized on its short side and centre-cropped."""
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    for value, expected in ((0.0, -mean / std), (1.0, (1 - mean) / std)):
        out = clip_preprocess(torch.full((1, 3, 50, 70), value), size=32)
        torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand(1, 3, 32, 32))
    # columns 0..1 left to right, 40x80: the short side goes to 32, the long to 64, the centre 32 columns stay
    ramp = torch.linspace(0, 1, 80).expand(1, 3, 40, 80).contiguous()
    out = clip_preprocess(ramp, size=32) * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)   # back to [0, 1]
    assert out.shape == (1, 3, 32, 32)
    assert 0.24 < out[0, 0, 0, 0] < 0.27 and 0.73 < out[0, 0, 0, -1] < 0.76   # the middle half of the ramp
    assert clip_preprocess(torch.rand(1, 3, 64, 30), size=16).shape == (1, 3, 16, 16)


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="images: expected float \\(B, 3, H, W\\)"):
        clip_preprocess(torch.rand(2, 1, 16, 16))


def test_reward_rejects_images_in_minus_one_one(weights):
    reward = build_reward("aesthetic", weights=str(weights))
    with pytest.raises(ValueError, match=r"\[0, 1\].*x / 2 \+ 0.5"):
        reward(images_01() * 2 - 1, torch.zeros(2, dtype=torch.long))


# --- aesthetic ---

def test_aesthetic_equals_hand_computation(weights):
    reward = build_reward("aesthetic", weights=str(weights))
    assert isinstance(reward, nn.Module) and not reward.training
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not reward.training   # stays in eval mode
    images = images_01()
    vision = reward.vision
    with torch.no_grad():
        embeds = vision(pixel_values=normalise_by_hand(images)).image_embeds
        h = embeds / embeds.norm(dim=-1, keepdim=True)
        state = torch.load(weights / "aesthetic_head.pth", weights_only=True)
        for i in (0, 2, 4, 6, 7):   # Linear layers only, no nonlinearity (dropout is off in eval)
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        got = reward(images, torch.zeros(2, dtype=torch.long))
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, h.squeeze(-1))


def test_aesthetic_vision_matches_full_clip_model(weights):
    """The vision tower loaded on its own from a CLIPModel folder gives the CLIPModel's image embeddings."""
    reward = build_reward("aesthetic", weights=str(weights))
    full = CLIPModel.from_pretrained(weights / "clip").eval()
    pixels = normalise_by_hand(images_01())
    with torch.no_grad():
        vision_out = full.vision_model(pixel_values=pixels).pooler_output
        torch.testing.assert_close(reward.vision(pixel_values=pixels).image_embeds, full.visual_projection(vision_out))


def test_aesthetic_gradient_and_checkpointing(weights):
    reward = build_reward("aesthetic", weights=str(weights)).double()
    cond = torch.zeros(2, dtype=torch.long)
    pixel_gradcheck(reward, images_01(2, 24, 40), cond)   # non-square: through the resize and the crop
    images = images_01(2, 24, 40).requires_grad_(True)
    (plain,) = torch.autograd.grad(reward(images, cond).sum(), images)
    (checkpointed,) = torch.autograd.grad(Checkpointed(reward, True)(images, cond).sum(), images)   # as the sd task
    torch.testing.assert_close(checkpointed, plain)
    assert plain.abs().sum() > 0


def test_aesthetic_head_from_safetensors_and_published_name(tmp_path, weights):
    state = torch.load(weights / "aesthetic_head.pth", weights_only=True)
    reference = build_reward("aesthetic", weights=str(weights))
    images, cond = images_01(), torch.zeros(2, dtype=torch.long)
    for name in ("aesthetic_head.safetensors", "sac+logos+ava1-l14-linearMSE.pth"):
        root = tmp_path / name
        root.mkdir()
        (root / "clip").symlink_to(weights / "clip")
        if name.endswith(".safetensors"):
            save_file(state, str(root / name))
        else:
            torch.save(state, root / name)
        torch.testing.assert_close(build_reward("aesthetic", weights=str(root))(images, cond), reference(images, cond))


# --- clip-score ---

def test_clip_score_equals_cosine_by_hand_and_encodes_prompts_once(weights, monkeypatch):
    calls = []
    forward = CLIPTextModelWithProjection.forward
    monkeypatch.setattr(CLIPTextModelWithProjection, "forward",
                        lambda self, *a, **k: calls.append(k["input_ids"].shape[0]) or forward(self, *a, **k))
    reward = build_reward("clip-score", weights=str(weights), prompts=PROMPTS)
    assert calls == [3]   # one call, the 3 distinct prompts
    images, cond = images_01(4), torch.tensor([3, 0, 2, 1])
    with torch.no_grad():
        got = [reward(images, cond) for _ in range(3)]
    assert calls == [3]   # never again
    torch.testing.assert_close(got[0], got[2])
    full = CLIPModel.from_pretrained(weights / "clip").eval()
    tokenizer = CLIPTokenizer.from_pretrained(weights / "clip")   # the tiny vocabulary loads offline
    tokens = tokenizer([PROMPTS[i] for i in cond], padding="max_length", max_length=16, return_tensors="pt")
    assert len(set(map(tuple, tokens.input_ids.tolist()))) == 3   # the prompts tokenise differently
    with torch.no_grad():
        text = full.text_projection(full.text_model(input_ids=tokens.input_ids).pooler_output)
        image = full.visual_projection(full.vision_model(pixel_values=normalise_by_hand(images)).pooler_output)
    expected = 100 * torch.nn.functional.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(reward.text_embeds[0], reward.text_embeds[2])   # the same prompt, the same row


def test_clip_score_gradient(weights):
    reward = build_reward("clip-score", weights=str(weights), prompts=PROMPTS).double()
    pixel_gradcheck(reward, images_01(2, 20, 28), torch.tensor([1, 3]))


def test_clip_score_needs_prompts_and_integer_cond(weights):
    with pytest.raises(ValueError, match="prompts"):
        build_reward("clip-score", weights=str(weights), prompts=None)
    reward = build_reward("clip-score", weights=str(weights), prompts=PROMPTS)
    with pytest.raises(ValueError, match="cond: clip-score needs \\(B,\\) integer prompt indices"):
        reward(images_01(), torch.zeros(2))


# --- digits, task, module:function ---

def test_digits_reward_is_the_task_reward_with_a_gradient():
    from sqdf_fast.tasks import digits
    task = digits.make_task(config.TrainConfig())
    reward = build_reward("digits")
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = torch.arange(4)
    torch.testing.assert_close(reward(images, cond), task.reward(images, cond))
    assert build_reward(None, task_reward=task.reward) is task.reward
    assert build_reward("task", task_reward=task.reward) is task.reward
    pixel_gradcheck(reward.double(), images, cond)


def test_module_function_reward():
    import rewards_for_tests
    assert build_reward("rewards_for_tests:always_nan") is rewards_for_tests.always_nan
    with pytest.raises(ValueError, match="reward: cannot load 'rewards_for_tests:nope'"):
        build_reward("rewards_for_tests:nope")


# --- tasks.build: the reward resolved into the task ---

def test_build_puts_the_named_reward_into_the_task():
    import rewards_for_tests

    from sqdf_fast.tasks.digits import BoldnessReward
    own = tasks.build(config.TrainConfig(), torch.device("cpu"))
    assert isinstance(own.reward, BoldnessReward) and own.reward.classifier in own.frozen
    task = tasks.build(config.TrainConfig(reward="digits"), torch.device("cpu"))
    assert isinstance(task.reward, BoldnessReward) and task.reward.classifier not in task.frozen
    assert task.frozen[-1] is task.reward and len(task.frozen) == len(own.frozen) + 1   # moves with the task
    plain = tasks.build(config.TrainConfig(reward="rewards_for_tests:image_mean"), torch.device("cpu"))
    # a user's reward is checked at each call (tasks.CheckedReward) around the function itself
    assert plain.reward.fn is rewards_for_tests.image_mean and len(plain.frozen) == len(own.frozen)


def test_build_checks_what_the_metrics_need():
    cfg = config.TrainConfig(task="rewards_for_tests:digits_without_features")
    with pytest.raises(ValueError, match="task='rewards_for_tests:digits_without_features' provides no features: "
                                         "the metrics need them"):
        tasks.build(cfg, torch.device("cpu"))


# --- errors ---

def test_unknown_reward_name():
    with pytest.raises(ValueError, match="reward='aesthetics': unknown reward; built-in: task, digits"):
        build_reward("aesthetics")


def test_weights_errors(tmp_path, weights):
    with pytest.raises(ValueError, match="reward_weights=None: reward 'aesthetic' needs a weights folder"):
        build_reward("aesthetic")
    with pytest.raises(ValueError, match="no such folder"):
        build_reward("aesthetic", weights=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no CLIP model there"):
        build_reward("clip-score", weights=str(tmp_path / "empty"), prompts=PROMPTS)
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "clip").symlink_to(weights / "clip")
    with pytest.raises(ValueError, match="no aesthetic head file there"):
        build_reward("aesthetic", weights=str(headless))


def test_head_shape_and_layout_errors(tmp_path, weights):
    def with_head(name, state):
        root = tmp_path / name
        root.mkdir()
        (root / "clip").symlink_to(weights / "clip")
        torch.save(state, root / "aesthetic_head.pth")
        return str(root)

    wrong = laion_head_state()
    wrong["layers.2.weight"] = torch.zeros(100, 1024)
    with pytest.raises(ValueError, match=r"layers\.2\.weight has shape \(100, 1024\), expected \(128, 1024\)"):
        build_reward("aesthetic", weights=with_head("wrong", wrong))
    relu_indices = {k.replace("layers.7", "layers.8"): v for k, v in laion_head_state().items()}
    with pytest.raises(ValueError, match=r"missing key\(s\) \['layers\.7\.bias', 'layers\.7\.weight'\]"):
        build_reward("aesthetic", weights=with_head("layout", relu_indices))
    with pytest.raises(ValueError, match="makes 768-d image embeddings but the aesthetic head .* takes 512-d"):
        build_reward("aesthetic", weights=with_head("narrow", laion_head_state(in_features=512)))
    with pytest.raises(ValueError, match="cannot read .* as a state dict"):
        build_reward("aesthetic", weights=with_head("pickled", {"layers": nn.Linear(2, 2)}))   # a pickled module


def test_clip_projection_mismatch_and_missing_projection(tmp_path):
    small = make_weights(tmp_path / "small", projection_dim=64)
    with pytest.raises(ValueError, match="makes 64-d image embeddings but the aesthetic head .* takes 768-d"):
        build_reward("aesthetic", weights=str(small))
    # a vision tower without its projection: transformers would initialise visual_projection at random
    bare = tmp_path / "bare"
    CLIPVisionModel(tiny_clip_config().vision_config).save_pretrained(bare / "clip")
    torch.save(laion_head_state(), bare / "aesthetic_head.pth")
    with pytest.raises(ValueError, match="lacks weights CLIPVisionModelWithProjection needs: visual_projection"):
        build_reward("aesthetic", weights=str(bare))
    with pytest.raises(ValueError, match="clip-score needs a full CLIPModel"):
        build_reward("clip-score", weights=str(bare), prompts=PROMPTS)


def test_config_validate_checks_rewards_before_work(tmp_path, weights):
    def validate(**values):
        config.validate(config.TrainConfig(**values))

    validate(reward="aesthetic", reward_weights=str(weights))
    validate(reward="clip-score", reward_weights=str(weights))
    validate(reward="digits")
    validate(reward="my_module:my_reward")
    with pytest.raises(ValueError, match="reward='aesthetics': unknown reward"):
        validate(reward="aesthetics")
    with pytest.raises(ValueError, match="reward_weights=None"):
        validate(reward="clip-score")
    with pytest.raises(ValueError, match="reward_weights=.*no such folder"):
        validate(reward_weights=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="no reward.safetensors there"):
        validate(reward="digits", reward_weights=str(weights))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "clip").symlink_to(weights / "clip")
    head = laion_head_state()
    head["layers.6.bias"] = torch.zeros(17)
    torch.save(head, wrong / "aesthetic_head.pth")
    with pytest.raises(ValueError, match=r"layers\.6\.bias has shape \(17,\), expected \(16,\)"):
        validate(reward="aesthetic", reward_weights=str(wrong))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="error: reward_weights=None"):
        main(["--reward", "aesthetic", "--out", str(out), "--no-progress"])
    assert not out.exists()   # stopped before anything was written


def test_digits_reward_through_the_trainer(tmp_path):
    from sqdf_fast.tasks.digits import WEIGHTS_DIR
    cfg = config.TrainConfig(out=str(tmp_path / "run"), steps=1, batch_size=4, rollout_batch=4, buffer_size=4,
                             sample_steps=3, eval_per_class=2, log_every=1, checkpoint_every=1, progress=False,
                             reward="digits", reward_weights=str(WEIGHTS_DIR))
    config.validate(cfg)
    summary = run(cfg)
    assert summary["steps"] == 1 and torch.isfinite(torch.tensor(summary["reward_final"]))
