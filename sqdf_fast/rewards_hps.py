"""`--reward hps`: Human Preference Score v2 / v2.1 (HPSv2), an open_clip ViT-H-14 fine-tuned on human preference
pairs, scoring how well an image fits its prompt as its authors do: the cosine similarity of the L2-normalised image
and text features (the diagonal of image_features @ text_features.T; no logit scale; their leaderboard prints it
x 100).

Needs the open_clip_torch package (`pip install 'sqdf_fast[rewards]'`), imported only when the reward is asked
for. The architecture is open_clip's own ViT-H-14 config (no download: `pretrained` is never used), the weights
are the published checkpoint (`reward_weights`):

    HPS_v2.1_compressed.pt      a file; or a folder holding HPS_v2.1_compressed.pt or HPS_v2_compressed.pt (the
                                first present), optionally with open_clip_config.json, open_clip's file for a
                                local model, whose "model_cfg" then gives the architecture instead of ViT-H-14

A checkpoint is a torch.save state dict of open_clip's CLIP, bare or as the training script saves it
({"state_dict": ..., "epoch": ...}, keys possibly prefixed "module."); every key and shape is checked against the
architecture (built on the meta device, no memory) before any network is built. Prompts are tokenised with
open_clip's ViT-H-14 tokenizer and encoded once per distinct prompt when the reward is built; the text tower is
then dropped. Images are fitted into the square as HPSv2's evaluation transform does (the longer side resized,
black padding: `clip_preprocess(..., fit="pad")`), once.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from sqdf_fast.rewards import ClipScoreReward, embed_prompts, load_state_file

HPS_ARCH = "ViT-H-14"
HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
OPEN_CLIP_CONFIG = "open_clip_config.json"


def import_open_clip():
    """The open_clip module; ValueError naming the package when it is missing or does not import."""
    try:
        import open_clip
    except ImportError as err:
        raise ValueError(f"reward 'hps' needs the open_clip_torch package ({err}): pip install "
                         "'sqdf_fast[rewards]' (or pip install open_clip_torch)") from err
    except Exception as err:   # e.g. a torchvision built for another torch: "operator torchvision::nms does not exist"
        raise ValueError(f"reward 'hps' needs the open_clip_torch package, which is installed but fails to import "
                         f"({type(err).__name__}: {err}); its torchvision must be the build made for the installed "
                         "torch") from err
    return open_clip


class HpsReward(ClipScoreReward):
    """HPSv2: cos(image features, text features of prompt cond) of the open_clip model; `vision` is its
    VisionTransformer (`model.visual`), the text features precomputed."""
    fit = "pad"

    def __init__(self, vision: nn.Module, text_embeds: Tensor, size: int):
        super().__init__(vision, text_embeds, scale=1.0, name="hps", size=size)

    def image_embeds(self, pixels: Tensor) -> Tensor:
        return self.vision(pixels)


def checkpoint_file(weights: str | Path) -> Path:
    path = Path(weights)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"reward_weights={str(weights)!r}: no such file or folder")
    for name in HPS_FILES:
        if (path / name).is_file():
            return path / name
    raise ValueError(f"reward_weights={str(weights)!r}: no HPS checkpoint there (one of {', '.join(HPS_FILES)})")


def model_config(weights: str | Path) -> tuple[dict, str]:
    """The architecture (open_clip's CLIP arguments: embed_dim, vision_cfg, text_cfg) and where it comes from: the
    model_cfg of the weights folder's open_clip_config.json, else open_clip's ViT-H-14 config."""
    path = Path(weights) / OPEN_CLIP_CONFIG
    if path.is_file():
        try:
            cfg = json.loads(path.read_text()).get("model_cfg")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"reward_weights: cannot read {path} as an open_clip config: {err}") from err
        if not isinstance(cfg, dict):
            raise ValueError(f"reward_weights: {path} has no \"model_cfg\" object (open_clip's local model config)")
        return cfg, str(path)
    open_clip = import_open_clip()
    cfg = open_clip.get_model_config(HPS_ARCH)
    if cfg is None:
        raise ValueError(f"reward 'hps': open_clip {open_clip.__version__} has no {HPS_ARCH} config")
    return cfg, f"open_clip's {HPS_ARCH}"


def image_size(cfg: dict) -> int:
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"reward 'hps': image_size {size} is not square")
        size = size[0]
    return int(size)


def build_model(cfg: dict, source: str, device: str | None = None) -> nn.Module:
    """open_clip's CLIP of `cfg`, randomly initialised (on the meta device: shapes only, no memory)."""
    open_clip = import_open_clip()
    try:
        with torch.device(device) if device else nullcontext():
            return open_clip.CLIP(**cfg)
    except (TypeError, ValueError, KeyError, AssertionError) as err:
        raise ValueError(f"reward 'hps': {source} is not a config open_clip's CLIP accepts: {err}") from err


def listed(keys: list[str]) -> str:
    return str(keys[:5])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > 5 else "]")


def check_hps(weights: str | Path) -> tuple[Path, dict, str, dict[str, Tensor]]:
    """(checkpoint path, architecture, its source, state dict), every key and shape checked: ValueError naming the
    file and the keys otherwise. The state dict is memory-mapped where the file allows (cheap for config.validate)."""
    path = checkpoint_file(weights)
    cfg, source = model_config(weights)
    expected = {key: tuple(value.shape) for key, value in build_model(cfg, source, "meta").state_dict().items()}
    tokenizer = import_open_clip().get_tokenizer(HPS_ARCH)
    vocab = cfg.get("text_cfg", {}).get("vocab_size")
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise ValueError(f"reward 'hps': {source} has a vocabulary of {vocab} tokens, {HPS_ARCH}'s tokenizer "
                         f"makes {tokenizer.vocab_size}")
    state = load_state_file(path)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"reward_weights: {path} is not a state dict of {source}: missing key(s) {listed(missing)}, "
                         f"unexpected key(s) {listed(unexpected)}")
    wrong = [f"{key} has shape {tuple(state[key].shape)}, expected {shape}" for key, shape in expected.items()
             if tuple(state[key].shape) != shape]
    if wrong:
        raise ValueError(f"reward_weights: {path} does not fit {source}: {'; '.join(wrong[:3])}"
                         + (f" ({len(wrong)} keys in all)" if len(wrong) > 3 else ""))
    return path, cfg, source, state


@torch.no_grad()
def load_hps(weights: str | Path, prompts: list[str], device: torch.device | str = "cpu") -> HpsReward:
    """The hps reward on the CPU, its prompts encoded on `device`."""
    _, cfg, source, state = check_hps(weights)
    model = build_model(cfg, source)
    model.load_state_dict(state)   # keys and shapes checked above
    del state
    model.requires_grad_(False).eval()
    tokenizer = import_open_clip().get_tokenizer(HPS_ARCH, context_length=model.context_length)
    visual, model.visual = model.visual, None   # only the text tower goes to `device`, and is dropped after
    model.to(device)
    embeds = embed_prompts(prompts, lambda batch: model.encode_text(tokenizer(batch).to(device)))
    return HpsReward(visual, embeds, image_size(cfg))
