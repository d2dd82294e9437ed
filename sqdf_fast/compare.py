"""`python -m sqdf_fast.compare`: run several methods and seeds on one task and measure the reward/diversity trade-off.

    python -m sqdf_fast.compare --task gmm2d --methods sqdf,draft,draft-lv,refl,alignprop,draft-kl --seeds 3 \\
        --out runs/compare-gmm2d [--ablations] [--set steps=40 --set alpha=0.5 ...]

Each (method, seed) is one `sqdf_fast.train` run (its run directory under OUT/runs/) with the task's defaults, the
method's own defaults below, then the --set overrides. Writes, and rewrites after every run:

    OUT/results.json   a list of rows: method, seed, reward, diversity, fd, path_kl, the task's target metrics
                       (dist_to_target, fd_to_target, mode_weight_error, mode_coverage where the task has a
                       target), wall_s, and the base model's values as base_<metric>
    OUT/report.md      the command, the machine, and a table of mean +- standard deviation over seeds; a run
                       that fails (e.g. stopped by the non-finite guard after diverging) is recorded as failed
                       and the comparison goes on
    OUT/pareto.png     reward against diversity, and against dist_to_target (or fd), one point per method
    OUT/samples/       each method's final evaluation samples (first seed) and the base model's

A run whose (method, seed) is already in OUT/results.json is not repeated, so an interrupted comparison continues
where it stopped (the run directory an interruption left unfinished is removed and the run starts again).

A label is a method, or a variant, optionally with options of its own after `@`: `sqdf@alpha=0.5@gamma=0.95`.
Variants name a method with changed options: `--ablations` adds SQDF without the discount (gamma = 1; with
gamma = 0.9 instead on a task whose default is no discount), without the consistency model (the reference's Tweedie
estimate) and without the replay buffer. Options apply in the order task defaults (for the method), variant, --set,
the label's own. Labels of one method that differ only in their `@` options form a sweep: the Pareto plot joins them
into that method's front, and the report reads the SQDF front at each other method's reward (matched reward).

Every run measures against the same target: target_alpha is pinned to the alpha of the task defaults and --set
(a task with a known p* ~ p0 exp(r / alpha) compares every method's samples with that one p*).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from sqdf_fast import cli, config
from sqdf_fast.distributed import resolve_device
from sqdf_fast.files import dumps, write_text_atomic
from sqdf_fast.info import device_name
from sqdf_fast.methods import METHODS
from sqdf_fast.train import QUALITY_METRICS as METRICS
from sqdf_fast.train import run

# A label -> (method, option overrides). Plain method names need no entry.
VARIANTS = {
    "sqdf-no-discount": ("sqdf", {"gamma": 1.0}),
    "sqdf-discount": ("sqdf", {"gamma": 0.9}),   # the discount ablation of a task that trains without one
    "sqdf-no-cm": ("sqdf", {"q_estimator": "tweedie"}),
    "sqdf-no-buffer": ("sqdf", {"buffer": False}),
}
ABLATIONS = ("sqdf-no-discount", "sqdf-no-cm", "sqdf-no-buffer")
# the tasks' target metrics: gmm2d's exact p*, digits' KL-tilted real digits (fd_to_target: Frechet distance to it)
TARGET_METRICS = ("dist_to_target", "fd_to_target", "mode_weight_error", "mode_coverage")


def parse_value(text: str):
    """An option value from --set: JSON where it parses (numbers, true/false, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sqdf_fast.compare", description=__doc__.split("\n\n")[0],
                                     epilog=cli.EPILOG)
    parser.add_argument("--task", default="digits", help="task of every run (default digits)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods ({', '.join(METHODS)}) or variants ({', '.join(VARIANTS)}), "
                             "each optionally with options of its own: name@key=value (default: every method)")
    parser.add_argument("--ablations", action="store_true", help=f"also run {', '.join(ABLATIONS)}")
    add_common_options(parser, "method", "a training option for every run (repeatable), e.g. --set steps=40")
    args = check_common(parser, parser.parse_args(argv))
    if args.ablations:
        args.labels += [label for label in ablation_labels(args.task) if label not in args.labels]
    return args


def add_common_options(parser: argparse.ArgumentParser, unit: str, set_help: str) -> None:
    """--seeds, --out, --set and --log-to, shared with sqdf_fast.bbo.compare (`unit`: what --methods lists)."""
    parser.add_argument("--seeds", type=int, default=3, help=f"seeds 0..N-1 per {unit} (default 3)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--log-to", metavar="TRACKERS",
                        help=f"experiment trackers of every run, one tracker run per ({unit}, seed): tensorboard, "
                             "wandb, none, comma-separated (default: the trainer's, auto)")


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """--methods into args.labels, --set KEY=VALUE items (and --log-to) into args.overrides, --seeds and --out
    checked (shared with sqdf_fast.bbo.compare)."""
    args.labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.labels:
        parser.error(f"--methods {args.methods!r}: names no method")
    args.overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        args.overrides[key.strip().replace("-", "_")] = parse_value(value.strip())
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be >= 1")
    if getattr(args, "log_to", None) is not None:
        args.overrides["log_to"] = args.log_to
    try:
        config.check_out(str(args.out))
    except ValueError as err:
        parser.error(str(err))
    return args


def parse_label(label: str) -> tuple[str, dict]:
    """`name@key=value@...` -> (name, {key: value}); name is a method or a variant."""
    name, *items = label.split("@")
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"method label {label!r}: expected NAME@KEY=VALUE[@KEY=VALUE...], got {item!r}")
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    return name, options


def family(label: str) -> str:
    """The sweep a label belongs to: its name without the `@` options."""
    return label.split("@")[0]


def run_config(task: str, label: str, seed: int, overrides: dict, out: Path) -> config.TrainConfig:
    name, own = parse_label(label)
    method, variant = VARIANTS.get(name, (name, {}))
    pinned = {"target_alpha": config.from_dict({"task": task, **overrides}, "--set").alpha}
    values = {"task": task, "method": method, **pinned, "log_group": out.name, **variant, **overrides, **own,
              "seed": seed, "out": str(out / "runs" / f"{label}-seed{seed}"), "progress": False}
    cfg = config.from_dict(values, f"{label} (seed {seed})")
    config.validate(cfg)
    return cfg


def result_row(label: str, seed: int, summary: dict) -> dict:
    row = {"method": label, "seed": seed}
    for name in METRICS + TARGET_METRICS:
        if f"{name}_final" in summary:
            row[name] = summary[f"{name}_final"]
            row[f"base_{name}"] = summary.get(f"{name}_base")
    row["wall_s"] = summary["wall_s"]
    return row


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict], labels: list[str]) -> list[dict]:
    """One entry per method (and one for the base model): {metric: (mean, std)} over its seeds."""
    columns = [m for m in METRICS + TARGET_METRICS if any(m in r for r in rows)] + ["wall_s"]
    table = []
    finished = [r for r in rows if "failed" not in r]
    base_rows = [r for r in finished if r["method"] == labels[0]] or finished
    if base_rows:
        table.append({"method": "base model", "seeds": len(base_rows), "failed": 0,
                      **{m: mean_std([r[f"base_{m}"] for r in base_rows]) for m in columns
                         if m not in ("wall_s", "path_kl") and r_has(base_rows, f"base_{m}")}})
    for label in labels:
        mine = [r for r in finished if r["method"] == label]
        failed = sum(r["method"] == label and "failed" in r for r in rows)
        if mine or failed:
            table.append({"method": label, "seeds": len(mine), "failed": failed,
                          **{m: mean_std([r[m] for r in mine]) for m in columns if mine and r_has(mine, m)}})
    return table


def r_has(rows: list[dict], key: str) -> bool:
    return all(row.get(key) is not None for row in rows)


def front_at(table: list[dict], reward: float, metric: str, reference: str = "sqdf") -> float | None:
    """The reference method's front (its sweep's points joined in reward order) read at `reward`: the metric
    interpolated linearly between the two points around it; None outside the swept reward range."""
    points = sorted((e["reward"][0], e[metric][0]) for e in table
                    if family(e["method"]) == reference and "reward" in e and metric in e)
    for (r0, m0), (r1, m1) in zip(points, points[1:]):
        if r0 <= reward <= r1:
            return m0 if r1 == r0 else m0 + (m1 - m0) * (reward - r0) / (r1 - r0)
    return None


def matched_reward_lines(table: list[dict], second: str | None) -> list[str]:
    """The report's matched-reward table: each other method against the SQDF front at the same reward."""
    sweep = [e for e in table if family(e["method"]) == "sqdf" and "reward" in e]
    if len(sweep) < 2:
        return []
    lower_better = second in ("fd", "dist_to_target")
    metrics = ["diversity"] + ([second] if second else [])
    lines = ["## At matched reward", "",
             f"The SQDF front joins the {len(sweep)} SQDF points ({', '.join(e['method'] for e in sweep)}) in "
             f"reward order; each other method is compared with that front read at the method's own mean reward "
             f"(linear between the two SQDF points around it; blank outside the swept rewards). Higher diversity"
             + (f" and lower {second}" if lower_better else "") + " is better.", "",
             "| method | reward | " + " | ".join(f"{m} | SQDF front {m}" for m in metrics) + " |",
             "|---|---|" + "---|---|" * len(metrics)]
    for entry in table:
        if family(entry["method"]) == "sqdf" or entry["method"] == "base model" or "reward" not in entry:
            continue
        cells = []
        for metric in metrics:
            front = front_at(table, entry["reward"][0], metric)
            cells += [f"{entry[metric][0]:.4g}" if metric in entry else "", "" if front is None else f"{front:.4g}"]
        lines.append(f"| {entry['method']} | {entry['reward'][0]:.4g} | " + " | ".join(cells) + " |")
    return lines + [""]


def second_metric(table: list[dict]) -> str | None:
    """The Pareto plot's second axis: distance to the target where the task knows it, else fd."""
    return next((m for m in ("dist_to_target", "fd") if all(m in entry for entry in table)), None)


def write_report(path: Path, table: list[dict], failures: list[dict], command: str, task: str, machine: str,
                 wall_s: float) -> None:
    columns = [c for c in METRICS + TARGET_METRICS + ("wall_s",) if any(c in entry for entry in table)]
    legend = ("Mean +- standard deviation over seeds. reward, diversity and fd are the trainer's final evaluation "
              "(fixed seeds); path_kl is the path KL to the base model in nats.")
    if "fd_to_target" in columns:
        legend += (" dist_to_target (energy distance) and fd_to_target (Frechet distance) compare the samples' "
                   "evaluator features with the KL-tilted target at the pinned target_alpha, the real digits of each "
                   "class weighted by exp(r / alpha) (lower is better: a natural tilt is near it, over-optimisation "
                   "far from it).")
    elif "dist_to_target" in columns:
        legend += (" The target metrics compare the samples with the exact KL-tilted target p* at the pinned "
                   "target_alpha (lower dist_to_target and mode_weight_error are better, mode_coverage 1 is every "
                   "target mode found).")
    lines = [f"# Method comparison on `{task}`", "",
             f"Command: `{command}`", "",
             f"Machine: {machine}, torch {torch.__version__}; sum of the runs' wall "
             f"times {wall_s / 60:.1f} min.", "", legend, "",
             "| method | seeds | failed | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for entry in table:
        cells = [f"{entry[c][0]:.4g} +- {entry[c][1]:.2g}" if c in entry else "" for c in columns]
        lines.append(f"| {entry['method']} | {entry['seeds']} | {entry['failed']} | " + " | ".join(cells) + " |")
    if failures:
        lines += ["", "Failed runs (not in the means above):", ""]
        lines += [f"- {r['method']} seed {r['seed']}: {r['failed']}" for r in failures]
    lines += ["", "![Pareto plots](pareto.png)", ""]
    lines += matched_reward_lines(table, second_metric(table))
    samples = sorted(path.parent.glob("samples/*.png"))
    if samples:
        lines += ["Final evaluation samples of each method's first seed:", ""]
        lines += [f"**{p.stem}**\n\n![{p.stem}](<samples/{p.name}>)\n" for p in samples]
    path.write_text("\n".join(lines))


def plot_pareto(path: Path, table: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    second = second_metric(table)
    panels = [("diversity", "diversity (higher: more diverse)")]
    if second is not None:
        panels.append((second, f"{second} (lower: closer to the {'target' if second != 'fd' else 'data'})"))
    families = list(dict.fromkeys(family(entry["method"]) for entry in table))
    colours = {name: plt.cm.tab20(i % 20) for i, name in enumerate(families)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.6), squeeze=False)
    for ax, (metric, label) in zip(axes[0], panels):
        for name in families:
            points = sorted((e["reward"], e[metric], e["method"]) for e in table
                            if family(e["method"]) == name and metric in e and "reward" in e)
            if not points:
                continue
            colour, marker = colours[name], "*" if name == "base model" else "o"
            for i, ((y, dy), (x, dx), method) in enumerate(points):
                ax.errorbar(x, y, xerr=dx, yerr=dy, fmt=marker, color=colour, markersize=10 if marker == "*" else 6,
                            capsize=3, label=name if i == 0 else None)
                if "@" in method:   # a sweep point: say which
                    ax.annotate(method.partition("@")[2], (x, y), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
            if len(points) > 1:   # the sweep's front
                ax.plot([p[1][0] for p in points], [p[0][0] for p in points], "-", color=colour, alpha=0.6)
        xs = [e[metric][0] for e in table if metric in e and "reward" in e]
        if xs and min(xs) > 0 and max(xs) > 1e3 * min(xs):   # a diverged method would squash every other point
            ax.set_xscale("log")
            label += ", log scale"
        ax.set_xlabel(label)
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def copy_first_seed_samples(out: Path, labels: list[str]) -> None:
    """OUT/samples/<method>.png: seed 0's final samples (and base-model.png), so the report needs no run directories."""
    (out / "samples").mkdir(exist_ok=True)
    for label in labels:
        run_dir = out / "runs" / f"{label}-seed0"
        if (run_dir / "samples_final.png").exists():
            shutil.copyfile(run_dir / "samples_final.png", out / "samples" / f"{label}.png")
    first = out / "runs" / f"{labels[0]}-seed0" / "samples_base.png"
    if first.exists():
        shutil.copyfile(first, out / "samples" / "base-model.png")


def start_comparison(out: Path, labels: list[str], seeds: int, make_config) -> tuple[Path, list[dict], set, dict]:
    """OUT/results.json's path and rows so far (an interrupted comparison continues), the (label, seed) pairs they
    hold, and every run's configuration `make_config(label, seed)`, all checked before the first run starts
    (cli.UsageError naming a bad one)."""
    try:
        configs = {(label, seed): make_config(label, seed) for label in labels for seed in range(seeds)}
    except ValueError as err:
        raise cli.UsageError(str(err)) from err
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    return results_path, rows, {(r["method"], r["seed"]) for r in rows}, configs


def ablation_labels(task: str) -> list[str]:
    """--ablations' labels for `task` (the discount ablation adds one where the task trains without it)."""
    ablations = list(ABLATIONS)
    if config.from_dict({"task": task}, "task").gamma == 1.0:   # the task trains without a discount
        ablations[0] = "sqdf-discount"
    return ablations


def compare(out: str | Path, methods: str | list[str] = ",".join(METHODS), seeds: int = 3, task: str = "digits",
            overrides: dict | None = None, command: str | None = None) -> list[dict]:
    """Run every (method label, seed) on `task` into `out` (runs/, results.json, report.md, pareto.png), skipping
    those results.json already holds; `overrides`: training options for every run (as --set). Returns the rows of
    results.json. Every configuration is checked first (ValueError naming a bad one); a run that fails is recorded
    as failed and the comparison goes on. `python -m sqdf_fast.compare` is this function."""
    out = Path(out)
    labels = [m.strip() for m in methods.split(",") if m.strip()] if isinstance(methods, str) else list(methods)
    if not labels:
        raise cli.UsageError(f"methods={methods!r}: names no method")
    overrides = {key.replace("-", "_"): value for key, value in (overrides or {}).items()}
    command = command or f"sqdf_fast.compare.compare({str(out)!r}, {labels!r}, seeds={seeds}, task={task!r}, " \
                         f"overrides={overrides!r})"
    results_path, rows, done, configs = start_comparison(
        out, labels, seeds, lambda label, seed: run_config(task, label, seed, overrides, out))
    start = time.time()
    for i, ((label, seed), cfg) in enumerate(configs.items(), 1):
        if (label, seed) in done:
            continue
        log = Path(cfg.out).with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        if Path(cfg.out).exists():   # an interrupted earlier invocation's run: results.json does not have it
            print(f"removing the unfinished run {cfg.out}", flush=True)
            shutil.rmtree(cfg.out)
        run_start = time.time()
        try:
            with open(log, "w") as stream, contextlib.redirect_stdout(stream):
                summary = run(cfg)
            rows.append(result_row(label, seed, summary))
            line = " | ".join(f"{m} {rows[-1][m]:.4g}" for m in METRICS + TARGET_METRICS if m in rows[-1])
        except (ValueError, RuntimeError) as err:   # a diverged run is a result too: record it and go on
            rows.append({"method": label, "seed": seed, "failed": str(err),
                         "wall_s": round(time.time() - run_start, 1)})
            line = f"FAILED: {err} (log: {log})"
        write_text_atomic(results_path, dumps(rows, indent=1)[0])   # each run's result, before the next
        print(f"[{i}/{len(configs)}] {label} seed {seed}: {line} | {rows[-1]['wall_s']:.0f} s", flush=True)
    copy_first_seed_samples(out, labels)
    table = summarise([r for r in rows if r["method"] in labels], labels)
    total = sum(r["wall_s"] for r in rows if r["method"] in labels)
    machine = device_name(resolve_device(next(iter(configs.values())).device))
    failures = [r for r in rows if r["method"] in labels and "failed" in r]
    write_report(out / "report.md", table, failures, command, task, machine, total)
    plot_pareto(out / "pareto.png", table)
    print(f"wrote {results_path}, {out / 'report.md'} and {out / 'pareto.png'} "
          f"(this invocation {time.time() - start:.0f} s)")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)   # a bad argument exits 2
    command = "python -m sqdf_fast.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    with cli.run_errors():   # a bad run configuration exits 2 before any run
        return compare(args.out, args.labels, args.seeds, args.task, args.overrides, command)


if __name__ == "__main__":
    main()
