"""`python -m sqdf_fast.bbo`: online black-box optimisation, round by round (docs/bbo.md).

The true reward is an oracle that gives no gradient and is paid per query. Each round r = 1..R:

    1. sample   N_r samples of the current model (round 1: the base model), in batches of oracle_batch; each
                batch is labelled by the oracle (plus oracle_noise Gaussian noise) and written to
                queries.safetensors (atomically) before anything uses it
    2. fit      the proxy (sqdf_fast.bbo.proxy) on every query so far, warm-started, early-stopped on the newest
                proxy_holdout share
    3. bonus    greedy (none), ucb, or bootstrap (heads)
    4. tune     steps_per_round optimizer steps of the engine's method (`--method`, SQDF by default) toward
                proxy + bonus, with the KL to the base model (or to the previous round's model: --kl-to previous);
                SQDF's replay buffer is cleared first (--keep-buffer: kept, its rewards relabelled)
    5. measure  the trainer's evaluation (fixed-seed samples: diversity, fd, path KL to the base) plus the oracle on
                those samples (evaluation queries: counted apart, never given to the proxy); rounds.jsonl row,
                sample grid, oracle curve; a checkpoint (adapter, optimizer, buffer, RNG, proxy, round)

The loop drives the trainer as a library (sqdf_fast.train: build_run, train_until, evaluate, save_checkpoint): the
engine, methods, buffer, checkpoints and metrics are the trainer's own.

Resume (--resume DIR) restarts the round the run was in from the checkpoint of the round before: every random
stream of a round is seeded by (seed, round[, batch]), so the samples a batch would query are the same, a batch
already labelled is read back instead of sampled and queried again, and the run ends where an uninterrupted one
ends.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from sqdf_fast import cli, config, ops, tracking
from sqdf_fast.adapters import add_frozen_copy, copy_policy_into
from sqdf_fast.bbo.oracles import BUILTIN_ORACLES, Oracle, build_oracle
from sqdf_fast.bbo.proxy import (
    BONUSES,
    BOOTSTRAP_RULES,
    FitResult,
    ProxyNet,
    ProxyReward,
    UCBBonus,
    fit,
    holdout_rows,
)
from sqdf_fast.config import TrainConfig, option
from sqdf_fast.distributed import launch
from sqdf_fast.files import dumps, write_atomic, write_text_atomic
from sqdf_fast.memory import keep_freed_cpu_memory
from sqdf_fast.rollout import rollout
from sqdf_fast.tasks import load_callable
from sqdf_fast.train import (
    EVAL_METRICS,
    Run,
    build_run,
    evaluate,
    save_checkpoint,
    save_samples,
    track_samples,
    train_until,
)

PREVIOUS = "previous"   # the frozen adapter holding the previous round's policy (--kl-to previous)
QUERIES = "queries.safetensors"
ROUNDS = "rounds.jsonl"
TIME_KEYS = ("sampling", "oracle", "proxy", "finetune", "eval")


@dataclass
class BBOConfig:
    oracle: str = option("auto", "black-box", "the oracle: " + ", ".join(BUILTIN_ORACLES) + " or module:function "
                         "f(images, cond) -> (B,) (auto: compactness on digits, the task's reward elsewhere)")
    oracle_batch: int = option(64, "black-box", "samples per oracle call (and per sampling batch)")
    oracle_noise: float = option(0.0, "black-box", "standard deviation of Gaussian noise added to every label "
                                 "(SEIKO uses 0.1)")
    drop_nonfinite_labels: bool = option(False, "black-box", "drop and count NaN/Inf labels instead of stopping")
    rounds: int = option(4, "black-box", "rounds R")
    queries: str = option("64", "black-box", "oracle queries per round: one number (the first round's, doubling "
                          "each round) or a comma list, one per round")
    non_adaptive: bool = option(False, "black-box", "the whole query budget in round 1 (the non-adaptive baseline)")
    steps_per_round: int = option(20, "black-box", "optimizer steps of fine-tuning per round")
    bonus: str = option("greedy", "black-box", "optimism: greedy (none), ucb, bootstrap", BONUSES)
    bonus_scale: float = option(1.0, "black-box", "c: the UCB bonus's scale, or bootstrap mean-std's weight of the "
                                "std (in label standard deviations)")
    ucb_ridge: float = option(1e-3, "black-box", "lambda of the UCB bonus's Phi^T Phi / n + lambda I")
    bootstrap_heads: int = option(4, "black-box", "K: proxy heads, each fitted to its own resample (bootstrap)")
    bootstrap_rule: str = option("max", "black-box", "bootstrap optimism: max over heads, or mean-std (mean + c "
                                 "std)", BOOTSTRAP_RULES)
    proxy_hidden: int = option(128, "black-box", "width of the proxy MLP's two hidden layers")
    proxy_epochs: int = option(300, "black-box", "most proxy epochs per round")
    proxy_patience: int = option(30, "black-box", "epochs without a better held-out error before the fit stops")
    proxy_lr: float = option(1e-3, "black-box", "AdamW learning rate of the proxy")
    proxy_batch: int = option(128, "black-box", "proxy mini-batch size")
    proxy_holdout: float = option(0.05, "black-box", "share of the newest queries held out to stop the fit")
    kl_to: str = option("base", "black-box", "KL reference of the fine-tuning: base model, or the previous round's "
                        "model (SEIKO)", ("base", "previous"))
    keep_buffer: bool = option(False, "black-box", "keep SQDF's replay buffer across rounds (its rewards relabelled "
                               "by the new proxy) instead of clearing it")


BBO_FIELDS = {f.name: f for f in dataclasses.fields(BBOConfig)}
# every black-box option shapes the queries asked and the proxy fitted so far: none may change on resume
BBO_RESUMABLE: dict[str, str] = {}
# a budget that fits each built-in task (over BBOConfig's defaults, under explicit options)
TASK_DEFAULTS = {
    "gmm2d": {"queries": "64", "steps_per_round": 60, "oracle_batch": 64},
    "gmm2d-ring": {"queries": "64", "steps_per_round": 60, "oracle_batch": 64},
    "sd": {"queries": "1024", "steps_per_round": 100, "oracle_batch": 16},
    "sd-random": {"queries": "8", "steps_per_round": 2, "oracle_batch": 4, "proxy_holdout": 0.25},
}


def query_schedule(cfg: BBOConfig) -> list[int]:
    """Queries per round: the comma list, or the first size doubling; the non-adaptive baseline puts the same total
    in round 1."""
    try:
        sizes = [int(n) for n in cfg.queries.split(",")]
    except ValueError:
        raise ValueError(f"queries={cfg.queries!r}: a number or a comma list of numbers, one per round") from None
    if len(sizes) == 1:
        sizes = [sizes[0] * 2 ** r for r in range(cfg.rounds)]
    if len(sizes) != cfg.rounds:
        raise ValueError(f"queries={cfg.queries!r}: {len(sizes)} sizes for rounds={cfg.rounds}")
    if any(n < 0 for n in sizes) or sizes[0] < 1:
        raise ValueError(f"queries={cfg.queries!r}: round 1 needs queries and none may be negative")
    return [sum(sizes)] + [0] * (cfg.rounds - 1) if cfg.non_adaptive else sizes


def validate(cfg: BBOConfig, train: TrainConfig) -> None:
    """Impossible budgets and options, before any work."""
    config.check_finite(cfg, BBO_FIELDS)
    if ":" in cfg.oracle:   # the user's oracle is imported now, not after the base model's evaluation
        load_callable(cfg.oracle, "oracle", ("images", "cond"))
    checks = [
        (cfg.rounds >= 1, "rounds", "must be >= 1"),
        (cfg.oracle_batch >= 1, "oracle_batch", "must be >= 1"),
        (cfg.oracle_noise >= 0, "oracle_noise", "must be >= 0"),
        (cfg.steps_per_round >= 1, "steps_per_round", "must be >= 1"),
        (cfg.bonus_scale >= 0, "bonus_scale", "must be >= 0"),
        (cfg.ucb_ridge > 0, "ucb_ridge", "must be > 0 (it keeps the Cholesky factorisation defined)"),
        (cfg.bootstrap_heads >= 2 or cfg.bonus != "bootstrap", "bootstrap_heads", "must be >= 2 for bootstrap"),
        (cfg.proxy_hidden >= 1, "proxy_hidden", "must be >= 1"),
        (cfg.proxy_epochs >= 1, "proxy_epochs", "must be >= 1"),
        (cfg.proxy_patience >= 1, "proxy_patience", "must be >= 1"),
        (cfg.proxy_lr > 0, "proxy_lr", "must be > 0"),
        (cfg.proxy_batch >= 1, "proxy_batch", "must be >= 1"),
        (0 < cfg.proxy_holdout < 1, "proxy_holdout", "must lie in (0, 1)"),
        (cfg.oracle in BUILTIN_ORACLES or ":" in cfg.oracle, "oracle",
         f"built-in oracles are {', '.join(BUILTIN_ORACLES)}, or module:function"),
        (cfg.kl_to == "base" or train.method in ("sqdf", "draft-kl"), "kl_to",
         f"method {train.method!r} has no KL term to point at the previous round"),
        (train.method == "sqdf" or not cfg.keep_buffer, "keep_buffer", "only SQDF keeps a replay buffer"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: {message}")
    for name, f in BBO_FIELDS.items():
        if f.metadata["choices"] and getattr(cfg, name) not in f.metadata["choices"]:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: must be one of {', '.join(f.metadata['choices'])}")
    first = query_schedule(cfg)[0]
    if holdout_rows(first, cfg.proxy_holdout) < 1:
        least = math.ceil(1 / cfg.proxy_holdout - 1e-9)
        raise ValueError(f"queries={cfg.queries!r}: round 1's {first} queries hold out none at proxy_holdout="
                         f"{cfg.proxy_holdout} (the fit stops on the newest share): query at least {least} in "
                         "round 1 or raise proxy_holdout")
    if train.method == "sqdf" and train.buffer and cfg.steps_per_round % train.replay_ratio:
        raise ValueError(f"steps_per_round={cfg.steps_per_round}: must be a multiple of replay_ratio="
                         f"{train.replay_ratio}, so that each round (its buffer cleared) starts with a rollout")


# ---- the command line -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = config.build_parser(
        prog="python -m sqdf_fast.bbo",
        description="Online black-box optimisation: fine-tune toward a learned proxy of an oracle, round by round, "
                    "with optimism. With no arguments: digits against the compactness oracle on the CPU in about two "
                    "minutes. Every training option applies to the fine-tuning (except --steps: "
                    "rounds x steps_per_round).")
    config.add_options(parser, BBO_FIELDS)
    return parser


def configs_from(values: dict, source: str) -> tuple[TrainConfig, BBOConfig]:
    """Split one flat dict of options (config.json, --config, the command line) into the two configs, each over
    its defaults for the task."""
    unknown = sorted(set(values) - set(config.FIELDS) - set(BBO_FIELDS))
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
    if isinstance(values.get("queries"), int) and not isinstance(values["queries"], bool):
        values = {**values, "queries": str(values["queries"])}   # a single number given as a JSON number
    config.check_types(values, BBO_FIELDS, source)
    bbo = BBOConfig(**{**TASK_DEFAULTS.get(values.get("task", "digits"), {}),
                       **{k: v for k, v in values.items() if k in BBO_FIELDS}})
    train_values = {k: v for k, v in values.items() if k in config.FIELDS}
    train_values["steps"] = bbo.rounds * bbo.steps_per_round
    return config.from_dict(train_values, source), bbo


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, BBOConfig, str | None]:
    """Defaults < --config file (or the resumed run's config.json) < command line, as the trainer's; --steps is
    refused (rounds x steps_per_round). A bad option or value exits 2 with one line (sqdf_fast.cli)."""
    args = vars(build_parser().parse_args(argv))
    with cli.usage_errors():
        resumed = "resume" in args
        values, resume, source = config.layered_values(args)
        if "steps" in args or ("steps" in values and not resumed):   # a resumed config.json holds the derived value
            raise ValueError("steps: the black-box loop trains rounds x steps_per_round steps; set --steps-per-round")
        values.pop("steps", None)
        train, bbo = configs_from(values, source)
        validate(bbo, train)   # first: the budget sets train.steps
        config.validate(train)
    return train, bbo, resume


def stream_seed(seed: int, *parts) -> int:
    """A 63-bit seed for one random stream of a run, the same in every process and after every resume."""
    return int.from_bytes(hashlib.sha256(repr((seed, *parts)).encode()).digest()[:8], "little") >> 1


# ---- the query set ----------------------------------------------------------------------------------------------
class QuerySet:
    """Every oracle answer the proxy may learn from: features (N, F), labels (N,) float64 (NaN: a dropped
    non-finite answer), the round and batch of each row. Saved whole, atomically, after every batch."""

    def __init__(self, path: Path):
        self.path = path
        self.features: Tensor | None = None
        self.labels = torch.zeros(0, dtype=torch.float64)
        self.round = torch.zeros(0, dtype=torch.long)
        self.batch = torch.zeros(0, dtype=torch.long)

    def load(self, last_round: int) -> None:
        """The saved rows of rounds up to `last_round` (rows of a later round cannot exist: they follow it)."""
        if not self.path.is_file():
            return
        saved = load_file(str(self.path))
        keep = saved["round"] <= last_round
        self.features, self.labels = saved["features"][keep], saved["labels"][keep]
        self.round, self.batch = saved["round"][keep], saved["batch"][keep]

    def add(self, features: Tensor, labels: Tensor, round_: int, batch: int) -> None:
        n = labels.shape[0]
        features = features.detach().float().cpu()
        self.features = features if self.features is None else torch.cat([self.features, features])
        self.labels = torch.cat([self.labels, labels])
        self.round = torch.cat([self.round, torch.full((n,), round_)])
        self.batch = torch.cat([self.batch, torch.full((n,), batch)])
        write_atomic(self.path, lambda p: save_file({"features": self.features, "labels": self.labels,
                                                     "round": self.round, "batch": self.batch}, str(p)))

    def has_batch(self, round_: int, batch: int) -> bool:
        return bool(((self.round == round_) & (self.batch == batch)).any())

    def usable(self) -> tuple[Tensor, Tensor]:
        """(features, labels) of the finite labels, in query order."""
        keep = torch.isfinite(self.labels)
        return self.features[keep], self.labels[keep]

    @property
    def count(self) -> int:
        return int(torch.isfinite(self.labels).sum())

    @property
    def dropped(self) -> int:
        return int((~torch.isfinite(self.labels)).sum())


# ---- one black-box run ------------------------------------------------------------------------------------------
class BlackBox:
    """The rounds of one run on a trainer `Run`."""

    def __init__(self, run: Run, cfg: BBOConfig, oracle: Oracle):
        self.run, self.cfg, self.oracle = run, cfg, oracle
        self.task, self.method = run.task, run.method
        self.features = self.task.proxy_features or self.task.features
        self.schedule = query_schedule(cfg)
        self.queries = QuerySet(run.out / QUERIES)
        self.net: ProxyNet | None = None        # the proxy being fitted (on the CPU)
        self.reward: ProxyReward | None = None  # its frozen copy with the bonus, the fine-tuning's reward
        self.last_fit: FitResult | None = None
        self.rows: list[dict] = []
        self.done = -1                 # rounds completed (0: the base model measured)
        self.eval_queries = 0
        self.target_metrics: list[str] = []   # the task's own metrics against a known target (gmm2d)
        if cfg.kl_to == "previous":
            add_frozen_copy(self.task.unet, PREVIOUS)
            self.method.reference_adapter = PREVIOUS

    # -- state ----------------------------------------------------------------------------------------------------
    def restore(self) -> None:
        """After build_run resumed the trainer: the rounds done, the proxy, the queries and rounds.jsonl rows."""
        state = self.run.extra.get("bbo")
        if state is None:
            raise ValueError(f"resume={str(self.run.out)!r}: the checkpoint holds no black-box state (a run of "
                             "sqdf_fast.train? resume it with python -m sqdf_fast.train)")
        self.done, self.eval_queries = state["round"], state["eval_queries"]
        if state["proxy"] is not None:
            self.net = self.new_net(state["proxy"]["weights.0"].shape[1])
            self.net.load_state_dict(state["proxy"])
        rows_path = self.run.out / ROUNDS
        self.rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
        self.rows = [row for row in self.rows if row["round"] <= self.done]
        self.queries.load(self.done + 1)
        self.last_fit = None if state["last_fit"] is None else FitResult(**state["last_fit"])
        self.target_metrics = state["target_metrics"]
        if self.net is not None and self.done < self.cfg.rounds and self.schedule[self.done] == 0:   # kept
            self.proxy_reward()

    def save(self) -> None:
        self.run.extra = {"bbo": {"round": self.done, "eval_queries": self.eval_queries,
                                  "proxy": None if self.net is None else self.net.state_dict(),
                                  "last_fit": None if self.last_fit is None else dataclasses.asdict(self.last_fit),
                                  "target_metrics": self.target_metrics}}
        save_checkpoint(self.run)

    def new_net(self, in_features: int) -> ProxyNet:
        heads = self.cfg.bootstrap_heads if self.cfg.bonus == "bootstrap" else 1
        generator = torch.Generator().manual_seed(stream_seed(self.run.cfg.seed, "proxy-init"))
        return ProxyNet(in_features, self.cfg.proxy_hidden, heads, generator)

    # -- the rounds -----------------------------------------------------------------------------------------------
    def run_rounds(self) -> dict:
        if self.done < 0:
            self.measure(0, {k: 0.0 for k in TIME_KEYS}, fit_result=None)
        for round_ in range(self.done + 1, self.cfg.rounds + 1):
            self.one_round(round_)
        return self.finish()

    def one_round(self, round_: int) -> None:
        times = {k: 0.0 for k in TIME_KEYS}
        self.query(round_, times)
        start = time.perf_counter()
        if self.schedule[round_ - 1] or self.reward is None:   # a round without new queries keeps its proxy
            self.last_fit = self.fit_proxy(round_)
            self.proxy_reward()
        reward = self.reward
        times["proxy"] = time.perf_counter() - start
        start = time.perf_counter()
        if self.cfg.kl_to == "previous":
            copy_policy_into(self.task.unet, PREVIOUS)
        if self.method.buffer is not None:
            if self.cfg.keep_buffer:
                self.relabel_buffer(reward)
            else:
                self.method.buffer.clear()
        train_until(self.run, self.run.step + self.cfg.steps_per_round, save=False,
                    desc=f"round {round_}/{self.cfg.rounds}")
        times["finetune"] = sync_time() - start
        self.measure(round_, times, self.last_fit)

    def query(self, round_: int, times: dict) -> None:
        """Round `round_`'s samples of the current model, labelled by the oracle batch by batch; a batch already in
        the query set (a resumed run) is neither sampled nor queried again."""
        n, size = self.schedule[round_ - 1], self.cfg.oracle_batch
        batches = [(b, min(size, n - b * size)) for b in range(-(-n // size))]
        todo = [(b, rows) for b, rows in batches if not self.queries.has_batch(round_, b)]
        bar = tqdm(todo, desc=f"round {round_} queries", dynamic_ncols=True, leave=False,
                   disable=not self.run.cfg.progress or not todo)
        for b, rows in bar:
            start = time.perf_counter()
            images, cond = self.sample(rows, stream_seed(self.run.cfg.seed, "query", round_, b))
            with torch.no_grad():
                features = self.features(images)
            times["sampling"] += sync_time() - start
            start = time.perf_counter()
            labels = self.oracle(images, cond, first_row=b * size)
            if self.cfg.oracle_noise > 0:
                noise = torch.Generator().manual_seed(stream_seed(self.run.cfg.seed, "noise", round_, b))
                labels = labels + self.cfg.oracle_noise * torch.randn(labels.shape, generator=noise,
                                                                      dtype=labels.dtype)
            self.queries.add(features, labels, round_, b)   # on disk before anything uses it
            times["oracle"] += time.perf_counter() - start

    @torch.no_grad()
    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """n samples of the current policy from their own generator: decoded images and their conditions."""
        device = self.run.ctx.device
        generator = torch.Generator(device).manual_seed(seed)
        cond, x_T = self.method.new_chain_start(n, generator)
        _, x0, _ = rollout(self.method.policy_eps, self.method.schedule, x_T, cond, self.run.cfg.eta, generator)
        return self.task.decode(x0), cond

    def fit_proxy(self, round_: int):
        features, labels = self.queries.usable()
        if self.net is None:
            self.net = self.new_net(features.shape[1])
        generator = torch.Generator().manual_seed(stream_seed(self.run.cfg.seed, "fit", round_))
        cfg = self.cfg
        return fit(self.net, features, labels, generator, holdout=cfg.proxy_holdout, epochs=cfg.proxy_epochs,
                   patience=cfg.proxy_patience, lr=cfg.proxy_lr, batch_size=cfg.proxy_batch)

    def proxy_reward(self) -> ProxyReward:
        """The fitted proxy plus the bonus, on the run's device: one ProxyReward per run (it replaces the task's
        reward once), given each round's fit."""
        ucb = None
        if self.cfg.bonus == "ucb":
            features, _ = self.queries.usable()
            n_val = holdout_rows(features.shape[0], self.cfg.proxy_holdout)
            ucb = UCBBonus(self.net, features[:-n_val], self.cfg.bonus_scale, self.cfg.ucb_ridge)
        if self.reward is None:
            net = ProxyNet(self.net.weights[0].shape[1], self.cfg.proxy_hidden, self.net.heads, torch.Generator())
            self.reward = ProxyReward(net, self.features, self.cfg.bonus, rule=self.cfg.bootstrap_rule,
                                      scale=self.cfg.bonus_scale)
            self.task.replace_reward(self.reward)
        self.reward.update(self.net, ucb)
        return self.reward.to(self.run.ctx.device)

    @torch.no_grad()
    def relabel_buffer(self, reward: ProxyReward) -> None:
        """--keep-buffer: each stored trajectory's reward becomes the new proxy's value of the one-step estimate from
        its last stored state (what the reward-gamma sampler's priorities read)."""
        buffer, method = self.method.buffer, self.method
        last = max(method.schedule.num_steps - 2, 0)   # the transition whose output is the last stored state
        for rows in torch.arange(buffer.size, device=buffer.states.device).split(self.run.cfg.rollout_batch):
            x, cond = buffer.states[rows, -1].float(), buffer.cond[rows]
            j = torch.full((rows.shape[0],), last, device=rows.device)
            buffer.reward[rows] = reward(self.task.decode(method.x0_estimate(x, j, cond)), cond).float()

    def measure(self, round_: int, times: dict, fit_result) -> None:
        """The model after the round: the trainer's evaluation, the oracle on its samples, a rounds.jsonl row,
        the sample grid and the curve; then the checkpoint."""
        run, start = self.run, time.perf_counter()
        reference, self.method.reference_adapter = self.method.reference_adapter, None   # path KL to the base
        metrics, images, _ = evaluate(self.method, run.cfg, run.ctx, base=round_ == 0,
                                      base_features=run.base_features)
        self.method.reference_adapter = reference
        self.target_metrics = [k for k in metrics if k not in EVAL_METRICS]
        cond = self.task.eval_conditions(run.cfg.eval_per_class).to(images.device)
        oracle = self.oracle(images, cond)
        self.eval_queries += oracle.shape[0]
        times["eval"] = sync_time() - start
        finite = oracle[torch.isfinite(oracle)]
        row = {"round": round_, "queries": self.queries.count, "new_queries": self.schedule[round_ - 1]
               if round_ else 0, "dropped_labels": self.queries.dropped, "eval_queries": self.eval_queries,
               "oracle_reward": float(finite.mean()), "oracle_reward_max": float(finite.max()),
               "oracle_reward_std": float(finite.std()) if finite.numel() > 1 else 0.0,
               "proxy_reward": None if round_ == 0 else metrics["reward"],
               "proxy_val_error": None if fit_result is None else fit_result.val_rmse,
               "proxy_epochs": None if fit_result is None else fit_result.epochs,
               "diversity": metrics["diversity"], "fd": metrics["fd"], "kl": metrics["path_kl"],
               **{k: metrics[k] for k in self.target_metrics},
               "steps": run.step, **{f"time_{k}_s": round(v, 3) for k, v in times.items()},
               "wall_s": round(run.wall_s, 2)}
        self.rows.append(row)
        self.done = round_
        run.tracker.log_scalars(run.step, tracking.row_scalars(row, "bbo"))
        if run.ctx.is_main:
            write_text_atomic(run.out / ROUNDS, "".join(dumps(r)[0] + "\n" for r in self.rows))
            track_samples(run, images, run.step, save_samples(self.task, images, run.cfg,
                                                              run.out / f"samples_round{round_}.png"))
            plot_oracle_curve(self.rows, run.out / "oracle_curve.png", f"{run.task.name}: {self.oracle.name}")
            tqdm.write(round_line(row, sum(times.values())))
        self.save()

    def finish(self) -> dict:
        first, last = self.rows[0], self.rows[-1]
        summary = {"oracle_reward_base": first["oracle_reward"], "oracle_reward_final": last["oracle_reward"],
                   "oracle_reward_max_final": last["oracle_reward_max"], "queries": last["queries"],
                   "dropped_labels": last["dropped_labels"], "eval_queries": last["eval_queries"],
                   "diversity_base": first["diversity"], "diversity_final": last["diversity"],
                   "fd_base": first["fd"], "fd_final": last["fd"], "kl_final": last["kl"],
                   "proxy_val_error_final": last["proxy_val_error"], "rounds": self.done, "steps": self.run.step,
                   **{f"time_{k}_s": round(sum(r[f"time_{k}_s"] for r in self.rows), 2) for k in TIME_KEYS},
                   "wall_s": round(self.run.wall_s, 1)}
        summary.update({f"{k}_final": last[k] for k in self.target_metrics})   # where the task knows p*
        if self.run.ctx.is_main:
            self.run.metrics_file.close()
            self.run.tracker.close()
            write_text_atomic(self.run.out / "summary.json", dumps(summary, indent=1)[0])
            print(f"oracle reward {summary['oracle_reward_base']:.4g} (base) -> {summary['oracle_reward_final']:.4g} "
                  f"after {summary['queries']} queries | diversity {summary['diversity_base']:.4g} -> "
                  f"{summary['diversity_final']:.4g} | fd {summary['fd_base']:.4g} -> {summary['fd_final']:.4g} | "
                  f"KL {summary['kl_final']:.4g} nats | wall {summary['wall_s']:.0f} s | run directory "
                  f"{self.run.out}")
        return summary


def sync_time() -> float:
    """perf_counter after the device finished its queued work (a round's time split must not drift into the next
    phase)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def round_line(row: dict, seconds: float) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.4g}"   # noqa: E731
    return (f"round {row['round']} | queries {row['queries']} | oracle reward {fmt(row['oracle_reward'])} (max "
            f"{fmt(row['oracle_reward_max'])}) | proxy val error {fmt(row['proxy_val_error'])} | diversity "
            f"{fmt(row['diversity'])} | fd {fmt(row['fd'])} | KL {fmt(row['kl'])} | {seconds:.1f} s")


def plot_oracle_curve(rows: list[dict], path: Path, title: str) -> None:
    """Oracle reward (mean, and max) of each round's evaluation samples against the queries given to the proxy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    queries = [r["queries"] for r in rows]
    ax.plot(queries, [r["oracle_reward"] for r in rows], "o-", label="mean", drawstyle="steps-post")
    ax.plot(queries, [r["oracle_reward_max"] for r in rows], "^--", alpha=0.6, label="max", drawstyle="steps-post")
    ax.set_xlabel("oracle queries (cumulative)")
    ax.set_ylabel("oracle reward of evaluation samples")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- entry points -----------------------------------------------------------------------------------------------
def optimise(train: TrainConfig, cfg: BBOConfig, resume: str | None = None) -> dict:
    """One black-box run in this process (new, or resumed from `resume`); returns its summary."""
    validate(cfg, train)
    if resume is not None:   # the loop's own options, as config.RESUMABLE does the trainer's (build_run)
        config.resume_changes(config.read_saved(resume), dataclasses.asdict(cfg), BBO_RESUMABLE,
                              f"resume={resume!r}")
    if train.out is None:
        train = dataclasses.replace(train, out=f"runs/bbo-{train.task.replace(':', '-')}-{train.method}-"
                                               f"{time.strftime('%Y%m%d-%H%M%S')}")
    with launch(train.device) as ctx, ops.use_backend(train.kernels):
        if ctx.world > 1:
            raise ValueError("the black-box loop runs in one process (WORLD_SIZE=1): its oracle and proxy are "
                             "not sharded")
        if ctx.device.type == "cpu":
            keep_freed_cpu_memory()
        run = build_run(train, ctx, resume)
        try:
            oracle = build_oracle(cfg.oracle, run.task, cfg.oracle_batch, cfg.drop_nonfinite_labels)
            loop = BlackBox(run, cfg, oracle)
            if resume is not None:
                loop.restore()
            write_text_atomic(run.out / "config.json", json.dumps({**dataclasses.asdict(train),
                                                                   **dataclasses.asdict(cfg)}, indent=1))
            run.tracker.log_config(dataclasses.asdict(cfg))   # the loop's own options beside the trainer's
            return loop.run_rounds()
        finally:
            run.tracker.close()


def main(argv: list[str] | None = None) -> None:
    train, cfg, resume = parse(argv)   # a usage error exits 2
    with cli.run_errors():
        optimise(train, cfg, resume)
