"""pickscore on a tiny transformers CLIPModel with CLIP-H's activation (gelu), written in PickScore's published
layout (a CLIPModel folder without a tokenizer; the tokenizer from a separate folder) to tmp folders (offline):
values against the authors' rule by hand, gradients against finite differences, the weight-file layouts and the
errors."""
import math

import pytest
import torch
from safetensors.torch import save_file
from test_rewards import PROMPTS, images_01, normalise_by_hand, pixel_gradcheck, tiny_clip_config, write_tokenizer
from transformers import CLIPModel, CLIPTokenizer

from sqdf_fast import config
from sqdf_fast.rewards import build_reward

SCALE = 21.5   # exp(logit_scale) stored in the tiny checkpoint (PickScore's own learnt value is near 100)


def tiny_pickscore(seed=2) -> CLIPModel:
    cfg = tiny_clip_config(projection_dim=24)
    cfg.text_config.hidden_act = cfg.vision_config.hidden_act = "gelu"   # as laion/CLIP-ViT-H-14's config
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(SCALE))
    return model


def write_pickscore(root, layout="safetensors"):
    """WEIGHTS/ = the model folder (config.json + weights, no tokenizer) with tokenizer/ inside."""
    model = tiny_pickscore()
    if layout == "safetensors":
        model.save_pretrained(root)
    elif layout == "sharded":
        model.save_pretrained(root, max_shard_size="20KB")
    elif layout == "bin":
        model.config.save_pretrained(root)
        torch.save(model.state_dict(), root / "pytorch_model.bin")
    (root / "tokenizer").mkdir()
    write_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def pick_weights(tmp_path_factory):
    return write_pickscore(tmp_path_factory.mktemp("pickscore"))


def test_pickscore_is_the_scaled_cosine_of_its_authors(pick_weights):
    reward = build_reward("pickscore", weights=str(pick_weights), prompts=PROMPTS)
    assert reward.scale == pytest.approx(SCALE)   # read from the checkpoint's logit_scale
    images, cond = images_01(4), torch.tensor([3, 0, 2, 1])
    model = tiny_pickscore()
    tokenizer = CLIPTokenizer.from_pretrained(pick_weights / "tokenizer")
    # the authors' calc_probs: padding=True, truncation; scores = logit_scale.exp() * cos(text, image)
    tokens = tokenizer([PROMPTS[i] for i in cond], padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        got = reward(images, cond)
        image = model.visual_projection(model.vision_model(pixel_values=normalise_by_hand(images)).pooler_output)
        text = model.text_projection(model.text_model(input_ids=tokens.input_ids,
                                                      attention_mask=tokens.attention_mask).pooler_output)
    expected = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_pickscore_gradient(pick_weights):
    reward = build_reward("pickscore", weights=str(pick_weights), prompts=PROMPTS).double()
    pixel_gradcheck(reward, images_01(2, 24, 40), torch.tensor([1, 3]))


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_pickscore_weight_layouts(tmp_path, pick_weights, layout):
    """pytorch_model.bin (the published file) and sharded safetensors with an index give the same reward."""
    folder = write_pickscore(tmp_path, layout)
    assert (layout != "sharded") or (folder / "model.safetensors.index.json").is_file()
    images, cond = images_01(2), torch.tensor([0, 3])
    expected = build_reward("pickscore", weights=str(pick_weights), prompts=PROMPTS)(images, cond)
    torch.testing.assert_close(build_reward("pickscore", weights=str(folder), prompts=PROMPTS)(images, cond), expected)


def test_pickscore_errors_name_what_is_missing(tmp_path, pick_weights):
    def validate(weights):
        config.validate(config.TrainConfig(reward="pickscore", reward_weights=str(weights)))

    validate(pick_weights)
    no_scale = tmp_path / "no_scale"
    tiny_pickscore().config.save_pretrained(no_scale)
    save_file({k: v.contiguous() for k, v in tiny_pickscore().state_dict().items() if k != "logit_scale"},
              str(no_scale / "model.safetensors"))
    (no_scale / "tokenizer").symlink_to(pick_weights / "tokenizer")
    with pytest.raises(ValueError, match=r"no_scale/model.safetensors has no 'logit_scale'"):
        validate(no_scale)
    no_tokenizer = tmp_path / "no_tokenizer"
    tiny_pickscore().save_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match=r"no CLIP tokenizer in .*no_tokenizer or .*no_tokenizer/tokenizer"):
        build_reward("pickscore", weights=str(no_tokenizer), prompts=PROMPTS)
    with pytest.raises(ValueError, match="reward='pickscore' needs the task's prompts"):
        build_reward("pickscore", weights=str(pick_weights))
    with pytest.raises(ValueError, match="reward_weights=None: reward 'pickscore' needs a weights folder"):
        config.validate(config.TrainConfig(reward="pickscore"))
