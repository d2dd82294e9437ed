"""`python -m sqdf_fast.bbo.compare`: black-box runs of several methods, bonuses and seeds on one task, same oracle,
proxy and budgets, and the oracle reward each reaches at each cumulative number of queries.

    python -m sqdf_fast.bbo.compare --task digits --seeds 3 --out runs/bbo-digits \\
        [--methods sqdf@bonus=greedy,sqdf@bonus=ucb,non-adaptive,seiko] [--set rounds=3 ...]

A label is a training method or a variant below, with options of its own after `@` (black-box or training
options: `sqdf@bonus=bootstrap@bootstrap_rule=mean-std`). Each (label, seed) is one `python -m sqdf_fast.bbo` run
in OUT/runs/<label>-seed<seed>/. Options apply in the order: the task's defaults, the variant, --set, the label's.

    non-adaptive    SQDF with the whole query budget in round 1
    seiko           SEIKO's way (Uehara et al. 2024): DRaFT+KL fine-tuning on the proxy (gradient through the chain's
                    last transitions), the KL to the previous round's model

Writes (and rewrites after every run) OUT/results.json (one row per run: the summary and each round's queries and
oracle reward), OUT/report.md (oracle reward at each cumulative budget, mean +- std over seeds; the final
diversity, fd, KL and oracle maximum; failed runs listed) and OUT/oracle_curves.png. A run already in
results.json is not repeated: an interrupted comparison continues where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from sqdf_fast import cli, config
from sqdf_fast.bbo import loop
from sqdf_fast.compare import add_common_options, check_common, mean_std, parse_label, start_comparison
from sqdf_fast.distributed import resolve_device
from sqdf_fast.files import dumps, write_text_atomic
from sqdf_fast.info import device_name

VARIANTS = {
    "non-adaptive": ("sqdf", {"non_adaptive": True}),
    "seiko": ("draft-kl", {"kl_to": "previous"}),
}
DEFAULT_LABELS = "sqdf@bonus=greedy,sqdf@bonus=ucb,sqdf@bonus=bootstrap,non-adaptive,seiko"
FINAL_METRICS = ("oracle_reward_final", "oracle_reward_max_final", "diversity_final", "fd_final", "kl_final",
                 "proxy_val_error_final", "wall_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sqdf_fast.bbo.compare", description=__doc__.split("\n\n")[0],
                                     epilog=cli.EPILOG)
    parser.add_argument("--task", default="digits", help="task of every run (default digits)")
    parser.add_argument("--methods", default=DEFAULT_LABELS,
                        help=f"comma-separated labels: a method or a variant ({', '.join(VARIANTS)}), each "
                             f"optionally NAME@key=value... (default {DEFAULT_LABELS})")
    add_common_options(parser, "label", "a training or black-box option for every run (repeatable)")
    return check_common(parser, parser.parse_args(argv))


def run_configs(task: str, label: str, seed: int, overrides: dict, out: Path):
    name, own = parse_label(label)
    method, variant = VARIANTS.get(name, (name, {}))
    values = {"task": task, "method": method, "log_group": out.name, **variant, **overrides, **own, "seed": seed,
              "out": str(out / "runs" / f"{label}-seed{seed}"), "progress": False}
    train, cfg = loop.configs_from(values, f"{label} (seed {seed})")
    loop.validate(cfg, train)
    config.validate(train)
    return train, cfg


TARGET_METRICS = ("dist_to_target_final", "mode_coverage_final")   # where the task knows p* (gmm2d)


def result_row(label: str, seed: int, summary: dict, run_dir: Path) -> dict:
    rounds = [json.loads(line) for line in (run_dir / loop.ROUNDS).read_text().splitlines()]
    keys = FINAL_METRICS + TARGET_METRICS + ("oracle_reward_base",)
    return {"method": label, "seed": seed, **{k: summary[k] for k in keys if k in summary},
            "curve": [(r["queries"], r["oracle_reward"]) for r in rounds]}


def at_budget(curve: list, budget: int) -> float:
    """The oracle reward of the last model whose proxy had seen at most `budget` queries."""
    return [reward for queries, reward in curve if queries <= budget][-1]


def write_report(path: Path, rows: list[dict], labels: list[str], command: str, task: str, machine: str) -> None:
    finished = [r for r in rows if "failed" not in r and r["method"] in labels]
    budgets = sorted({q for r in finished for q, _ in r["curve"]})
    columns = [m for m in FINAL_METRICS + TARGET_METRICS if finished and all(m in r for r in finished)]
    lines = [f"# Black-box optimisation on `{task}`", "", f"Command: `{command}`", "",
             f"Machine: {machine}, torch {torch.__version__}; sum of the runs' wall times "
             f"{sum(r['wall_s'] for r in finished) / 60:.1f} min.", "",
             "Oracle reward (mean over the fixed-seed evaluation samples) of the model fine-tuned with the queries "
             "counted in the column header (the last round whose proxy had seen at most that many), mean +- std "
             "over seeds. Column 0 is the base model.", "",
             "| method | seeds | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for label in labels:
        mine = [r for r in finished if r["method"] == label]
        if mine:
            cells = [mean_std([at_budget(r["curve"], b) for r in mine]) for b in budgets]
            lines.append(f"| {label} | {len(mine)} | " + " | ".join(f"{m:.4g} +- {s:.2g}" for m, s in cells) + " |")
    lines += ["", "At the end: oracle reward (mean and maximum over the evaluation samples), diversity and fd of the "
              "evaluation samples (fd against the task's real data, or the base model's samples), path KL to the "
              "base model in nats, the proxy's held-out error.", "",
              "| method | " + " | ".join(m.removesuffix("_final") for m in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for label in labels:
        mine = [r for r in finished if r["method"] == label]
        if mine:
            cells = [mean_std([r[m] for r in mine]) for m in columns]
            lines.append(f"| {label} | " + " | ".join(f"{m:.4g} +- {s:.2g}" for m, s in cells) + " |")
    failures = [r for r in rows if "failed" in r and r["method"] in labels]
    if failures:
        lines += ["", "Failed runs (not in the tables):", ""]
        lines += [f"- {r['method']} seed {r['seed']}: {r['failed']}" for r in failures]
    lines += ["", "![oracle reward against queries](oracle_curves.png)", ""]
    path.write_text("\n".join(lines))


def plot_curves(path: Path, rows: list[dict], labels: list[str], task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["method"] == label and "failed" not in r]
        if not mine:
            continue
        budgets = sorted({q for r in mine for q, _ in r["curve"]})
        stats = [mean_std([at_budget(r["curve"], b) for r in mine]) for b in budgets]
        mean = [m for m, _ in stats]
        std = [s for _, s in stats]
        colour = plt.cm.tab10(i % 10)
        # a step function: at a budget, the model fine-tuned on the queries made so far (none in between)
        ax.plot(budgets, mean, "o-", color=colour, label=label, drawstyle="steps-post")
        ax.fill_between(budgets, [m - s for m, s in stats], [m + s for m, s in zip(mean, std)], color=colour,
                        alpha=0.15, step="post")
    ax.set_xlabel("oracle queries given to the proxy (cumulative)")
    ax.set_ylabel("oracle reward of evaluation samples")
    ax.set_title(f"black-box optimisation on {task} (mean +- std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    command = "python -m sqdf_fast.bbo.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    with cli.run_errors():   # a bad run configuration exits 2 before any run
        results, rows, done, configs = start_comparison(
            args.out, args.labels, args.seeds, lambda label, seed: run_configs(args.task, label, seed, args.overrides,
                                                                               args.out))
    for i, ((label, seed), (train, cfg)) in enumerate(configs.items(), 1):
        if (label, seed) in done:
            continue
        run_dir = Path(train.out)
        if run_dir.exists():   # an interrupted earlier invocation's run: results.json does not have it
            shutil.rmtree(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        try:
            with open(run_dir.with_suffix(".log"), "w") as stream, contextlib.redirect_stdout(stream):
                summary = loop.optimise(train, cfg)
            rows.append(result_row(label, seed, summary, run_dir))
            line = (f"oracle reward {rows[-1]['oracle_reward_base']:.4g} -> {rows[-1]['oracle_reward_final']:.4g}, "
                    f"diversity {rows[-1]['diversity_final']:.4g}, fd {rows[-1]['fd_final']:.4g}, "
                    f"KL {rows[-1]['kl_final']:.4g}")
        except (ValueError, RuntimeError) as err:   # a diverged run is a result too
            rows.append({"method": label, "seed": seed, "failed": str(err), "wall_s": round(time.time() - start, 1)})
            line = f"FAILED: {err}"
        write_text_atomic(results, dumps(rows, indent=1)[0])
        print(f"[{i}/{len(configs)}] {label} seed {seed}: {line} | {time.time() - start:.0f} s", flush=True)
    machine = device_name(resolve_device(next(iter(configs.values()))[0].device))
    write_report(args.out / "report.md", rows, args.labels, command, args.task, machine)
    plot_curves(args.out / "oracle_curves.png", rows, args.labels, args.task)
    print(f"wrote {results}, {args.out / 'report.md'} and {args.out / 'oracle_curves.png'}")
    return rows


if __name__ == "__main__":
    main()
