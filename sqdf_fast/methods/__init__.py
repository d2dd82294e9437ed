"""Fine-tuning methods behind one interface (`base.Method`), registered here once: the config's `--method` choices,
its `--help` and `python -m sqdf_fast.compare` all read `METHODS`.

    sqdf       SQDF: soft-Q policy gradient on replayed states (docs/method.md §2-§6)
    draft ...  the baselines, on-policy chain methods (docs/method.md §8)
"""
from __future__ import annotations

from sqdf_fast.methods.base import Method
from sqdf_fast.methods.baselines import AlignProp, DRaFT, DRaFTKL, DRaFTLV, ReFL
from sqdf_fast.methods.sqdf import SQDF

# name -> (class, one line for --help)
METHODS: dict[str, tuple[type[Method], str]] = {
    "sqdf": (SQDF, "SQDF, soft-Q policy gradient on replayed states"),
    "draft": (DRaFT, "DRaFT-K, gradient through the last draft_k transitions"),
    "draft-lv": (DRaFTLV, "DRaFT-LV, DRaFT-1 plus lv_samples re-noised last steps"),
    "refl": (ReFL, "ReFL, one-step estimate after a random late transition"),
    "alignprop": (AlignProp, "AlignProp, randomised truncated backpropagation"),
    "draft-kl": (DRaFTKL, "DRaFT+KL, DRaFT-K plus alpha times the chain's KL"),
}


def build(task, schedule, cfg, world: int = 1) -> Method:
    """The method `cfg.method` names, for one of `world` data-parallel processes."""
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}: must be one of {', '.join(METHODS)}")
    return METHODS[cfg.method][0](task, schedule, cfg, world)


__all__ = ["METHODS", "Method", "build"]
