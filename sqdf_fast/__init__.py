"""sqdf_fast: fast SQDF fine-tuning of diffusion models toward a reward. See README.md."""

__version__ = "0.1.0"
