"""Prompts: the built-in prompt lists and prompt files, the byte-level tokenizer (no download), and the PromptTable
that encodes every distinct prompt once so that conditions are row indices; `unet_eps` conditions the UNet on them."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

# the paper's "simple animals" prompt set (DDPO's): bare animal names; this is our own list of 45, and the 6
# held-out animals the authors evaluate on (docs/method.md §10.3)
SIMPLE_ANIMALS = (
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "rabbit", "chicken", "duck", "goose", "donkey", "mouse",
    "hamster", "deer", "fox", "wolf", "bear", "lion", "tiger", "elephant", "giraffe", "zebra", "monkey", "gorilla",
    "kangaroo", "koala", "panda", "camel", "squirrel", "raccoon", "owl", "eagle", "parrot", "penguin", "swan", "frog",
    "turtle", "snake", "dolphin", "whale", "shark", "butterfly", "bee", "llama",
)
HELD_OUT_ANIMALS = ("snail", "hippopotamus", "cheetah", "crocodile", "lobster", "octopus")
PROMPT_LISTS = {"simple-animals": (SIMPLE_ANIMALS, HELD_OUT_ANIMALS)}
MAX_EVAL_PROMPTS = 6   # a prompt file: its first prompts are the evaluation prompts


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


def unet_eps(unet: nn.Module, prompts: PromptTable, x: Tensor, t: Tensor, cond: Tensor, **kwargs) -> Tensor:
    """epsilon of the UNet in its weights' dtype, returned in x's dtype; cond are prompt-table rows."""
    context = prompts(cond)
    return unet(x.to(context.dtype), t, encoder_hidden_states=context, **kwargs).sample.to(x.dtype)
