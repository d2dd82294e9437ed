"""The embedded default task: class-conditional 16x16 digits (scikit-learn's bundled set, offline).

Networks, all trained by `python -m sqdf_fast.pretrain` and shipped in `sqdf_fast/weights/digits/`:
- base: a diffusers UNet2DModel with class embeddings (10 digits + a null class for classifier-free guidance);
- consistency: the same architecture, consistency-distilled from the base (one-step x0);
- reward: a CNN that tells bold digits from thin ones (bold = more ink than the median digit of its class);
  r(x, c) = log p(bold | x). The base model draws bold digits about half the time, so there is room to improve.
  Over-optimised, strokes thicken into blobs that no longer look like digits of their class: diversity falls and
  the evaluator's fd rises;
- evaluator: an MLP of another architecture and seed, used only for metrics (its 32-d features).

Target metrics (`tilted_target_metrics`). fd is against all real digits of a class, so even a perfect tilt toward
bold digits raises it. The KL-regularised optimum is p*(x | c) ~ p0(x | c) exp(r(x, c) / alpha_true), alpha_true =
2 alpha / d per nat (docs/method.md §4.2; d = 256, alpha = target_alpha or alpha). With the real digits of class c
standing in for p0, p* is those digits weighted by w_i ~ exp(r(x_i, c) / alpha_true), self-normalised; every metric
is the mean over the evaluated classes:
- `fd_to_target`: the Frechet distance of the samples' evaluator features to the weighted real features (weighted
  mean and unbiased weighted covariance);
- `dist_to_target`: the energy distance to them (weighted U-statistics, as gmm2d's `dist_to_target`);
- `target_ess`: the weights' effective sample size, in digits per class (alpha 2: 19 to 58 of about 180);
- `target_reward`: E_{p*}[r] = sum_i w_i r(x_i, c).
They are deterministic (no random numbers). The base model is not the real data (its fd is about 0.7), so a sampler
of the base model's exact p* would not score 0 either; what they tell apart is a natural tilt from over-optimisation.
At alpha = 0 (no target) there are none.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors.torch import load_file
from torch import Tensor, nn

from sqdf_fast.consistency import ConsistencyModel
from sqdf_fast.metrics import effective_sample_size, energy_distance, frechet_distance
from sqdf_fast.tasks import Task

NUM_CLASSES = 10
NULL_CLASS = 10
IMAGE_SIZE = 16
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "digits"
WEIGHT_FILES = ("base_unet.safetensors", "consistency_unet.safetensors", "reward.safetensors",
                "evaluator.safetensors")

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), num_class_embeds=NUM_CLASSES + 1,
    norm_num_groups=8, attention_head_dim=32,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
)
# The consistency UNet's activations at 16x16 are a few MiB: recomputing them in the backward pass (the default,
# which SD-size latents need) would cost one more forward per step for nothing here; the gradients are the same.
CONFIG_DEFAULTS = {"checkpoint_estimator": False}
# DRaFT+KL sums the KL over all T transitions: the authors' alpha for it (0.035 against SQDF's 2.0)
METHOD_DEFAULTS = {"draft-kl": {"alpha": 0.035}}
LORA_TARGETS = ["conv1", "conv2", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0"]


def load_data() -> tuple[Tensor, Tensor]:
    """All 1797 digits as (N, 1, 16, 16) float32 in [-1, 1] (bilinear upsampling of the 8x8 originals), labels (N,)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.from_numpy(digits.target).long()


class DigitsUNet(UNet2DModel):
    """UNet2DModel whose `dtype` is read from its first parameter. diffusers' `ModelMixin.dtype` walks every submodule
    looking for casting hooks on each access, and the forward reads it twice: about 2 ms of a 36 ms batch-32 forward
    here. These networks have no such hooks, so the first parameter's dtype is what diffusers would return."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def build_unet() -> UNet2DModel:
    return DigitsUNet(**UNET_CONFIG)


def unet_eps(unet: nn.Module, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    return unet(x, t, class_labels=cond).sample


class BoldnessClassifier(nn.Module):
    """CNN giving the logit of "bold": more ink than the median digit of the same class."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.SiLU(), nn.Linear(128, 1),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images).squeeze(1)


class Evaluator(nn.Module):
    """MLP digit classifier of a different architecture from the reward; its 32-d features serve the metrics."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 128), nn.ReLU(),
                                  nn.Linear(128, 32), nn.Tanh())
        self.head = nn.Linear(32, NUM_CLASSES)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def load_weights(module: nn.Module, path: Path) -> nn.Module:
    """Load a safetensors state dict (stored in float16) into `module` as float32, with a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"model: missing weight file {path} (regenerate with `python -m sqdf_fast.pretrain`)")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"model: {path} does not match the expected architecture: {err}") from err
    return module.requires_grad_(False).eval()


def check_weights_dir(path: str | Path) -> Path:
    path = Path(path)
    missing = [name for name in WEIGHT_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"model: {path} lacks {', '.join(missing)} (make them with `python -m sqdf_fast.pretrain "
                         f"--out {path}`)")
    return path


def boldness_labels(images: Tensor, labels: Tensor) -> Tensor:
    """1.0 where a digit has more ink than the median digit of its class, else 0.0."""
    ink = (images + 1).flatten(1).sum(1)
    medians = torch.stack([ink[labels == c].median() for c in range(NUM_CLASSES)])
    return (ink > medians[labels]).float()


class BoldnessReward(nn.Module):
    """r(images, cond) = log p(bold | images); images in [-1, 1] as the task decodes them (normalised once).
    A module, so that it moves to the device with the classifier it holds."""

    def __init__(self, classifier: BoldnessClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        return F.logsigmoid(self.classifier(images))


def proxy_features(images: Tensor) -> Tensor:
    """What a black-box proxy reads of a digit (sqdf_fast.bbo): the image at the data's native 8x8 resolution
    (2x2 average pooling), 64 values, differentiable. Pixels are clamped to the data's range [-1, 1] first, so that
    fine-tuning cannot raise a proxy by pushing pixels where no query ever was (the gradient stops there)."""
    return F.avg_pool2d(images.clamp(-1, 1), 2).flatten(1)


def tilted_target_metrics(features: Tensor, cond: Tensor, real_features: Tensor, real_labels: Tensor,
                          real_rewards: Tensor, alpha_true: float) -> dict[str, float]:
    """The target metrics of the module docstring for sample features (N, F) of conditions `cond` (N,)."""
    values = {"fd_to_target": [], "dist_to_target": [], "target_ess": [], "target_reward": []}
    for c in torch.unique(cond).tolist():
        samples, mask = features[cond == c].double(), real_labels == c
        if samples.shape[0] < 2:
            continue
        rewards = real_rewards[mask].double()
        weights = torch.softmax(rewards / alpha_true, 0)
        reference = real_features[mask].double()
        values["fd_to_target"].append(frechet_distance(samples, reference, weights))
        values["dist_to_target"].append(energy_distance(samples, reference, weights))
        values["target_ess"].append(effective_sample_size(weights))
        values["target_reward"].append(float(weights @ rewards))
    return {name: sum(v) / len(v) if v else float("nan") for name, v in values.items()}


def make_task(cfg) -> Task:
    weights = check_weights_dir(cfg.model or WEIGHTS_DIR)
    unet = load_weights(build_unet(), weights / "base_unet.safetensors")
    from sqdf_fast.schedule import DDIMSchedule
    alphas = DDIMSchedule.build(SCHEDULER_CONFIG, 1).alphas_cumprod
    consistency = ConsistencyModel(load_weights(build_unet(), weights / "consistency_unet.safetensors"), unet_eps,
                                   alphas).requires_grad_(False).eval()
    classifier = load_weights(BoldnessClassifier(), weights / "reward.safetensors")
    evaluator = load_weights(Evaluator(), weights / "evaluator.safetensors")
    images, labels = load_data()

    def real_features(cond: Tensor) -> dict:
        device = next(evaluator.parameters()).device
        with torch.no_grad():
            feats = evaluator.features(images.to(device))
        return {int(c): feats[labels.to(device) == c] for c in torch.unique(cond).tolist()}

    # the KL-tilted real digits (module docstring); alpha_true = 2 alpha / d per nat of KL
    alpha = cfg.target_alpha if cfg.target_alpha is not None else cfg.alpha
    target_metrics = None
    if alpha > 0:
        with torch.no_grad():
            real_rewards = BoldnessReward(classifier)(images, labels)

        def target_metrics(samples: Tensor, cond: Tensor) -> dict[str, float]:
            device = next(evaluator.parameters()).device
            with torch.no_grad():
                features, real = evaluator.features(samples), evaluator.features(images.to(device))
            return tilted_target_metrics(features.cpu(), cond.cpu(), real.cpu(), labels, real_rewards,
                                         2 * alpha / (IMAGE_SIZE * IMAGE_SIZE))

    return Task(
        name="digits", unet=unet, eps=functools.partial(unet_eps, unet), scheduler_config=SCHEDULER_CONFIG,
        sample_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
        sample_conditions=lambda n, generator: torch.randint(0, NUM_CLASSES, (n,), generator=generator,
                                                             device=generator.device),
        null_condition=lambda cond: torch.full_like(cond, NULL_CLASS),
        reward=BoldnessReward(classifier), decode=lambda x0: x0, lora_targets=LORA_TARGETS,
        consistency=consistency, features=evaluator.features, real_features=real_features,
        eval_conditions=lambda per_class: torch.arange(NUM_CLASSES).repeat_interleave(per_class),
        frozen=[consistency, classifier, evaluator], proxy_features=proxy_features, target_metrics=target_metrics,
    )
