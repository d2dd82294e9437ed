"""Rewards and task factories given to the trainer as `--reward rewards_for_tests:NAME` and
`--task rewards_for_tests:NAME` (tests/ is on sys.path under pytest)."""


def always_nan(images, cond):
    return images.flatten(1).mean(1) * float("nan")


def image_mean(images, cond):
    return images.flatten(1).mean(1)


def digits_without_features(cfg):
    """A user's task factory whose task gives the metrics no features."""
    from sqdf_fast.tasks import digits
    task = digits.make_task(cfg)
    task.features = None
    return task


def nan_at_evaluation(images, cond):
    """Finite while training (images carry a gradient), NaN for every other sample otherwise (collection and
    evaluation): the final evaluation must count them."""
    value = images.flatten(1).mean(1)
    if images.requires_grad:
        return value
    return value.masked_fill((cond.new_ones(cond.shape).cumsum(0) % 2).bool(), float("nan"))


# rewards that break the contract (images, cond) -> (B,) float with a gradient: each must fail at its first call
not_callable = 3.0


def wrong_shape(images, cond):
    return images.flatten(1)


def zero_dim(images, cond):
    return images.mean()


def a_list(images, cond):
    return [0.0] * images.shape[0]


def integer(images, cond):
    return (images.flatten(1).mean(1) > 0).long()


def detached(images, cond):
    return images.flatten(1).mean(1).detach()


def not_a_task(cfg):
    return {"unet": None}


def points_without_plot(cfg):
    """A user's task whose samples are 2-D points and that brings no plot of its own."""
    from sqdf_fast.tasks import gmm2d
    task = gmm2d.make_task(cfg)
    task.plot_samples = None
    return task
