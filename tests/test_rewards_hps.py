"""hps (HPSv2) on a tiny open_clip CLIP of ViT-H-14's architecture (its config with smaller widths), written in the
published checkpoint layouts to tmp folders (offline): values against open_clip's own forward, gradients against
finite differences, the key layouts and every error before any work. The tests that build the model need the
open_clip_torch package (`pip install 'sqdf_fast[rewards]'`) and are skipped without it; the padding preprocessing
and the missing-package message are tested everywhere."""
import copy
import json
import sys

import pytest
import torch
from test_rewards import PROMPTS, images_01, normalise_by_hand, pixel_gradcheck

from sqdf_fast import config
from sqdf_fast.memory import Checkpointed
from sqdf_fast.rewards import CLIP_MEAN, CLIP_STD, build_reward, clip_preprocess


def open_clip_or_skip():
    try:
        import open_clip
    except Exception as err:   # absent (CI installs the test extra only), or a torchvision built for another torch
        pytest.skip(f"open_clip_torch does not import here ({type(err).__name__}: {err}); pip install "
                    "'sqdf_fast[rewards]' with a torchvision matching torch")
    return open_clip


SIZE = 28   # the tiny model's image size (two 14-pixel patches a side, as ViT-H-14's patches)


def tiny_config(open_clip) -> dict:
    """open_clip's ViT-H-14 config with every size made small; the vocabulary stays the real tokenizer's."""
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-H-14"))
    cfg["embed_dim"] = 16
    cfg["vision_cfg"].update(image_size=SIZE, layers=2, width=32, head_width=16)
    cfg["text_cfg"].update(context_length=16, width=32, heads=2, layers=2)
    return cfg


def tiny_model(open_clip, seed=0):
    torch.manual_seed(seed)
    return open_clip.CLIP(**tiny_config(open_clip)).eval()


def write_hps(folder, open_clip, state=None, name="HPS_v2.1_compressed.pt", **save):
    """A weights folder: open_clip_config.json (the tiny architecture) and a checkpoint as HPSv2's training script
    saves it, {"state_dict": ...} (the published HPS_v2*_compressed.pt files)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config(open_clip)}))
    torch.save({"state_dict": tiny_model(open_clip).state_dict() if state is None else state}, folder / name, **save)
    return folder


@pytest.fixture(scope="module")
def open_clip():
    return open_clip_or_skip()


@pytest.fixture(scope="module")
def hps_weights(tmp_path_factory, open_clip):
    return write_hps(tmp_path_factory.mktemp("hps"), open_clip)


# --- preprocessing (no open_clip needed) ---

def test_pad_fits_the_longer_side_and_pads_black_centred():
    """HPSv2's evaluation transform: the longer side to `size`, black bars around the centred image; an odd margin
    puts the extra row after the image."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1), torch.tensor(CLIP_STD).view(3, 1)
    out = clip_preprocess(torch.ones(1, 3, 27, 40), size=16, fit="pad")   # 27 x 0.4 = 10.8 -> 11 rows, 5 padded
    assert out.shape == (1, 3, 16, 16)
    black, white = (-mean / std).expand(3, 16), ((1 - mean) / std).expand(3, 16)
    for row in range(16):
        expected = white if 2 <= row < 13 else black
        torch.testing.assert_close(out[0, :, row], expected)
    tall = clip_preprocess(torch.ones(1, 3, 40, 20), size=16, fit="pad")   # 8 columns of image, 4 black each side
    torch.testing.assert_close(tall[0, :, :, 4:12], ((1 - mean) / std).view(3, 1, 1).expand(3, 16, 8))
    torch.testing.assert_close(tall[0, :, :, :4], (-mean / std).view(3, 1, 1).expand(3, 16, 4))
    square = torch.rand(2, 3, 16, 16)
    assert torch.equal(clip_preprocess(square, 16, fit="pad"), normalise_by_hand(square))
    with pytest.raises(ValueError, match="fit='stretch': must be crop or pad"):
        clip_preprocess(square, 16, fit="stretch")


def test_hps_names_the_missing_package(tmp_path, monkeypatch):
    """Without open_clip_torch the project imports and runs; asking for hps says which package to install, before
    any work (config.validate)."""
    monkeypatch.setitem(sys.modules, "open_clip", None)   # import open_clip raises ImportError
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {}}, checkpoint)
    message = r"reward 'hps' needs the open_clip_torch package .*pip install 'sqdf_fast\[rewards\]'"
    with pytest.raises(ValueError, match=message):
        build_reward("hps", weights=str(checkpoint), prompts=PROMPTS)
    with pytest.raises(ValueError, match=message):
        config.validate(config.TrainConfig(reward="hps", reward_weights=str(checkpoint)))
    with pytest.raises(ValueError, match=r"reward_weights=None: reward 'hps' needs a checkpoint file or folder"):
        config.validate(config.TrainConfig(reward="hps"))
    assert build_reward("digits") is not None   # the other rewards do not need it


# --- the model (open_clip) ---

def test_tiny_model_has_vit_h_14_architecture(open_clip):
    """Same config keys as open_clip's ViT-H-14 and the same state-dict keys up to the number of blocks."""
    real = open_clip.get_model_config("ViT-H-14")
    tiny = tiny_config(open_clip)
    assert tiny.keys() == real.keys() and all(tiny[k].keys() == real[k].keys() for k in ("vision_cfg", "text_cfg"))
    with torch.device("meta"):
        big = open_clip.CLIP(**real)

    def layout(model):
        return {k for k in model.state_dict() if ".resblocks." not in k or ".resblocks.0." in k}

    assert layout(big) == layout(tiny_model(open_clip))


def test_hps_equals_open_clip_scoring_and_encodes_prompts_once(hps_weights, open_clip, monkeypatch):
    calls = []
    encode = open_clip.CLIP.encode_text
    monkeypatch.setattr(open_clip.CLIP, "encode_text", lambda self, text, **k: calls.append(text.shape[0])
                        or encode(self, text, **k))
    reward = build_reward("hps", weights=str(hps_weights), prompts=PROMPTS)
    assert calls == [3]   # the 3 distinct prompts, once
    assert not hasattr(reward.vision, "token_embedding") and not reward.training
    assert not any(p.requires_grad for p in reward.parameters())
    images, cond = images_01(4, SIZE, SIZE), torch.tensor([3, 0, 2, 1])
    with torch.no_grad():
        got = reward(images, cond)
        assert calls == [3]
        # the authors' rule with open_clip's own forward: diag(image_features @ text_features.T), both normalised
        model = tiny_model(open_clip)
        tokens = open_clip.get_tokenizer("ViT-H-14", context_length=16)([PROMPTS[i] for i in cond])
        image_features, text_features, _ = model(normalise_by_hand(images), tokens)
        expected = (image_features @ text_features.T).diagonal()
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(reward.text_embeds[0], reward.text_embeds[2])


def test_hps_gradient_through_padding_and_checkpointing(hps_weights):
    reward = build_reward("hps", weights=str(hps_weights), prompts=PROMPTS).double()
    cond = torch.tensor([1, 3])
    pixel_gradcheck(reward, images_01(2, 20, 34), cond)   # non-square: resized and padded
    images = images_01(2, 20, 34).requires_grad_(True)
    (plain,) = torch.autograd.grad(reward(images, cond).sum(), images)
    (checkpointed,) = torch.autograd.grad(Checkpointed(reward, True)(images, cond).sum(), images)
    torch.testing.assert_close(checkpointed, plain)
    assert plain.abs().sum() > 0


def test_hps_published_key_layouts(tmp_path, hps_weights, open_clip):
    """A DistributedDataParallel training checkpoint ("module." keys, with epoch and optimizer), a bare state dict,
    HPS_v2_compressed.pt, and the legacy (pre-zip) torch.save format all give the same reward."""
    state = tiny_model(open_clip).state_dict()
    reference = build_reward("hps", weights=str(hps_weights), prompts=PROMPTS)
    images, cond = images_01(2, SIZE, SIZE), torch.tensor([0, 3])
    expected = reference(images, cond)
    layouts = {
        "ddp": ("HPS_v2.1_compressed.pt", {"epoch": 3, "name": "run", "optimizer": {"state": {}, "param_groups": []},
                                           "state_dict": {"module." + k: v for k, v in state.items()}}, {}),
        "bare": ("HPS_v2_compressed.pt", state, {}),
        "legacy": ("HPS_v2_compressed.pt", {"state_dict": state}, {"_use_new_zipfile_serialization": False}),
    }
    for label, (name, saved, save) in layouts.items():
        folder = tmp_path / label
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_config(open_clip)}))
        torch.save(saved, folder / name, **save)
        torch.testing.assert_close(build_reward("hps", weights=str(folder), prompts=PROMPTS)(images, cond), expected)


def test_hps_errors_name_the_file_key_and_shape(tmp_path, hps_weights, open_clip):
    state = tiny_model(open_clip).state_dict()
    no_proj = {k: v for k, v in state.items() if k != "visual.proj"}
    with pytest.raises(ValueError, match=r"HPS_v2.1_compressed.pt is not a state dict of .*open_clip_config.json: "
                                         r"missing key\(s\) \['visual.proj'\], unexpected key\(s\) \[\]"):
        build_reward("hps", weights=str(write_hps(tmp_path / "missing", open_clip, no_proj)), prompts=PROMPTS)
    extra = dict(state, score_head=torch.zeros(3))
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['score_head'\]"):
        build_reward("hps", weights=str(write_hps(tmp_path / "extra", open_clip, extra)), prompts=PROMPTS)
    wide = dict(state, text_projection=torch.zeros(32, 20))
    with pytest.raises(ValueError, match=r"does not fit .*: text_projection has shape \(32, 20\), expected \(32, 16\)"):
        build_reward("hps", weights=str(write_hps(tmp_path / "wide", open_clip, wide)), prompts=PROMPTS)
    # a bare file is taken for the published ViT-H-14 (32 + 24 blocks): the tiny weights lack most, named before
    # any work
    with pytest.raises(ValueError, match=r"is not a state dict of open_clip's ViT-H-14: missing key\(s\) "
                                         r"\['transformer.resblocks.10.attn.in_proj_bias', .*\.\.\. \(624 in all\)\]"):
        config.validate(config.TrainConfig(reward="hps",
                                           reward_weights=str(hps_weights / "HPS_v2.1_compressed.pt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no HPS checkpoint there \\(one of HPS_v2.1_compressed.pt, "
                                         "HPS_v2_compressed.pt\\)"):
        build_reward("hps", weights=str(tmp_path / "empty"), prompts=PROMPTS)
    with pytest.raises(ValueError, match="reward_weights=.*absent.*: no such file or folder"):
        config.validate(config.TrainConfig(reward="hps", reward_weights=str(tmp_path / "absent")))
    bad = write_hps(tmp_path / "bad", open_clip)
    (bad / "open_clip_config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(ValueError, match="open_clip_config.json has no \"model_cfg\" object"):
        build_reward("hps", weights=str(bad), prompts=PROMPTS)
    with pytest.raises(ValueError, match="reward='hps' needs the task's prompts"):
        build_reward("hps", weights=str(hps_weights), prompts=None)
