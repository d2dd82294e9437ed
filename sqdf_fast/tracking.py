"""Experiment tracking (`--log-to`): one small adapter between the trainer and TensorBoard / Weights & Biases.

    tracker = open_tracker(cfg.log_to, run_dir, config, name=..., group=..., resumed_at=step)
    tracker.log_config(values)                     the run's options (TensorBoard: a text panel)
    tracker.log_scalars(step, {tag: value})        every metrics.jsonl row (row_scalars names the tags)
    tracker.log_images(step, tag, image, caption)  an evaluation grid, (H, W, 3) uint8, captioned with its rows
    tracker.log_histogram(step, tag, values)       the adapter's update norms
    tracker.close()

`--log-to` is a comma-separated list: `tensorboard` (event files in RUN/tensorboard; `tensorboard --logdir RUN`,
or the parent folder of several runs), `wandb` (files in RUN/wandb; WANDB_MODE=offline logs with no network, `wandb
sync` uploads later; the run id is kept in RUN/wandb_id.txt so a resume continues the same wandb run), `none`, or
`auto` (the default: tensorboard when the package is installed, else none). Neither package is needed to import or
run the project: asking for a missing one is an error naming it. The trackers only read what the trainer has
already computed: they draw no random numbers and change no result, and the run directory holds the same files
whatever is chosen (plus the trackers' own folders).
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# backend -> (module to import, pip requirement, the project's extra)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard", "tensorboard"), "wandb": ("wandb", "wandb", "wandb")}
CHOICES = ("auto", "none", *BACKENDS)
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_PROJECT = "sqdf_fast"   # WANDB_PROJECT in the environment overrides it


def installed(backend: str) -> bool:
    return importlib.util.find_spec(BACKENDS[backend][0]) is not None


def resolve(log_to: str) -> list[str]:
    """The backends `log_to` names, `auto` resolved; ValueError naming a bad name or a missing package."""
    names = [name.strip() for name in log_to.split(",") if name.strip()]
    bad = [name for name in names if name not in CHOICES]
    if bad or not names:
        raise ValueError(f"log_to={log_to!r}: expected a comma-separated list of {', '.join(CHOICES)}")
    if len(names) > 1 and ({"auto", "none"} & set(names)):
        raise ValueError(f"log_to={log_to!r}: auto and none stand alone")
    if names == ["none"]:
        return []
    if names == ["auto"]:
        return ["tensorboard"] if installed("tensorboard") else []
    for name in names:
        if not installed(name):
            module, requirement, extra = BACKENDS[name]
            raise ValueError(f"log_to={log_to!r}: the {module} package is not installed: pip install {requirement} "
                             f"(or the project's extra, pip install 'sqdf_fast[{extra}]')")
    return list(dict.fromkeys(names))


class Tracker:
    """The interface, and the tracker that logs nothing (`--log-to none`, and every data-parallel rank but 0)."""
    active = False   # False: the trainer skips the work of preparing what only a tracker would read

    def log_config(self, values: dict) -> None:
        pass

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def log_images(self, step: int, tag: str, image: np.ndarray, caption: str) -> None:
        pass

    def log_histogram(self, step: int, tag: str, values: Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in `log_dir` through torch's SummaryWriter. A resumed run appends to the same folder; events
    after the resumed step, from before the interruption, are purged (TensorBoard's purge_step)."""
    active = True

    def __init__(self, log_dir: Path, resumed_at: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resumed_at is None else resumed_at + 1,
                                    flush_secs=10)

    def log_config(self, values: dict) -> None:
        text = json.dumps(values, indent=1, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "))   # markdown: a code block
        self.writer.flush()

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_images(self, step: int, tag: str, image: np.ndarray, caption: str) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.add_text(f"{tag}/caption", caption, step)
        self.writer.flush()

    def log_histogram(self, step: int, tag: str, values: Tensor) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu().numpy(), step)

    def close(self) -> None:
        self.writer.close()   # a second close does nothing


class WandbTracker(Tracker):
    """One wandb run, its files under the run directory (dir=RUN), its id in RUN/wandb_id.txt: a resume continues
    it. wandb's own settings apply (WANDB_MODE=offline, WANDB_PROJECT, WANDB_ENTITY, ...)."""
    active = True

    def __init__(self, run_dir: Path, config: dict, name: str, group: str | None):
        import wandb
        self.wandb = wandb
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), dir=str(run_dir),
                                  id=run_id, name=name, group=group, config=config, resume="allow")
        except Exception as err:   # wandb raises its own types (no login, no network): one line, not a traceback
            raise RuntimeError(f"log_to=wandb: wandb.init failed ({type(err).__name__}: {err}); log in with `wandb "
                               "login`, or set WANDB_MODE=offline to log without a network") from err
        id_file.write_text(run_id + "\n")

    def log_config(self, values: dict) -> None:
        self.run.config.update(values, allow_val_change=True)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_images(self, step: int, tag: str, image: np.ndarray, caption: str) -> None:
        self.run.log({tag: self.wandb.Image(image, caption=caption)}, step=step)

    def log_histogram(self, step: int, tag: str, values: Tensor) -> None:
        self.run.log({tag: self.wandb.Histogram(values.detach().float().cpu().numpy())}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class FanOut(Tracker):
    """Every call to each of several trackers; `close` closes each once."""
    active = True

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_config(self, values: dict) -> None:
        for tracker in self.trackers:
            tracker.log_config(values)

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_scalars(step, values)

    def log_images(self, step: int, tag: str, image: np.ndarray, caption: str) -> None:
        for tracker in self.trackers:
            tracker.log_images(step, tag, image, caption)

    def log_histogram(self, step: int, tag: str, values: Tensor) -> None:
        for tracker in self.trackers:
            tracker.log_histogram(step, tag, values)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


def open_tracker(log_to: str, run_dir: Path, config: dict, name: str | None = None, group: str | None = None,
                 resumed_at: int | None = None) -> Tracker:
    """The trackers `log_to` names for the run in `run_dir` (created if needed), with the run's config logged;
    `resumed_at`: the step a resumed run continues from."""
    backends = resolve(log_to)
    if not backends:
        return Tracker()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trackers: list[Tracker] = []
    try:
        for backend in backends:
            if backend == "tensorboard":
                trackers.append(TensorBoardTracker(run_dir / TENSORBOARD_DIR, resumed_at))
            else:
                trackers.append(WandbTracker(run_dir, config, name or run_dir.name, group))
    except BaseException:
        FanOut(trackers).close()
        raise
    tracker = trackers[0] if len(trackers) == 1 else FanOut(trackers)
    tracker.log_config(config)
    return tracker


def row_scalars(row: dict, plain: str = "train") -> dict[str, float]:
    """A metrics row's numbers as tracker tags: `eval_NAME` -> eval/NAME, any other NAME -> <plain>/NAME; the
    step, null (non-finite) values and anything not a number (a resume's record) are left out."""
    scalars = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"{plain}/{key}"
        scalars[tag] = float(value)
    return scalars


def update_norms(now: list[Tensor], before: list[Tensor]) -> Tensor:
    """The norm of each adapter tensor's change, on the host (read at log time only)."""
    return torch.stack([(a.detach() - b).float().norm() for a, b in zip(now, before)]).cpu()
