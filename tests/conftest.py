import os

# Tests never reach the Hugging Face Hub: the digits task and diffusers configs are all local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
