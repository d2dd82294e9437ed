"""The reward zoo: differentiable rewards of images behind one interface, picked by name (`--reward NAME`).

The interface. A reward is a callable `reward(images, cond) -> (B,)` float32, differentiable in `images`:
- `images`: (B, 3, H, W) floats in **[0, 1]** (what a VAE-decoding task returns after its one `x / 2 + 0.5`). The
  image rewards here do their own CLIP preprocessing (resize, crop or pad, mean/std normalisation) exactly once,
  inside the reward, through `clip_preprocess`. The authors' code maps [0, 1] images through `x / 2 + 0.5` a second
  time, so their rewards see washed-out images in [0.5, 1] (docs/method.md §9.1); that is not replicated. A task's own
  reward (e.g. digits, whose images are in [-1, 1]) takes images as that task's `decode` returns them.
- `cond`: (B,) conditions as the task draws them; for text-conditioned tasks long indices into the task's
  `prompts` list.

Built-in rewards are frozen `nn.Module`s in eval mode (requires_grad False), so they move to the device with the
task's other frozen networks. Gradient checkpointing is the task's: an sd task runs whatever reward it has through
`sqdf_fast.memory.Checkpointed` (`checkpoint_reward`).

Names for `build_reward` (`--reward`, with `--reward-weights PATH`; `sqdf_fast.tasks.build` resolves it):
- unset or `task`: the task's own reward;
- `digits`: the digits task's boldness reward log p(bold | x) (images (B, 1, 16, 16) in [-1, 1]), from
  `reward_weights` (a digits weights folder holding reward.safetensors) or the shipped weights;
- `aesthetic`: the LAION aesthetic predictor: CLIP ViT-L/14 image embeddings, L2-normalised, through the LAION
  MLP head (sac+logos+ava1-l14-linearMSE.pth). `reward_weights` is a folder laid out as

      WEIGHTS/
        clip/                  a transformers CLIP folder (config.json + model.safetensors or pytorch_model.bin),
                               e.g. a download of openai/clip-vit-large-patch14; a CLIPModel or a
                               CLIPVisionModelWithProjection. Without clip/, WEIGHTS itself is the CLIP folder.
        aesthetic_head.safetensors | aesthetic_head.pth | sac+logos+ava1-l14-linearMSE.pth
                               the head, first of these names present; keys layers.{0,2,4,6,7}.{weight,bias}

- `clip-score`: 100 x the cosine similarity between the CLIP image embedding and the CLIP text embedding of the
  sample's prompt (torchmetrics' CLIPScore scale, without its clamp at 0, which would zero the gradient).
  `reward_weights` is a CLIP folder (a CLIPModel with its tokenizer files, or with them in WEIGHTS/tokenizer/) or
  a folder holding one as clip/. The text embedding of each distinct prompt is computed once when the reward is
  built; the text model is then dropped.
- `pickscore`: PickScore, its authors' rule: exp(logit_scale) x the cosine similarity of the image and prompt
  embeddings of their fine-tuned CLIP-H (a transformers CLIPModel, e.g. a download of yuvalkirstain/PickScore_v1;
  logit_scale read from its weights). `reward_weights` as for clip-score; PickScore's model folder has no tokenizer:
  put laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer files in WEIGHTS/tokenizer/.
- `hps`: HPSv2 / v2.1 on open_clip's ViT-H-14 (the optional open_clip_torch package); `sqdf_fast.rewards_hps`.
- `module:function`: your own callable `(images, cond) -> (B,)`.
- `NAME=W,NAME=W,...` (names above): the weighted sum of those rewards (`RewardSum`), each built once, with
  `reward_weights` `NAME=PATH,NAME=PATH,...` for the terms that take weights (paths without commas). The
  trainer's evaluation logs each term (`reward_terms`).
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reward = Callable[[Tensor, Tensor], Tensor]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BUILTIN_REWARDS = ("task", "digits", "aesthetic", "clip-score", "pickscore", "hps")
NEEDS_WEIGHTS = ("aesthetic", "clip-score", "pickscore", "hps")
CLIP_SUBFOLDER = "clip"
TOKENIZER_SUBFOLDER = "tokenizer"
HEAD_FILES = ("aesthetic_head.safetensors", "aesthetic_head.pth", "sac+logos+ava1-l14-linearMSE.pth")
# The LAION head: Linear(in, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
# Linear(16, 1); no nonlinearities. Indices of the Linear layers in that nn.Sequential, with their output sizes.
HEAD_LINEARS = {0: 1024, 2: 128, 4: 64, 6: 16, 7: 1}
TEXT_BATCH = 64   # prompts encoded per text-model call at build time
# A [0, 1] image never goes this far below 0; a [-1, 1] image with any dark pixel does.
RANGE_FLOOR = -0.5


def clip_preprocess(images: Tensor, size: int = 224, fit: str = "crop") -> Tensor:
    """CLIP's input from images in [0, 1], then (x - mean) / std with CLIP's mean and std. `fit` says how an image
    becomes size x size: "crop" (CLIPImageProcessor, torchvision's Resize + CenterCrop): bilinear resize
    (antialiased) of the shorter side to `size`, centre crop; "pad" (HPSv2's evaluation transform): resize of the
    longer side to `size`, the rest padded with black (0, before the normalisation), the image centred.
    Differentiable; an image already size x size is only normalised. Reads no tensor value (no host sync): the
    [0, 1] range is the caller's contract."""
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images: expected float (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit={fit!r}: must be crop or pad")
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        if fit == "crop":
            short, long = min(height, width), max(height, width)
            scaled = (size, int(size * long / short))    # torchvision's and CLIPImageProcessor's rounding
            new_hw = scaled if height <= width else scaled[::-1]
        else:
            scale = size / max(height, width)
            new_hw = (round(height * scale), round(width * scale))
        if (height, width) != new_hw:
            images = F.interpolate(images, size=new_hw, mode="bilinear", align_corners=False, antialias=True)
        if fit == "crop":
            top, left = round((new_hw[0] - size) / 2), round((new_hw[1] - size) / 2)
            images = images[..., top:top + size, left:left + size]
        else:
            pad_h, pad_w = size - new_hw[0], size - new_hw[1]
            images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


class FrozenReward(nn.Module):
    """A reward network: frozen, always in eval mode, checking its images' range once. Subclasses implement
    `score`."""

    def __init__(self):
        super().__init__()
        self.range_checked = False

    def freeze(self) -> "FrozenReward":
        return self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FrozenReward":
        return super().train(False)   # a reward never trains (no dropout, frozen statistics)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def check_range(self, images: Tensor) -> None:
        """Once per reward (one host sync): stop on images that are clearly in [-1, 1] rather than [0, 1]."""
        if self.range_checked:
            return
        low = float(images.detach().min())
        if low < RANGE_FLOOR:
            raise ValueError(f"images: values down to {low:.3g}; rewards take images in [0, 1] (map [-1, 1] "
                             "images once with x / 2 + 0.5)")
        self.range_checked = True

    def score(self, images: Tensor, cond: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        self.check_range(images)
        return self.score(images, cond)


class AestheticHead(nn.Module):
    """The LAION aesthetic MLP, in the published layout (state-dict keys layers.{0,2,4,6,7})."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds).squeeze(-1)


def normalized(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def at_least_float32(x: Tensor) -> Tensor:
    """float32 out of a bf16/fp16 reward network; float64 stays float64 (gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class AestheticReward(FrozenReward):
    """LAION aesthetic score: head(normalise(CLIP image embedding of clip_preprocess(images)))."""

    def __init__(self, vision: nn.Module, head: AestheticHead):
        super().__init__()
        self.vision, self.head = vision, head
        self.size = vision.config.image_size
        self.freeze()

    def embed(self, images: Tensor) -> Tensor:
        """The L2-normalised CLIP image embedding the head scores (also a feature for the metrics)."""
        return normalized(self.vision(pixel_values=clip_preprocess(images.to(self.dtype), self.size)).image_embeds)

    def score(self, images: Tensor, cond: Tensor) -> Tensor:
        return at_least_float32(self.head(self.embed(images)))


class ClipScoreReward(FrozenReward):
    """scale x cos(image embedding of clip_preprocess(images), text embedding of prompt cond), the text embeddings
    precomputed: clip-score (scale 100), pickscore (the model's exp(logit_scale)) and, through `HpsReward`, hps.
    `vision` is a transformers CLIPVisionModelWithProjection; subclasses with another vision tower override
    `image_embeds`."""
    fit = "crop"

    def __init__(self, vision: nn.Module, text_embeds: Tensor, scale: float = 100.0, name: str = "clip-score",
                 size: int | None = None):
        super().__init__()
        self.vision, self.scale, self.name = vision, float(scale), name
        self.size = vision.config.image_size if size is None else size
        self.register_buffer("text_embeds", normalized(text_embeds.to(self.dtype)), persistent=False)
        self.freeze()

    def image_embeds(self, pixels: Tensor) -> Tensor:
        return self.vision(pixel_values=pixels).image_embeds

    def score(self, images: Tensor, cond: Tensor) -> Tensor:
        if cond.is_floating_point() or cond.dim() != 1:
            raise ValueError(f"cond: {self.name} needs (B,) integer prompt indices, got {tuple(cond.shape)} "
                             f"{cond.dtype}")
        embeds = normalized(self.image_embeds(clip_preprocess(images.to(self.dtype), self.size, self.fit)))
        return at_least_float32(self.scale * (embeds * self.text_embeds[cond]).sum(-1))


class RewardSum(nn.Module):
    """`--reward NAME=W,NAME=W,...`: sum_k W_k r_k(images, cond). Each term is built once; the unweighted values of
    each term at the last call are kept (`last_terms`, detached) so the trainer's evaluation logs them one by one
    (`reward_terms`). Reward networks among the terms are submodules: they move and cast with the sum."""

    def __init__(self, terms: list[tuple[str, float, Reward]]):
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.weights = [weight for _, weight, _ in terms]
        self.rewards = [fn for _, _, fn in terms]
        self.networks = nn.ModuleList([fn for fn in self.rewards if isinstance(fn, nn.Module)])
        self.last_terms: dict[str, Tensor] = {}
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "RewardSum":
        return super().train(False)   # a reward never trains

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        values = [fn(images, cond) for fn in self.rewards]
        self.last_terms = {name: value.detach() for name, value in zip(self.names, values)}
        return sum(weight * value for weight, value in zip(self.weights, values))


def reward_terms(reward: Reward) -> dict[str, Tensor]:
    """The per-term values (B,) of a `RewardSum`'s last call, through the wrappers a task puts around its reward
    (objects holding it as `fn`, e.g. sqdf_fast.memory.Checkpointed); {} for any other reward."""
    while reward is not None and not isinstance(reward, RewardSum):
        reward = getattr(reward, "fn", None)
    return {} if reward is None else dict(reward.last_terms)


# --- weights: folder layout, checks (cheap, for config.validate) and loading ---

def clip_folder(weights: str | Path, what: str = "reward_weights") -> Path:
    """The CLIP folder inside `weights`: its clip/ subfolder, or `weights` itself when that holds config.json."""
    root = Path(weights)
    if not root.is_dir():
        raise ValueError(f"{what}={str(weights)!r}: no such folder")
    for folder in (root / CLIP_SUBFOLDER, root):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"{what}={str(weights)!r}: no CLIP model there (expected {CLIP_SUBFOLDER}/config.json or "
                     "config.json, a transformers CLIP folder)")


def clip_configs(folder: Path):
    """(vision config, text config or None) of a CLIP folder, each with the projection size its stored weights
    have: in a CLIPModel folder that is the top-level projection_dim, which transformers does not copy into the
    sub-configs."""
    from transformers import CLIPConfig, CLIPVisionConfig
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type == "clip":
        config = CLIPConfig.from_pretrained(folder)
        config.vision_config.projection_dim = config.text_config.projection_dim = config.projection_dim
        return config.vision_config, config.text_config
    if model_type == "clip_vision_model":
        return CLIPVisionConfig.from_pretrained(folder), None
    raise ValueError(f"reward_weights: {folder / 'config.json'} is a {model_type!r} config, not a CLIP model "
                     "(model_type clip or clip_vision_model)")


def head_file(weights: str | Path) -> Path:
    root = Path(weights)
    for name in HEAD_FILES:
        if (root / name).is_file():
            return root / name
    raise ValueError(f"reward_weights={str(weights)!r}: no aesthetic head file there (one of {', '.join(HEAD_FILES)})")


def load_state_file(path: Path, what: str = "reward_weights") -> dict[str, Tensor]:
    """A state dict from a .safetensors file or a torch.save file (weights_only=True; memory-mapped where the format
    allows, so reading keys and shapes costs little). A training checkpoint's {"state_dict": ...} is unwrapped and
    DistributedDataParallel's "module." key prefix dropped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)   # the legacy (pre-zip) format
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:   # e.g. a whole pickled model, not weights
        raise ValueError(f"{what}: cannot read {path} as a state dict (torch.load, weights_only=True): "
                         f"{err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__} that is not a state dict (names to tensors)")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def check_head_state(state: dict[str, Tensor], path: Path) -> int:
    """The head's input size; ValueError naming the key when `state` is not the LAION layout."""
    expected = {}
    in_features = state["layers.0.weight"].shape[-1] if "layers.0.weight" in state else 768
    size = in_features
    for index, out in HEAD_LINEARS.items():
        expected[f"layers.{index}.weight"], expected[f"layers.{index}.bias"] = (out, size), (out,)
        size = out
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"reward_weights: aesthetic head {path}: missing key(s) {missing}, unexpected key(s) "
                         f"{unexpected}; expected the LAION layout layers.{{0,2,4,6,7}}.{{weight,bias}}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"reward_weights: aesthetic head {path}: {key} has shape {tuple(state[key].shape)}, "
                             f"expected {shape}")
    return in_features


def check_projection(projection_dim: int, in_features: int, folder: Path, path: Path) -> None:
    if projection_dim != in_features:
        raise ValueError(f"reward_weights: the CLIP model in {folder} makes {projection_dim}-d image embeddings but "
                         f"the aesthetic head {path} takes {in_features}-d input (layers.0.weight)")


def tokenizer_folder(folder: Path, weights: str | Path) -> Path:
    """The CLIP tokenizer's folder: the CLIP folder itself, or WEIGHTS/tokenizer (PickScore's published model folder
    has no tokenizer; its authors take laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)."""
    for candidate in (folder, Path(weights) / TOKENIZER_SUBFOLDER):
        if any((candidate / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            return candidate
    raise ValueError(f"reward_weights={str(weights)!r}: no CLIP tokenizer in {folder} or "
                     f"{Path(weights) / TOKENIZER_SUBFOLDER} (tokenizer.json or vocab.json + merges.txt)")


def read_weight(folder: Path, key: str) -> Tensor:
    """One tensor of a transformers model folder's weights (model.safetensors or pytorch_model.bin, whole or sharded
    with its index), read without loading the model."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        path, index = folder / name, folder / f"{name}.index.json"
        if not path.is_file() and index.is_file():
            shard = json.loads(index.read_text()).get("weight_map", {}).get(key)
            if shard is None:
                raise ValueError(f"reward_weights: {index} lists no {key!r}")
            path = folder / shard
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), "pt") as file:
                if key in file.keys():
                    return file.get_tensor(key)
        else:
            state = load_state_file(path)
            if key in state:
                return state[key]
        raise ValueError(f"reward_weights: {path} has no {key!r}")
    raise ValueError(f"reward_weights: no weights in {folder} (model.safetensors or pytorch_model.bin, or their "
                     ".index.json)")


def parse_sum(spec: str | None) -> list[tuple[str, float]] | None:
    """The (name, weight) terms of a weighted sum `NAME=W,NAME=W,...` (names built in or module:function), each
    name once; None when `spec` is a single reward."""
    if spec is None or "=" not in spec:
        return None
    terms: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, equals, weight = (x.strip() for x in part.partition("="))
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not equals or not name or not math.isfinite(value):
            raise ValueError(f"reward={spec!r}: a weighted sum is NAME=WEIGHT,NAME=WEIGHT,... with finite weights "
                             f"(e.g. aesthetic=1,hps=0.5); {part.strip()!r} is not NAME=WEIGHT")
        if name not in BUILTIN_REWARDS and ":" not in name:
            raise ValueError(f"reward={spec!r}: unknown reward {name!r} in the sum; built-in: "
                             f"{', '.join(BUILTIN_REWARDS)}, or module:function")
        if name in (n for n, _ in terms):
            raise ValueError(f"reward={spec!r}: {name!r} is named twice")
        terms.append((name, value))
    return terms


def term_weights(spec: str, names: list[str], weights: str | None) -> dict[str, str | None]:
    """Each term's weights from a sum's `reward_weights`: NAME=PATH,NAME=PATH,... (a name of the sum each; the
    terms not named get none)."""
    paths: dict[str, str | None] = dict.fromkeys(names)
    if weights is None:
        return paths
    for part in weights.split(","):
        name, equals, path = (x.strip() for x in part.partition("="))
        if not equals or name not in names or not path:
            raise ValueError(f"reward_weights={weights!r}: the weighted sum reward={spec!r} takes each term's weights "
                             f"as NAME=PATH,NAME=PATH,... with NAME one of {', '.join(names)}; {part.strip()!r} is "
                             "not")
        if paths[name] is not None:
            raise ValueError(f"reward_weights={weights!r}: {name!r} is named twice")
        paths[name] = path
    return paths


def check_weights(spec: str | None, weights: str | Path | None) -> None:
    """Everything about `reward_weights` that can fail, checked without building a network: for config.validate.
    For a weighted sum, each term with its weights."""
    terms = parse_sum(spec)
    if terms is not None:
        paths = term_weights(spec, [name for name, _ in terms], None if weights is None else str(weights))
        for name, path in paths.items():
            if path is not None and (name == "task" or ":" in name):
                raise ValueError(f"reward_weights: the term {name!r} of reward={spec!r} takes no weights")
            if path is None and name in NEEDS_WEIGHTS:
                raise ValueError(f"reward_weights: the term {name!r} of reward={spec!r} needs weights "
                                 f"(reward_weights {name}=PATH, with the others' NAME=PATH, comma-separated)")
            check_weights(name, path)
        return
    if spec in NEEDS_WEIGHTS and weights is None:
        what = "a checkpoint file or folder" if spec == "hps" else "a weights folder"
        raise ValueError(f"reward_weights=None: reward {spec!r} needs {what} (docs/rewards.md)")
    if weights is None:
        return
    weights = str(weights)
    if not Path(weights).exists():
        raise ValueError(f"reward_weights={weights!r}: no such {'file or ' if spec == 'hps' else ''}folder")
    if spec == "aesthetic":
        folder, path = clip_folder(weights), head_file(weights)
        check_projection(clip_configs(folder)[0].projection_dim, check_head_state(load_state_file(path), path),
                         folder, path)
    elif spec in ("clip-score", "pickscore"):
        folder = clip_folder(weights)
        if clip_configs(folder)[1] is None:
            raise ValueError(f"reward_weights={weights!r}: {spec} needs a full CLIPModel (text and vision), "
                             f"{folder} holds a vision model only")
        tokenizer_folder(folder, weights)
        if spec == "pickscore":
            read_weight(folder, "logit_scale")
    elif spec == "hps":
        from sqdf_fast.rewards_hps import check_hps
        check_hps(weights)
    elif spec == "digits" and not (Path(weights) / "reward.safetensors").is_file():
        raise ValueError(f"reward_weights={weights!r}: no reward.safetensors there (a digits weights folder)")


def load_pretrained(cls, folder: Path, config) -> nn.Module:
    """A transformers model from a local folder; ValueError when weights it needs are missing or mis-shaped
    (transformers would otherwise initialise them randomly)."""
    from transformers.utils import logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()   # a CLIPModel folder loaded as one tower lists the other's keys as unexpected
    try:
        model, info = cls.from_pretrained(folder, config=config, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    bad = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if bad:
        raise ValueError(f"reward_weights: {folder} lacks weights {cls.__name__} needs: {', '.join(bad[:5])}")
    return model.requires_grad_(False).eval()


def load_vision(folder: Path) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection
    return load_pretrained(CLIPVisionModelWithProjection, folder, clip_configs(folder)[0])


def load_aesthetic(weights: str | Path) -> AestheticReward:
    check_weights("aesthetic", weights)
    folder, path = clip_folder(weights), head_file(weights)
    state = load_state_file(path)
    head = AestheticHead(check_head_state(state, path))
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return AestheticReward(load_vision(folder), head)


@torch.no_grad()
def embed_prompts(prompts: list[str], encode: Callable[[list[str]], Tensor]) -> Tensor:
    """(len(prompts), D) text embeddings on the CPU, each distinct prompt encoded once, TEXT_BATCH per `encode`
    call."""
    distinct = list(dict.fromkeys(prompts))
    embeds = torch.cat([encode(distinct[start:start + TEXT_BATCH]).cpu()
                        for start in range(0, len(distinct), TEXT_BATCH)])
    row = {prompt: i for i, prompt in enumerate(distinct)}
    return embeds[torch.tensor([row[p] for p in prompts])]


@torch.no_grad()
def text_embeddings(folder: Path, prompts: list[str], device: torch.device | str = "cpu",
                    tokenizer_dir: Path | None = None) -> Tensor:
    """(len(prompts), D) CLIP text embeddings of a transformers CLIP folder's text tower (encoded on `device`), its
    tokenizer from `tokenizer_dir` (default: the folder)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir or folder)
    text = load_pretrained(CLIPTextModelWithProjection, folder, clip_configs(folder)[1]).to(device)

    def encode(batch: list[str]) -> Tensor:
        tokens = tokenizer(batch, padding="max_length", truncation=True,
                           max_length=text.config.max_position_embeddings, return_tensors="pt").to(device)
        return text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).text_embeds

    return embed_prompts(prompts, encode)


def need_prompts(name: str, prompts: list[str] | None) -> list[str]:
    if not prompts:
        raise ValueError(f"reward={name!r} needs the task's prompts (Task.prompts): this task has none")
    return prompts


def load_clip_score(weights: str | Path, prompts: list[str] | None, scale: float = 100.0,
                    device: torch.device | str = "cpu") -> ClipScoreReward:
    need_prompts("clip-score", prompts)
    check_weights("clip-score", weights)
    folder = clip_folder(weights)
    embeds = text_embeddings(folder, prompts, device, tokenizer_folder(folder, weights))
    return ClipScoreReward(load_vision(folder), embeds, scale)


def load_pickscore(weights: str | Path, prompts: list[str] | None,
                   device: torch.device | str = "cpu") -> ClipScoreReward:
    """PickScore: exp(logit_scale) x cos(image, prompt) of its fine-tuned CLIP-H, the authors' scoring rule."""
    need_prompts("pickscore", prompts)
    check_weights("pickscore", weights)
    folder = clip_folder(weights)
    scale = float(read_weight(folder, "logit_scale").double().exp())
    embeds = text_embeddings(folder, prompts, device, tokenizer_folder(folder, weights))
    return ClipScoreReward(load_vision(folder), embeds, scale, name="pickscore")


def load_digits(weights: str | Path | None) -> nn.Module:
    from sqdf_fast.tasks import digits
    check_weights("digits", weights)
    folder = Path(weights) if weights is not None else digits.WEIGHTS_DIR
    return digits.BoldnessReward(digits.load_weights(digits.BoldnessClassifier(), folder / "reward.safetensors"))


def is_known(spec: str | None) -> bool:
    """Whether `spec` names a reward; ValueError naming the fault for a malformed weighted sum."""
    if spec is not None and "=" in spec:
        return parse_sum(spec) is not None
    return spec is None or spec in BUILTIN_REWARDS or ":" in spec


def build_reward(spec: str | None, *, weights: str | None = None, prompts: list[str] | None = None,
                 task_reward: Reward | None = None, device: torch.device | str = "cpu") -> Reward:
    """The reward named by `spec`: None or "task" (the task's own, `task_reward`), "digits", "aesthetic",
    "clip-score", "pickscore", "hps" (these three need `prompts`), "module:function", or a weighted sum of these,
    "NAME=W,NAME=W,..." (a `RewardSum`, each term built once, `weights` then "NAME=PATH,NAME=PATH,..."). `weights`:
    the reward_weights file or folder (module docstring); `device`: where the text rewards encode their prompts (the
    reward itself is returned on the CPU, to be moved with the task's frozen networks)."""
    from sqdf_fast.tasks import load_callable
    terms = parse_sum(spec)
    if terms is not None:
        check_weights(spec, weights)
        paths = term_weights(spec, [name for name, _ in terms], None if weights is None else str(weights))
        from sqdf_fast.memory import Checkpointed
        # the task's own reward, not the task's checkpointing wrapper around it: that wrapper will hold this sum
        own = task_reward.fn if isinstance(task_reward, Checkpointed) else task_reward
        return RewardSum([(name, weight, build_reward(name, weights=paths[name], prompts=prompts, task_reward=own,
                                                      device=device)) for name, weight in terms])
    if spec is None or spec == "task":
        if task_reward is None:
            raise ValueError("reward: the task has no reward of its own; name one (docs/rewards.md)")
        return task_reward
    if spec == "digits":
        return load_digits(weights)
    if spec == "aesthetic":
        return load_aesthetic(weights)
    if spec == "clip-score":
        return load_clip_score(weights, prompts, device=device)
    if spec == "pickscore":
        return load_pickscore(weights, prompts, device=device)
    if spec == "hps":
        from sqdf_fast.rewards_hps import load_hps
        return load_hps(weights, need_prompts("hps", prompts), device=device)
    if ":" in spec:
        return load_callable(spec, "reward", ("images", "cond"))
    raise ValueError(f"reward={spec!r}: unknown reward; built-in: {', '.join(BUILTIN_REWARDS)}, or module:function")
