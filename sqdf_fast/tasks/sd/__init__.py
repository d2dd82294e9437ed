"""Stable Diffusion tasks on one set of weights: `sd` (a local diffusers pipeline folder) and `sd-random`
(SD-1.5 architecture, random weights, for benchmarks and memory measurements).

Where things are: `pipeline` (folder checks, loading, SD-1.5 configs and random weights), `prompts` (prompt lists,
the byte-level tokenizer, the PromptTable, the UNet's epsilon on its rows), `lcm` (LCM-LoRA loading and the
consistency model), `task` (decoder, default rewards and features, plot, `build_task` and the factories).

One UNet holds everything (docs/method.md §9.4): the policy is its trainable LoRA adapter "policy" (added by the
trainer, float32 master weights), the reference is the same UNet with every adapter off, and the consistency model
is a second, frozen adapter "lcm" (an LCM-LoRA, `--consistency`) run alone on the conditional branch only. A full
LCM UNet folder is accepted too, as a separate frozen UNet, since that is how such a model comes.

Conditions are prompt indices (long tensors), as the digits task's class labels: every distinct prompt (training,
evaluation and the empty negative prompt, the last row) is encoded ONCE when the task is built into a table
(n_prompts + 1, tokens, width) that `eps` gathers rows of; the text encoder is then dropped.

Images: `decode` returns (B, 3, H, W) in [0, 1] (VAE output x mapped once by x / 2 + 1/2, clamped as diffusers'
image processor does). Every reward of this task sees images in [0, 1] and normalises them exactly once (the
authors' double normalisation, docs/method.md §9.1, is not replicated); CLIP models go through
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
from sqdf_fast.tasks.sd.lcm import (
    LCM,
    AdapterConsistency,
    guidance_embedding,
    load_lcm_lora,
    random_lora_state_dict,
)
from sqdf_fast.tasks.sd.pipeline import (
    CLIP_L14_TEXT_CONFIG,
    CLIP_L14_VISION_CONFIG,
    SD15_UNET_CONFIG,
    SD_SCHEDULER_CONFIG,
    SD_VAE_CONFIG,
    SUBFOLDERS,
    Pipeline,
    load_pipeline,
    random_pipeline,
    weights_dtype,
)
from sqdf_fast.tasks.sd.prompts import (
    HELD_OUT_ANIMALS,
    SIMPLE_ANIMALS,
    byte_level_tokenizer,
    byte_level_vocab,
    load_prompts,
    unet_eps,
)
from sqdf_fast.tasks.sd.task import (
    CONFIG_DEFAULTS,
    METHOD_DEFAULTS,
    build_task,
    make_random_task,
    make_task,
    random_aesthetic_reward,
)

__all__ = [
    "LCM", "AdapterConsistency", "guidance_embedding", "load_lcm_lora", "random_lora_state_dict",
    "CLIP_L14_TEXT_CONFIG", "CLIP_L14_VISION_CONFIG", "SD15_UNET_CONFIG", "SD_SCHEDULER_CONFIG", "SD_VAE_CONFIG",
    "SUBFOLDERS", "Pipeline", "load_pipeline", "random_pipeline", "weights_dtype", "HELD_OUT_ANIMALS",
    "SIMPLE_ANIMALS", "byte_level_tokenizer", "byte_level_vocab", "load_prompts", "unet_eps", "CONFIG_DEFAULTS",
    "METHOD_DEFAULTS", "build_task", "make_random_task", "make_task", "random_aesthetic_reward",
]
