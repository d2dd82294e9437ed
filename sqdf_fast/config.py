"""The training config: one dataclass, settable from the command line and from a JSON file, validated up front."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqdf_fast import tracking
from sqdf_fast.buffer import SAMPLERS as BUFFER_SAMPLERS
from sqdf_fast.cli import EPILOG, UsageError, usage_errors
from sqdf_fast.methods import METHODS
from sqdf_fast.methods.baselines import alignprop_range, refl_range
from sqdf_fast.methods.sqdf import Q_SAMPLERS, STEP_SAMPLERS


def option(default, group: str, help: str, choices: tuple | None = None, metavar: str | None = None):
    """A config field: its command-line group, help, choices and, for a path, its metavar (FILE, DIR, PATH)."""
    return field(default=default, metadata={"group": group, "help": help, "choices": choices, "metavar": metavar})


@dataclass
class TrainConfig:
    # task and run
    task: str = option("digits", "task", "built-in task name or module:function returning a sqdf_fast.tasks.Task")
    method: str = option("sqdf", "task", "fine-tuning method: " + "; ".join(f"{name}: {line}" for name, (_, line)
                                                                         in METHODS.items()), tuple(METHODS))
    model: str | None = option(None, "task", "folder of the task's weights (digits: default the shipped ones)",
                               metavar="DIR")
    reward: str | None = option(None, "task", "reward replacing the task's own: task (the task's, default), digits, "
                                "aesthetic, clip-score, pickscore, hps, module:function (images, cond) -> (B,), or "
                                "a weighted sum NAME=W,NAME=W,... (docs/rewards.md)")
    reward_weights: str | None = option(None, "task", "the reward's weights: aesthetic (CLIP + LAION head), "
                                        "clip-score, pickscore (CLIP folders), hps (checkpoint file), digits; for a "
                                        "sum NAME=PATH,NAME=PATH,... (docs/rewards.md)", metavar="PATH")
    consistency: str | None = option(None, "task", "sd tasks: the consistency model, an LCM-LoRA (.safetensors file, "
                                     "or folder with pytorch_lora_weights.safetensors) or an LCM UNet folder",
                                     metavar="PATH")
    prompts: str = option("simple-animals", "task", "sd tasks: prompt list, built-in (simple-animals: 45 animals, "
                          "6 held out for evaluation) or a text file, one prompt per line (its first 6 evaluate)",
                          metavar="NAME|FILE")
    resolution: int = option(512, "task", "sd tasks: image size in pixels (latents are resolution / 8 for SD)")
    weights_dtype: str = option("auto", "task", "sd tasks: dtype of the frozen weights (the policy LoRA stays "
                                "float32); auto: bfloat16 on CUDA, float32 on the CPU",
                                ("auto", "float32", "bfloat16", "float16"))
    out: str | None = option(None, "task", "run directory (default runs/<task>-<method>-<time>)", metavar="DIR")
    seed: int = option(0, "task", "seed of every random stream (each data-parallel rank derives its own)")
    device: str = option("auto", "task", "auto (CUDA when present), cpu, cuda, cuda:N")
    kernels: str = option("auto", "task", "op backend: auto (Triton on CUDA, C++ on CPU, else the torch "
                          "reference; SQDF_KERNELS applies), torch, cpp, triton", ("auto", "torch", "cpp", "triton"))
    # sampling
    sample_steps: int = option(20, "sampling", "DDIM steps T per trajectory")
    eta: float = option(1.0, "sampling", "DDIM stochasticity (> 0: the policy is Gaussian with sigma_j ~ eta)")
    guidance: float = option(1.0, "sampling", "classifier-free guidance w of rollouts, policy and reference")
    cuda_graphs: bool = option(False, "sampling", "capture the training rollouts (collect) as CUDA graphs, one per "
                               "batch size, replayed with new inputs; valid across in-place LoRA updates; no effect "
                               "off CUDA (sqdf_fast.graphs)")
    # method
    alpha: float = option(2.0, "method", "KL coefficient on the method's per-pixel KL scale: alpha * 2/d per nat "
                          "of true KL")
    target_alpha: float | None = option(None, "method", "alpha of the target p* ~ p0 exp(r/alpha) a task with a known "
                                        "target measures samples against (default: alpha)")
    gamma: float = option(0.9, "method", "discount of the reward term: gamma^(T-1-j)")
    q_estimator: str = option("auto", "method", "one-step x0 for the soft Q: consistency model or reference "
                              "Tweedie; auto = consistency when the task has one", ("auto", "consistency", "tweedie"))
    estimator_guidance: float = option(1.0, "method", "guidance of the Tweedie estimator (1: conditional branch only)")
    q_samples: int = option(1, "method", "sqdf: clean samples n per action for the soft Q = alpha log mean exp(r / "
                            "alpha) over them (1: the reward of the one-step estimate; docs/method.md §3.6)")
    q_steps: int = option(0, "method", "sqdf: stochastic bridge steps from the action before each sample's one-step "
                          "estimate (0: none; needed for q_samples > 1)")
    q_sampler: str = option("bridge", "method", "sqdf: the q_steps' step, the ancestral DDIM bridge or consistency "
                            "re-noising", Q_SAMPLERS)
    checkpoint_estimator: bool = option(True, "method", "gradient checkpointing through the one-step x0 estimator")
    checkpoint_decoder: bool = option(True, "method", "gradient checkpointing through the task's decoder (sd: VAE)")
    checkpoint_reward: bool = option(True, "method", "gradient checkpointing through the task's reward model (sd)")
    reward_mask: bool = option(False, "method", "the authors' mask: drop samples with reward <= 0 from the loss")
    step_sampler: str = option("uniform", "method", "how the trained step j is drawn: uniform, or discounted "
                               "(q(j) ~ gamma^(T-1-j), loss weighted by (1/T)/q(j))", STEP_SAMPLERS)
    steps_per_trajectory: int = option(1, "method", "trained steps j drawn per sampled trajectory")
    draft_k: int = option(1, "method", "draft, draft-kl: transitions at the end of the chain the reward gradient "
                          "flows through")
    lv_samples: int = option(2, "method", "draft-lv: re-noised copies of the sample denoised again by the last "
                             "transition")
    refl_lo: int = option(-6, "method", "refl: first transition the stop K is drawn from (negative: counted from "
                          "the end, -1 = the last, clipped to the chain)")
    refl_hi: int = option(-1, "method", "refl: last transition the stop K is drawn from (negative: from the end)")
    alignprop_min_k: int = option(1, "method", "alignprop: fewest transitions (at the end) that carry gradient")
    alignprop_max_k: int = option(0, "method", "alignprop: most transitions that carry gradient (0: all T)")
    # replay buffer
    buffer: bool = option(True, "buffer", "keep trajectories in an in-memory replay buffer (off: fully on-policy)")
    buffer_size: int = option(512, "buffer", "capacity in trajectories (ring: oldest overwritten); with N "
                              "processes each keeps a shard of buffer_size / N")
    buffer_sampler: str = option("uniform", "buffer", "uniform (without replacement), newest, or reward-gamma "
                                 "(prioritised, P(i,j) ~ (r_i - min r) * gamma^(T-1-j))",
                                 BUFFER_SAMPLERS)
    buffer_importance_weights: bool = option(False, "buffer", "weight reward-gamma samples by uniform/P to undo "
                                             "its bias")
    buffer_dtype: str = option("float32", "buffer", "storage dtype of buffered latents",
                               ("float32", "bfloat16", "float16"))
    rollout_batch: int = option(32, "buffer", "new trajectories per rollout (all processes together: each "
                                "collects rollout_batch / N)")
    replay_ratio: int = option(2, "buffer", "optimizer steps per rollout")
    # optimisation
    steps: int = option(80, "optim", "optimizer steps")
    batch_size: int = option(32, "optim", "trained samples (trajectory, step) per optimizer step, over all "
                             "processes (each of N trains batch_size / N)")
    grad_accum: int = option(1, "optim", "micro-batches per optimizer step and process (micro-batch = "
                            "batch_size / N / grad_accum with N processes)")
    lr: float = option(1e-3, "optim", "AdamW learning rate of the adapter")
    weight_decay: float = option(0.0, "optim", "AdamW weight decay")
    grad_clip: float = option(1.0, "optim", "gradient-norm clip (0: off)")
    lora_rank: int = option(4, "optim", "policy LoRA rank")
    lora_alpha: float = option(4.0, "optim", "policy LoRA alpha (scale = alpha / rank)")
    # logging, evaluation, checkpoints, guards
    log_every: int = option(5, "logging", "steps between log lines and metrics.jsonl rows")
    eval_every: int = option(0, "logging", "steps between evaluations (0: base and final only)")
    eval_per_class: int = option(32, "logging", "evaluation samples per condition")
    checkpoint_every: int = option(40, "logging", "steps between checkpoints (always one at the end)")
    max_nonfinite_steps: int = option(5, "logging", "stop after this many non-finite steps in a row")
    progress: bool = option(True, "logging", "progress bar")
    log_to: str = option("auto", "logging", "experiment trackers, comma-separated: tensorboard (RUN/tensorboard), "
                         "wandb (RUN/wandb; WANDB_MODE=offline needs no network), none; auto: tensorboard when "
                         "installed, else none. The run directory's files are written either way",
                         metavar="TRACKERS")
    log_group: str | None = option(None, "logging", "the run's group in the trackers (wandb's group; compare sets "
                                   "its --out folder's name)")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# options only some built-in tasks read: given to another built-in task they would be silently ignored, so refused
# (sd-random reads --model only to refuse it with its own reason)
TASK_OPTIONS = {"model": ("digits", "sd", "sd-random"), "prompts": ("sd", "sd-random"),
                "resolution": ("sd", "sd-random"), "weights_dtype": ("sd", "sd-random"),
                "consistency": ("sd", "sd-random")}
# The options a resume may change, with their effect; every other option is refused on resume (the checkpoint's
# adapter, optimizer state, replay buffer and base evaluation were made under the saved values).
RESUMABLE = {
    "steps": "trains to the new total (a run can be extended, or ended earlier than planned)",
    "lr": "the optimizer's learning rate from the resumed step on; Adam's moment estimates are kept",
    "log_every": "log rows from the resumed step on", "eval_every": "evaluations from the resumed step on",
    "checkpoint_every": "checkpoints from the resumed step on", "progress": "the progress bar",
    "max_nonfinite_steps": "the non-finite guard's limit from the resumed step on",
    "kernels": "the op backend: the backends agree to rounding, so the run is no longer bit-identical to one "
               "that kept its backend",
    "cuda_graphs": "how the rollouts are launched (same maths)",
    "log_to": "the experiment trackers from the resumed step on (TensorBoard appends to RUN/tensorboard; wandb "
              "continues the run whose id RUN/wandb_id.txt holds)",
    "log_group": "the run's group in the trackers",
}


def field_types(f: dataclasses.Field) -> tuple[str, ...]:
    """The JSON-side types a field accepts: its annotation's parts (the annotations are strings here)."""
    return tuple(part.strip() for part in str(f.type).split("|"))


def check_types(values, fields: dict[str, dataclasses.Field], source: str) -> None:
    """ValueError naming `source` and the field when `values` is not an object of fields of the right JSON types
    (an int is a float; a bool is neither)."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a JSON object of option names and values, got a JSON "
                         f"{json_kind(values)}")
    accepts = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}
    for name, value in values.items():
        if name not in fields:
            continue   # named as unknown by the caller
        types = field_types(fields[name])
        ok = any(isinstance(value, accepts[t]) and not (isinstance(value, bool) and t in ("int", "float"))
                 for t in types)
        if not ok:
            expected = " or ".join("null" if t == "None" else {"str": "a string", "bool": "true or false",
                                                               "int": "an integer", "float": "a number"}[t]
                                   for t in types)
            raise ValueError(f"{source}: {name}={value!r} must be {expected}, got a JSON {json_kind(value)}")


def json_kind(value) -> str:
    for kind, types in (("boolean", bool), ("integer", int), ("number", float), ("string", str),
                        ("array", (list, tuple)), ("object", dict)):
        if isinstance(value, types):
            return kind
    return "null" if value is None else type(value).__name__


def read_json(path: Path, what: str):
    """A JSON file's value; ValueError naming `what` and the file when it is unreadable, not UTF-8 or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{what}: cannot read {path} ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {path} is not UTF-8 text (byte {err.start}): not a JSON config") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: {path} is not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from err


def read_saved(run_dir: Path) -> dict:
    """A run directory's config.json, checked to be an object of options."""
    what = f"resume={str(run_dir)!r}"
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{what}: no config.json there (not a run directory)")
    saved = read_json(path, what)
    if not isinstance(saved, dict):
        raise ValueError(f"{what}: {path} is not a JSON object of options")
    return saved


def resume_changes(saved: dict, values: dict, allowed: dict, what: str) -> dict[str, list]:
    """{name: [saved, new]} of the options in `values` that differ from the run's `saved` config.json (`out`, the
    folder, aside); ValueError naming the first one not in `allowed` and why it cannot change."""
    changes = {name: [saved[name], value] for name, value in values.items()
               if name != "out" and name in saved and saved[name] != value}
    for name, (old, new) in changes.items():
        if name not in allowed:
            raise UsageError(f"{what}: --{name.replace('_', '-')} cannot change on resume (the run has {old!r}, "
                             f"given {new!r}): its checkpoint was made with {old!r}; options that may change: "
                             f"{', '.join(sorted(allowed))}")
    return changes


def check_finite(cfg, fields: dict[str, dataclasses.Field]) -> None:
    """Every float option of `cfg` finite: NaN passes every range check as False, Inf several as True."""
    for name, f in fields.items():
        value = getattr(cfg, name)
        if "float" in field_types(f) and value is not None and not math.isfinite(value):
            raise ValueError(f"{name}={value!r}: must be a finite number")


def check_out(out: str) -> None:
    """--out must be a folder (or not exist yet) under a writable parent."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out={out!r}: is a file, not a folder")
    existing = next(p for p in (path, *path.resolve().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out={out!r}: {existing} is not writable")


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first impossible value."""
    from sqdf_fast import rewards
    from sqdf_fast.distributed import world_size
    from sqdf_fast.tasks import BUILTIN
    check_finite(cfg, FIELDS)
    world = world_size()
    per_process = cfg.batch_size // world
    checks = [
        (0 < cfg.gamma <= 1, "gamma", "must lie in (0, 1]"),
        (cfg.alpha >= 0, "alpha", "must be >= 0"),
        (cfg.target_alpha is None or cfg.target_alpha > 0, "target_alpha", "must be > 0 (or unset: alpha)"),
        (0 < cfg.eta <= 1, "eta", "must lie in (0, 1] (at eta = 0 the policy is deterministic and the KL divides "
                                  "by zero; above 1 the DDIM noise exceeds the step's variance)"),
        (cfg.guidance >= 0, "guidance", "must be >= 0"),
        (cfg.estimator_guidance >= 0, "estimator_guidance", "must be >= 0"),
        (cfg.sample_steps >= 1, "sample_steps", "must be >= 1"),
        (cfg.q_samples >= 1, "q_samples", "must be >= 1"),
        (cfg.q_steps >= 0, "q_steps", "must be >= 0"),
        (cfg.q_samples == 1 or cfg.q_steps >= 1, "q_samples",
         "needs q_steps >= 1: without a stochastic step the samples are all the one-step estimate"),
        (cfg.task in BUILTIN or ":" in cfg.task, "task", f"unknown task; built-in: {sorted(BUILTIN)} "
                                                          "or module:function"),
        (cfg.steps >= 1, "steps", "must be >= 1"),
        (0 <= cfg.seed < 2 ** 62, "seed", "must lie in [0, 2**62) (each stream adds its own offset to it)"),
        (cfg.out is None or cfg.out.strip() != "", "out", "must name a folder (or be left out for the default)"),
        (cfg.batch_size >= 1, "batch_size", "must be >= 1"),
        # batch_size, rollout_batch and buffer_size are global: each of the WORLD_SIZE processes takes its share
        (cfg.batch_size % world == 0, "batch_size", f"must be divisible by the {world} processes (WORLD_SIZE): it is "
                                                    f"the global batch, each process trains batch_size / {world}"),
        (cfg.grad_accum >= 1 and per_process % cfg.grad_accum == 0, "grad_accum",
         "must be >= 1 and divide batch_size" + ("" if world == 1 else f" / WORLD_SIZE = {per_process}")),
        (cfg.steps_per_trajectory >= 1 and (per_process // max(cfg.grad_accum, 1)) % cfg.steps_per_trajectory == 0,
         "steps_per_trajectory", "must be >= 1 and divide the micro-batch size"),
        (1 <= cfg.draft_k <= cfg.sample_steps, "draft_k", f"must be in [1, sample_steps={cfg.sample_steps}]"),
        (cfg.lv_samples >= 1, "lv_samples", "must be >= 1"),
        (cfg.refl_hi < cfg.sample_steps, "refl_hi",
         f"must be a transition index < sample_steps={cfg.sample_steps} (negative: counted from the end)"),
        (cfg.refl_lo < cfg.sample_steps and refl_range(cfg)[0] <= refl_range(cfg)[1], "refl_lo",
         f"must be a transition index < sample_steps={cfg.sample_steps}, not after refl_hi={cfg.refl_hi}"),
        (1 <= cfg.alignprop_min_k <= cfg.sample_steps, "alignprop_min_k",
         f"must be in [1, sample_steps={cfg.sample_steps}]"),
        (0 <= cfg.alignprop_max_k <= cfg.sample_steps and alignprop_range(cfg)[0] <= alignprop_range(cfg)[1],
         "alignprop_max_k", (f"must be 0 (all) or in [alignprop_min_k={cfg.alignprop_min_k}, "
                             f"sample_steps={cfg.sample_steps}]")),
        (cfg.lr > 0, "lr", "must be > 0"),
        (cfg.weight_decay >= 0, "weight_decay", "must be >= 0"),
        (cfg.grad_clip >= 0, "grad_clip", "must be >= 0"),
        (cfg.lora_rank >= 1, "lora_rank", "must be >= 1"),
        (cfg.rollout_batch >= 1 and cfg.rollout_batch % world == 0, "rollout_batch",
         "must be >= 1" + ("" if world == 1 else f" and divisible by the {world} processes (WORLD_SIZE)")),
        (cfg.replay_ratio >= 1, "replay_ratio", "must be >= 1"),
        (not cfg.buffer or cfg.buffer_size >= max(cfg.batch_size, cfg.rollout_batch), "buffer_size",
         f"must hold at least one batch (batch_size {cfg.batch_size}, rollout_batch {cfg.rollout_batch})"),
        (not cfg.buffer or cfg.buffer_size % world == 0, "buffer_size",
         f"must be divisible by the {world} processes (WORLD_SIZE): each keeps a shard of buffer_size / {world}"),
        (cfg.log_every >= 1, "log_every", "must be >= 1"),
        (cfg.eval_every >= 0, "eval_every", "must be >= 0"),
        (cfg.eval_per_class >= 2, "eval_per_class", "must be >= 2 (diversity needs pairs)"),
        (cfg.checkpoint_every >= 1, "checkpoint_every", "must be >= 1"),
        (cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1"),
        (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
         "must be auto, cpu, cuda or cuda:N"),
        (world == 1 or not cfg.device.startswith("cuda:"), "device",
         f"with {world} processes (WORLD_SIZE) each takes cuda:LOCAL_RANK: pass cuda or auto"),
        (rewards.is_known(cfg.reward), "reward",
         f"unknown reward; built-in: {', '.join(rewards.BUILTIN_REWARDS)}, or module:function"),
        (cfg.resolution >= 8, "resolution", "must be >= 8 pixels"),
        (cfg.consistency is None or Path(cfg.consistency).exists(), "consistency", "no such file or folder"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: {message}")
    for name, f in FIELDS.items():
        choices = f.metadata["choices"]
        if choices and getattr(cfg, name) not in choices:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: must be one of {', '.join(choices)}")
    for name, readers in TASK_OPTIONS.items():
        if cfg.task in BUILTIN and cfg.task not in readers and getattr(cfg, name) != FIELDS[name].default:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: task {cfg.task!r} does not use it (only "
                             f"{', '.join(readers)} do)")
    if cfg.model is not None and not Path(cfg.model).exists():
        raise ValueError(f"model={cfg.model!r}: no such folder")
    if cfg.out is not None:
        check_out(cfg.out)
    tracking.resolve(cfg.log_to)   # a tracker whose package is missing is named here, before any work
    rewards.check_weights(cfg.reward, cfg.reward_weights)   # files and shapes, before any network is built
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device!r}: CUDA is not available on this machine")


def from_dict(values: dict, source: str = "config") -> TrainConfig:
    """A config from explicit values over the task's own defaults for the method (sqdf_fast.tasks.config_defaults)
    over the dataclass defaults; `source` names the values in errors. `validate` checks it."""
    from sqdf_fast.tasks import config_defaults
    check_types(values, FIELDS, source)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown config field(s) {', '.join(unknown)}")
    task, method = values.get("task", FIELDS["task"].default), values.get("method", FIELDS["method"].default)
    return TrainConfig(**{**config_defaults(task, method), **values})


def make(**values) -> TrainConfig:
    """A validated config for the Python API: `values` over the task's defaults for the method over the dataclass
    defaults (what the command line gives for the same options); ValueError naming the first bad value."""
    cfg = from_dict(values, "make_config")
    validate(cfg)
    return cfg


def build_parser(prog: str = "python -m sqdf_fast.train",
                 description: str = "Fine-tune a diffusion model toward a reward with SQDF. With no arguments: the "
                                    "built-in digits task on the CPU in about a minute.") -> argparse.ArgumentParser:
    """Every TrainConfig field as an option, plus --config and --resume; absent options stay absent (SUPPRESS)."""
    parser = argparse.ArgumentParser(prog=prog, usage=f"{prog} [options]", description=description,
                                     argument_default=argparse.SUPPRESS,
                                     epilog=EPILOG)
    parser.add_argument("--config", metavar="FILE", help="JSON file of config fields (a run's config.json works); "
                                                         "command-line options override it")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint; "
                                                        "options given here override its config.json")
    add_options(parser, FIELDS)
    return parser


def add_options(parser: argparse.ArgumentParser, fields: dict[str, dataclasses.Field]) -> None:
    """One --flag per dataclass field made by `option`, in argument groups by the field's group."""
    groups = {}
    for name, f in fields.items():
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']}" + ("" if f.default is None else f" (default: {f.default})")
        types = field_types(f)
        if "bool" in types:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = int if "int" in types else float if "float" in types else str
            metavar = f.metadata.get("metavar") or (None if f.metadata["choices"] else
                                                     {int: "N", float: "X"}.get(kind, name.upper()))
            group.add_argument(flag, type=kind, choices=f.metadata["choices"], metavar=metavar, help=help_text)


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """Defaults < --config file (or the resumed run's config.json) < command line. A bad option or value exits 2
    with one line (sqdf_fast.cli)."""
    args = vars(build_parser().parse_args(argv))
    with usage_errors():
        values, resume, source = layered_values(args)
        cfg = from_dict(values, source)
        validate(cfg)
    return cfg, resume


def layered_values(args: dict) -> tuple[dict, str | None, str]:
    """The option values of a parsed command line (`args`, with its --config and --resume): the resumed run's
    config.json < the --config file < the command line, `out` the resumed folder; also the resume folder and the
    name of the source for error messages."""
    config_file, resume = args.pop("config", None), args.pop("resume", None)
    values = {}
    if resume is not None:
        values.update(read_saved(resume))
        if "out" in args and Path(args["out"]) != Path(resume):
            raise ValueError(f"out={args['out']!r}: a resumed run continues in its own folder ({resume}); copy the "
                             "folder first to branch it")
    if config_file is not None:
        from_file = read_json(config_file, f"config={config_file!r}")
        if not isinstance(from_file, dict):
            raise ValueError(f"config={config_file!r}: expected a JSON object of option names and values, got a "
                             f"JSON {json_kind(from_file)}")
        values.update(from_file)
    values.update(args)
    if resume is not None:
        values["out"] = str(resume)
    return values, resume, config_file or "config"
