"""Stable Diffusion tasks on one set of weights: `sd` (a local diffusers pipeline folder) and `sd-random`
(SD-1.5 architecture, random weights, for benchmarks and memory measurements).

One UNet holds everything (sqdf-method.md §12): the policy is its trainable LoRA adapter "policy" (added by the
trainer, float32 master weights), the reference is the same UNet with every adapter off, and the consistency model
is a second, frozen adapter "lcm" (an LCM-LoRA, `--consistency`) run alone on the conditional branch only. A full
LCM UNet folder is accepted too, as a separate frozen UNet, since that is how such a model comes.

Conditions are prompt indices (long tensors), as the digits task's class labels: every distinct prompt (training,
evaluation and the empty negative prompt, the last row) is encoded ONCE when the task is built into a table
(n_prompts + 1, tokens, width) that `eps` gathers rows of; the text encoder is then dropped.

Images: `decode` returns (B, 3, H, W) in [0, 1] (VAE output x mapped once by x / 2 + 1/2, clamped as diffusers'
image processor does). Every reward of this task sees images in [0, 1] and normalises them exactly once (the
authors' double normalisation, sqdf-method.md §11.1, is not replicated); CLIP models go through
`sqdf_fast.rewards.clip_preprocess`.
The VAE decoder and the reward are gradient-checkpointed when `checkpoint_decoder` / `checkpoint_reward` are on (the
consistency model by the method's `checkpoint_estimator`).

Default rewards (self-contained until real reward models are given with `--reward`):
- `sd`: colourfulness (Hasler and Suesstrunk 2003), cheap and meaningful on real images;
- `sd-random`: a random linear head on the L2-normalised embedding of a random CLIP ViT-L/14 image tower, which
  costs what the LAION aesthetic predictor costs.
Metrics: there is no real data, so `real_features` is None and the trainer measures fd against the base model's own
evaluation samples (fd = drift from the base model). Features are the reward's CLIP embedding where the task's
reward has one, else 8x8 average-pooled images.
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from sqdf_fast import ops
from sqdf_fast.adapters import POLICY, _activate, _tuner_layers, only_adapter
from sqdf_fast.consistency import ConsistencyModel, boundary_scalings
from sqdf_fast.memory import Checkpointed
from sqdf_fast.plots import save_grid
from sqdf_fast.rewards import AestheticHead, AestheticReward
from sqdf_fast.tasks import Task

LCM = "lcm"   # the consistency adapter's name on the task's UNet

# the paper's "simple animals" prompt set (DDPO's): bare animal names; this is our own list of 45, and the 6
# held-out animals the authors evaluate on (sqdf-method.md §8-§9)
SIMPLE_ANIMALS = (
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "rabbit", "chicken", "duck", "goose", "donkey", "mouse",
    "hamster", "deer", "fox", "wolf", "bear", "lion", "tiger", "elephant", "giraffe", "zebra", "monkey", "gorilla",
    "kangaroo", "koala", "panda", "camel", "squirrel", "raccoon", "owl", "eagle", "parrot", "penguin", "swan", "frog",
    "turtle", "snake", "dolphin", "whale", "shark", "butterfly", "bee", "llama",
)
HELD_OUT_ANIMALS = ("snail", "hippopotamus", "cheetah", "crocodile", "lobster", "octopus")
PROMPT_LISTS = {"simple-animals": (SIMPLE_ANIMALS, HELD_OUT_ANIMALS)}
MAX_EVAL_PROMPTS = 6   # a prompt file: its first prompts are the evaluation prompts

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]   # the authors' policy LoRA: all self- and cross-attention
# the modules LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) adapts, for the random stand-in of `sd-random`
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
LCM_LORA_RANK = 64
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DECODE_CHUNK = 8            # images per VAE call when nothing needs gradients (evaluation, rollouts)
POOLED_FEATURE_SIZE = 8     # features without a CLIP model: images average-pooled to 8x8
RANDOM_WEIGHTS_SEED = 0     # sd-random's networks are the same in every run, whatever --seed is

# sqdf-method.md §10 (T2I aesthetic SQDF) on one GPU, small batches
CONFIG_DEFAULTS = {"sample_steps": 50, "guidance": 5.0, "eta": 1.0, "alpha": 2.0, "gamma": 0.9, "resolution": 512,
                   "lr": 1e-3, "weight_decay": 1e-4, "lora_rank": 4, "lora_alpha": 4.0, "batch_size": 4,
                   "rollout_batch": 4, "replay_ratio": 1, "buffer_size": 256, "buffer_dtype": "bfloat16",
                   "steps": 200, "eval_per_class": 4, "log_every": 1, "checkpoint_every": 50}
METHOD_DEFAULTS = {"draft-kl": {"alpha": 0.035}}   # the authors' DRaFT+KL alpha (a sum over all T transitions)

# ---- SD-1.5 architecture (sd-random) ----------------------------------------------------------------------------
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)
# CLIP ViT-L/14: the text tower SD-1.x conditions on, and the image tower of the aesthetic predictor
CLIP_L14_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
CLIP_L14_VISION_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=224, projection_dim=768, hidden_act="quick_gelu",
)


class Pipeline(NamedTuple):
    """The parts of a Stable Diffusion pipeline the task uses (the text encoder only while it is built)."""
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict      # DDIMScheduler's own keys only


# ---- tokenizer without downloads ----------------------------------------------------------------------------------
def byte_level_vocab() -> dict[str, int]:
    """A complete CLIP BPE vocabulary without merges: the 256 byte symbols, each also as a word end, then
    <|startoftext|> (512) and <|endoftext|> (513). Every text tokenizes (one token per byte); SD's real vocabulary
    is not needed to run random or tiny text encoders."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def byte_level_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[])


# ---- loading -----------------------------------------------------------------------------------------------------
def _weight_files(folder: Path, stems: tuple[str, ...]) -> list[Path]:
    return [p for stem in stems for p in folder.glob(f"{stem}*") if p.suffix in (".safetensors", ".bin", ".json")
            and p.name != "config.json"]


def _variant(folder: Path, stem: str) -> str | None:
    """'fp16' when a folder has only fp16-variant weights (diffusion_pytorch_model.fp16.safetensors and alike)."""
    if any((folder / f"{stem}{ext}").is_file() for ext in (".safetensors", ".bin", ".safetensors.index.json")):
        return None
    return "fp16" if any(folder.glob(f"{stem}.fp16.*")) else None


def check_pipeline_folder(path: str | Path) -> Path:
    """ValueError naming exactly what a diffusers Stable Diffusion pipeline folder lacks."""
    root = Path(path)
    layout = "a diffusers Stable Diffusion pipeline folder has unet/, vae/, text_encoder/, tokenizer/, scheduler/"
    if not root.is_dir():
        raise ValueError(f"model={str(path)!r}: no such folder ({layout})")
    missing = [name + "/" for name in SUBFOLDERS if not (root / name).is_dir()]
    if missing:
        raise ValueError(f"model={str(path)!r}: no {', '.join(missing)} folder ({layout})")
    needs = {
        "unet": (("config.json",), ("diffusion_pytorch_model",)),
        "vae": (("config.json",), ("diffusion_pytorch_model",)),
        "text_encoder": (("config.json",), ("model", "pytorch_model")),
        "scheduler": (("scheduler_config.json",), ()),
    }
    for name, (files, weight_stems) in needs.items():
        for file in files:
            if not (root / name / file).is_file():
                raise ValueError(f"model={str(path)!r}: {name}/ has no {file}")
        if weight_stems and not _weight_files(root / name, weight_stems):
            raise ValueError(f"model={str(path)!r}: {name}/ has no weights ({weight_stems[0]}.safetensors or .bin)")
    tokenizer = root / "tokenizer"
    if not ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
            or (tokenizer / "tokenizer.json").is_file()):
        raise ValueError(f"model={str(path)!r}: tokenizer/ has neither vocab.json + merges.txt nor tokenizer.json")
    return root


def ddim_config(raw: dict, where: str) -> dict:
    """The keys of a scheduler config that DDIMScheduler takes (SD ships a PNDM config with the same betas)."""
    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in raw.items() if k in accepted}
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{where}: prediction_type={config['prediction_type']!r}; only epsilon-prediction models "
                         "are supported (e.g. SD 1.x, SD 2.x base at 512 px, not the 768 px v-prediction model)")
    return config


def load_pipeline(path: str | Path, dtype: torch.dtype) -> Pipeline:
    """Each component of a local pipeline folder with its own from_pretrained, offline, frozen, in `dtype`."""
    root = check_pipeline_folder(path)

    def load(name: str, loader: Callable, **kwargs):
        try:
            return loader(root / name, local_files_only=True, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"model={str(path)!r}: cannot load {name}/: {type(err).__name__}: {err}") from err

    stem = "diffusion_pytorch_model"
    unet = load("unet", UNet2DConditionModel.from_pretrained, variant=_variant(root / "unet", stem), torch_dtype=dtype)
    vae = load("vae", AutoencoderKL.from_pretrained, variant=_variant(root / "vae", stem), torch_dtype=dtype)
    text_encoder = load("text_encoder", CLIPTextModel.from_pretrained,
                        variant=_variant(root / "text_encoder", "model"))
    tokenizer = load("tokenizer", CLIPTokenizer.from_pretrained)
    try:
        raw = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model={str(path)!r}: scheduler/scheduler_config.json is not JSON: {err}") from err
    scheduler_config = ddim_config(raw, f"model={str(path)!r}: scheduler/scheduler_config.json")
    if unet.config.addition_embed_type is not None:
        raise ValueError(f"model={str(path)!r}: unet/ has addition_embed_type="
                         f"{unet.config.addition_embed_type!r} (an SDXL-style UNet needs pooled text and size "
                         "conditioning); only SD 1.x / 2.x pipelines are supported")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ValueError(f"model={str(path)!r}: unet/ cross_attention_dim {unet.config.cross_attention_dim} does not "
                         f"match text_encoder/ hidden_size {text_encoder.config.hidden_size}")
    text_encoder = text_encoder.to(dtype)
    return Pipeline(*(m.requires_grad_(False).eval() for m in (unet, vae, text_encoder)), tokenizer, scheduler_config)


def fill_random(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Seeded random weights, fast: matrices and kernels normal with std 1/sqrt(fan_in), unit norm scales, zero
    biases. (The layers' own initialisers take most of a minute for SD's 1.4e9 parameters on a 2-core CPU and mean
    no more here.)"""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:   # e.g. CLIP's class embedding
                p.normal_(0.0, 0.02, generator=generator)
    return module


def _random(build: Callable[[], nn.Module], generator: torch.Generator, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):   # no slow default initialisation; buffers stay real
        module = build()
    _materialise(module, dtype)
    return fill_random(module, generator).requires_grad_(False).eval()


def _materialise(module: nn.Module, dtype: torch.dtype) -> None:
    """Give every meta parameter real (uninitialised) CPU storage of `dtype`, leaving real buffers untouched."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(sub, name, nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False))


def random_pipeline(dtype: torch.dtype, seed: int = RANDOM_WEIGHTS_SEED) -> Pipeline:
    """SD-1.5's architecture with random weights (UNet 860M, VAE 84M, CLIP ViT-L/14 text 123M parameters) and the
    byte-level tokenizer; nothing is downloaded."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    text_config = CLIPTextConfig(**CLIP_L14_TEXT_CONFIG, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    unet = _random(lambda: UNet2DConditionModel(**SD15_UNET_CONFIG), generator, dtype)
    vae = _random(lambda: AutoencoderKL(**SD_VAE_CONFIG), generator, dtype)
    text_encoder = _random(lambda: CLIPTextModel(text_config), generator, dtype)
    return Pipeline(unet, vae, text_encoder, tokenizer, dict(SD_SCHEDULER_CONFIG))


# ---- prompts -----------------------------------------------------------------------------------------------------
def load_prompts(spec: str) -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts) of a built-in list name or a text file (one prompt per line, blank
    lines ignored; its first MAX_EVAL_PROMPTS prompts are also the evaluation prompts)."""
    if spec in PROMPT_LISTS:
        train, held_out = PROMPT_LISTS[spec]
        return list(train), list(held_out)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompts={spec!r}: neither a built-in list ({', '.join(PROMPT_LISTS)}) nor a text file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts={spec!r}: the file holds no prompt")
    return prompts, prompts[:MAX_EVAL_PROMPTS]


class PromptTable(nn.Module):
    """Text-encoder outputs of every distinct prompt, computed once: `embeddings` (n + 1, tokens, width), the last
    row the empty (negative) prompt. Conditions are row indices; `train_rows` and `eval_rows` (device buffers, so
    drawing conditions copies nothing from the host) are those of the training and evaluation prompts."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, train_prompts: list[str],
                 eval_prompts: list[str], dtype: torch.dtype):
        super().__init__()
        distinct = list(dict.fromkeys(train_prompts + eval_prompts))   # each prompt encoded once, order kept
        self.prompts = distinct + [""]
        self.register_buffer("embeddings", encode_prompts(text_encoder, tokenizer, self.prompts).to(dtype),
                             persistent=False)
        for name, prompts in (("train_rows", train_prompts), ("eval_rows", eval_prompts)):
            self.register_buffer(name, torch.tensor([distinct.index(p) for p in prompts]), persistent=False)

    @property
    def null_index(self) -> int:
        return len(self.prompts) - 1

    def forward(self, cond: Tensor) -> Tensor:
        return self.embeddings[cond]


@torch.no_grad()
def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str],
                   batch: int = 64) -> Tensor:
    """SD's conditioning: the text encoder's last hidden states of prompts padded to its context length."""
    length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)   # SD pipelines pass a mask only then
    rows = []
    for i in range(0, len(prompts), batch):
        ids = tokens.input_ids[i:i + batch].to(device)
        mask = tokens.attention_mask[i:i + batch].to(device) if use_mask else None
        rows.append(text_encoder(ids, attention_mask=mask)[0])
    return torch.cat(rows)


# ---- the consistency model ---------------------------------------------------------------------------------------
def random_lora_state_dict(unet: nn.Module, targets: list[str], rank: int, generator: torch.Generator,
                           scale: float = 1.0) -> dict[str, Tensor]:
    """Random LoRA weights for every Linear / Conv2d whose name ends with a target, in diffusers' key format
    (`unet.<module>.lora_A.weight` (rank, in[, k, k]), `unet.<module>.lora_B.weight` (out, rank[, 1, 1])), which
    `StableDiffusionPipeline.load_lora_weights` and `load_lcm_lora` accept. The update B A has per-output standard
    deviation about `scale` times that of a unit-variance input."""
    state = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            a_shape, b_shape = (rank, module.in_features), (module.out_features, rank)
        elif isinstance(module, nn.Conv2d):
            a_shape, b_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            continue
        fan_in = math.prod(a_shape[1:])
        state[f"unet.{name}.lora_A.weight"] = torch.randn(a_shape, generator=generator) / math.sqrt(fan_in)
        state[f"unet.{name}.lora_B.weight"] = torch.randn(b_shape, generator=generator) * scale / math.sqrt(rank)
    if not state:
        raise ValueError(f"lora targets {targets} match no Linear or Conv2d of {type(unet).__name__}")
    return state


def load_lcm_lora(unet: UNet2DConditionModel, source: str | Path | dict[str, Tensor], dtype: torch.dtype,
                  what: str = "consistency") -> None:
    """Add an LCM-LoRA to `unet` as the frozen adapter "lcm": a LoRA safetensors file (diffusers or kohya keys, as
    diffusers' load_lora_weights reads them), a folder holding pytorch_lora_weights.safetensors, or a state dict.
    Afterwards no adapter is active (the plain base model) until `only_adapter(unet, "lcm")` or the policy is added."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    if isinstance(source, dict):
        location, kwargs = source, {}
    else:
        path = Path(source)
        folder, name = (path, "pytorch_lora_weights.safetensors") if path.is_dir() else (path.parent, path.name)
        if not (folder / name).is_file():
            raise ValueError(f"{what}={str(source)!r}: no {name} there")
        location, kwargs = str(folder), {"weight_name": name, "local_files_only": True}
    try:
        state, network_alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            location, return_lora_metadata=True, **kwargs)
        unet_keys = [k for k in state if k.startswith("unet.")]
        if not unet_keys:
            raise ValueError("it holds no UNet LoRA weights (keys unet.* or lora_unet_*)")
        unet.load_lora_adapter(state, prefix="unet", network_alphas=network_alphas, adapter_name=LCM,
                               metadata=metadata, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{what}={str(source) if not isinstance(source, dict) else 'state dict'!r}: not a LoRA "
                         f"for this UNet: {err}") from err
    loaded = [p for name, p in unet.named_parameters() if f".{LCM}." in name]
    if len(loaded) != len(unet_keys):   # diffusers only warns about weights it could not place
        raise ValueError(f"{what}={str(source)!r}: {len(unet_keys) - len(loaded)} of its {len(unet_keys)} UNet LoRA "
                         "tensors fit no layer of this UNet (a LoRA for another architecture?)")
    for p in loaded:   # frozen, stored like the base weights
        p.requires_grad_(False)
        p.data = p.data.to(dtype)
    _activate(_tuner_layers(unet), [POLICY])   # the policy's slot: until it exists, layers run their base weights


class AdapterConsistency(nn.Module):
    """The consistency model as the frozen adapter "lcm" on the task's own UNet: f(x, t) = c_skip x + c_out x0_hat
    with the UNet's epsilon at timestep t with only "lcm" active, conditional branch only (LCM-LoRA is distilled
    with guidance folded in, so the authors' guidance-1 doubled batch was the conditional branch at twice the cost).

    t is t_{j+1}, the action's own timestep; the authors look up the nearest LCM timestep instead (2 steps off
    everywhere, 18 at t = 1; sqdf-method.md §11.7), which we do not replicate.
    The UNet is held by reference, not registered as a submodule: the task's frozen modules hold no second copy of
    it, and freezing or moving this module never touches the policy."""

    def __init__(self, unet: nn.Module, eps: Callable, alphas_cumprod: Tensor, adapter: str = LCM):
        super().__init__()
        self.__dict__["unet"] = unet
        self.eps, self.adapter = eps, adapter
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        with only_adapter(self.unet, self.adapter):
            eps = self.eps(self.unet, x, t, cond)
        return ops.consistency_x0(x, eps, self.alphas_cumprod[t], *boundary_scalings(t))


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """LCM's sinusoidal embedding of the guidance scale (its argument is w - 1), as diffusers'
    LatentConsistencyModelPipeline builds it for UNets with time_cond_proj_dim."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0)
                                                                                          / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def load_consistency(source: str, unet: UNet2DConditionModel, prompts: PromptTable, alphas_cumprod: Tensor,
                     dtype: torch.dtype, guidance: float) -> nn.Module:
    """`--consistency`: an LCM-LoRA (file, or folder with pytorch_lora_weights.safetensors) as the adapter "lcm" on
    `unet`; or a full LCM UNet folder (a UNet folder, or a pipeline folder with unet/) as a separate frozen UNet,
    given the policy's guidance through its w-embedding when it has one (LCM-Dreamshaper)."""
    path = Path(source)
    if path.is_file() or (path / "pytorch_lora_weights.safetensors").is_file():
        load_lcm_lora(unet, path, dtype)
        return AdapterConsistency(unet, lambda net, x, t, cond: unet_eps(net, prompts, x, t, cond), alphas_cumprod)
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ValueError(f"consistency={source!r}: neither an LCM-LoRA (a .safetensors file, or a folder with "
                         "pytorch_lora_weights.safetensors) nor a UNet folder (config.json) nor a pipeline folder "
                         "(unet/)")
    try:
        lcm_unet = UNet2DConditionModel.from_pretrained(
            folder, local_files_only=True, variant=_variant(folder, "diffusion_pytorch_model"), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"consistency={source!r}: cannot load the UNet: {err}") from err
    if lcm_unet.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ValueError(f"consistency={source!r}: cross_attention_dim {lcm_unet.config.cross_attention_dim} does "
                         f"not match the model's {unet.config.cross_attention_dim}")
    lcm_unet = lcm_unet.requires_grad_(False).eval()
    w_dim = lcm_unet.config.time_cond_proj_dim

    def lcm_eps(net: nn.Module, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        w = None if w_dim is None else guidance_embedding(torch.full_like(t, guidance - 1.0, dtype=torch.float32),
                                                          w_dim).to(dtype)
        return unet_eps(net, prompts, x, t, cond, timestep_cond=w)

    return ConsistencyModel(lcm_unet, lcm_eps, alphas_cumprod).requires_grad_(False).eval()


# ---- denoiser, decoder, rewards, features ------------------------------------------------------------------------
def unet_eps(unet: nn.Module, prompts: PromptTable, x: Tensor, t: Tensor, cond: Tensor, **kwargs) -> Tensor:
    """epsilon of the UNet in its weights' dtype, returned in x's dtype; cond are prompt-table rows."""
    context = prompts(cond)
    return unet(x.to(context.dtype), t, encoder_hidden_states=context, **kwargs).sample.to(x.dtype)


def make_decoder(vae: AutoencoderKL) -> Callable[[Tensor], Tensor]:
    """latents -> images (B, 3, H, W) in [0, 1]: latents / scaling_factor (+ shift_factor), VAE decode, x / 2 + 1/2
    clamped (diffusers' postprocessing). Without gradients, large batches are decoded in chunks."""
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0

    def decode_once(latents: Tensor) -> Tensor:
        z = latents / scaling + shift
        images = vae.decode(z.to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def decode(latents: Tensor) -> Tensor:
        if torch.is_grad_enabled() or latents.shape[0] <= DECODE_CHUNK:
            return decode_once(latents)
        return torch.cat([decode_once(part) for part in latents.split(DECODE_CHUNK)])
    return decode


def random_aesthetic_reward(vision_config: CLIPVisionConfig, generator: torch.Generator,
                            dtype: torch.dtype) -> AestheticReward:
    """The aesthetic reward's networks (a CLIP vision tower and the LAION head) with random weights: the cost of a
    real reward model for `sd-random`, meaningless as a score."""
    vision = _random(lambda: CLIPVisionModelWithProjection(vision_config), generator, dtype)
    head = fill_random(AestheticHead(vision_config.projection_dim), generator).to(dtype)
    return AestheticReward(vision, head)


def colourfulness(images_01: Tensor, cond: Tensor) -> Tensor:
    """Hasler and Suesstrunk's colourfulness of images in [0, 1] (0 for grey images, about 0.2-0.3 for vivid
    photographs): sqrt(var(rg) + var(yb)) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2), rg = R - G, yb = (R + G) / 2 - B."""
    r, g, b = images_01.float().flatten(2).unbind(1)
    rg, yb = r - g, (r + g) / 2 - b
    spread = (rg.var(1) + yb.var(1) + 1e-8).sqrt()
    offset = (rg.mean(1).square() + yb.mean(1).square() + 1e-8).sqrt()
    return spread + 0.3 * offset


def pooled_features(images_01: Tensor) -> Tensor:
    """A cheap fixed image feature: the image average-pooled to 8x8, flattened (B, 3 * 64)."""
    return F.adaptive_avg_pool2d(images_01.float(), POOLED_FEATURE_SIZE).flatten(1)


def plot_samples(images: Tensor, cond: Tensor, per_class: int, path: Path, thumbnail: int = 128) -> None:
    """Up to 8 evaluation samples per prompt, one row per prompt, as thumbnails."""
    images = images.view(-1, per_class, *images.shape[1:])[:, :8].flatten(0, 1)
    if images.shape[-1] > thumbnail:
        images = F.interpolate(images.float(), size=(thumbnail, thumbnail), mode="bilinear", antialias=True)
    save_grid(images * 2 - 1, path, nrow=min(per_class, 8), scale=1)


# ---- the tasks ---------------------------------------------------------------------------------------------------
def weights_dtype(cfg) -> torch.dtype:
    """cfg.weights_dtype; auto: bfloat16 on CUDA (sqdf-method.md §12), float32 on the CPU."""
    if cfg.weights_dtype != "auto":
        return getattr(torch, cfg.weights_dtype)
    on_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.bfloat16 if on_cuda else torch.float32


def build_task(name: str, cfg, pipeline: Pipeline, reward_model: nn.Module | None = None,
               lcm_lora: dict[str, Tensor] | None = None) -> Task:
    """The task from loaded networks. reward_model: a default reward with an `embed` method (its embedding is then
    the metrics' feature); None: colourfulness and pooled features. The consistency model is cfg.consistency, else
    `lcm_lora` (a state dict) when given, else none (the method then uses the reference's Tweedie estimate)."""
    dtype = next(pipeline.unet.parameters()).dtype
    unet, vae = pipeline.unet, pipeline.vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.resolution % factor:
        raise ValueError(f"resolution={cfg.resolution}: must be a multiple of the VAE's downsampling factor {factor}")
    table = PromptTable(pipeline.text_encoder, pipeline.tokenizer, *load_prompts(cfg.prompts), dtype)
    alphas = DDIMScheduler.from_config(pipeline.scheduler_config).alphas_cumprod

    consistency = None
    if cfg.consistency is not None:
        consistency = load_consistency(cfg.consistency, unet, table, alphas, dtype, cfg.guidance)
    elif lcm_lora is not None:
        load_lcm_lora(unet, lcm_lora, dtype)
        consistency = AdapterConsistency(unet, lambda net, x, t, c: unet_eps(net, table, x, t, c), alphas)

    if reward_model is not None:
        reward_model = reward_model.requires_grad_(False).eval()
        reward_fn, features = reward_model, reward_model.embed
    else:
        reward_fn, features = colourfulness, pooled_features

    def sample_conditions(n: int, generator: torch.Generator) -> Tensor:
        picks = torch.randint(0, table.train_rows.shape[0], (n,), generator=generator, device=generator.device)
        return table.train_rows[picks]

    latent = cfg.resolution // factor
    frozen = [table, vae] + [m for m in (consistency, reward_model) if isinstance(m, nn.Module)]
    return Task(
        name=name, unet=unet, eps=lambda net, x, t, cond: unet_eps(net, table, x, t, cond),
        scheduler_config=pipeline.scheduler_config,
        sample_shape=(unet.config.in_channels, latent, latent),
        sample_conditions=sample_conditions,
        null_condition=lambda cond: torch.full_like(cond, table.null_index),
        reward=Checkpointed(reward_fn, cfg.checkpoint_reward),
        decode=Checkpointed(make_decoder(vae), cfg.checkpoint_decoder),
        lora_targets=LORA_TARGETS, consistency=consistency, features=features, real_features=None,
        eval_conditions=lambda per_class: table.eval_rows.repeat_interleave(per_class),
        plot_samples=plot_samples, frozen=frozen, prompts=table.prompts,
    )


def make_task(cfg) -> Task:
    """--task sd --model PIPELINE_FOLDER [--consistency LCM_LORA]."""
    if cfg.model is None:
        raise ValueError("model: --task sd needs --model PATH, a local diffusers Stable Diffusion pipeline folder "
                         "(unet/, vae/, text_encoder/, tokenizer/, scheduler/); --task sd-random needs none")
    return build_task("sd", cfg, load_pipeline(cfg.model, weights_dtype(cfg)))


def make_random_task(cfg) -> Task:
    """--task sd-random: SD-1.5's architecture with random weights, a random rank-64 LCM-LoRA on LCM-LoRA's modules
    (unless --consistency names a real one) and a random CLIP ViT-L/14 reward (unless --reward replaces it)."""
    if cfg.model is not None:
        raise ValueError(f"model={cfg.model!r}: --task sd-random builds its own random weights; use --task sd")
    dtype = weights_dtype(cfg)
    pipeline = random_pipeline(dtype)
    generator = torch.Generator().manual_seed(RANDOM_WEIGHTS_SEED + 1)
    lcm_lora = None
    if cfg.consistency is None:
        lcm_lora = random_lora_state_dict(pipeline.unet, LCM_LORA_TARGETS, LCM_LORA_RANK, generator, scale=0.01)
    reward = None if cfg.reward is not None else random_aesthetic_reward(CLIPVisionConfig(**CLIP_L14_VISION_CONFIG),
                                                                         generator, dtype)
    return build_task("sd-random", cfg, pipeline, reward, lcm_lora)
