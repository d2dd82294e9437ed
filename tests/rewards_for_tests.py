"""Rewards given to the trainer as `--reward rewards_for_tests:NAME` (tests/ is on sys.path under pytest)."""


def always_nan(images, cond):
    return images.flatten(1).mean(1) * float("nan")



def image_mean(images, cond):
    return images.flatten(1).mean(1)
