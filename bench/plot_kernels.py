"""Bar charts of `bench/kernels.py` results: the latest run of each device, fused vs eager vs torch.compile.

    python bench/plot_kernels.py [--results bench/results/kernels.jsonl] [--out bench/results/kernels.png]
                                 [--metric ms|gbps] [--device SUBSTRING]

One row of panels per (device, op), one column per mode; in each panel a group of bars per shape and dtype, one
bar per implementation. Runs are told apart by the `run_id` every row carries (`kernels.py --run-id` lets
split invocations share one); the latest is the one with the newest timestamp.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.jsonl"
IMPL_COLORS = {"fused": "#1b9e77", "eager": "#d95f02", "compile": "#7570b3"}
OPS = ("policy_step", "guided_policy_step", "tweedie_x0", "sqdf_loss")
MODES = ("forward", "backward", "full")


def load_rows(path: Path) -> list[dict]:
    """Rows of a JSON-lines file or of a JSON list (what `kernels.py --json` writes)."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [row for row in rows if row.get("bench", "kernels") == "kernels" and "run_id" in row]


def latest_runs(rows: list[dict]) -> dict[str, list[dict]]:
    """device -> the rows of its latest run."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        runs.setdefault(row["device"], {}).setdefault(row["run_id"], []).append(row)
    latest = {}
    for device, by_run in runs.items():
        run_id = max(by_run, key=lambda rid: (max(r["timestamp"] for r in by_run[rid]), rid))
        latest[device] = by_run[run_id]
    return latest


def ordered(values, order) -> list:
    present = set(values)
    return [v for v in order if v in present] + sorted(present - set(order))


def plot(rows: list[dict], out: Path, metric: str = "ms") -> Path:
    runs = latest_runs(rows)
    if not runs:
        raise SystemExit("plot_kernels.py: no kernels.py rows to plot")
    panels = []  # (device, op, rows of that op)
    for device, run in sorted(runs.items()):
        for op in ordered({r["op"] for r in run}, OPS):
            panels.append((device, op, [r for r in run if r["op"] == op]))
    modes = ordered({r["mode"] for _, _, op_rows in panels for r in op_rows}, MODES)
    groups_max = max(len({(tuple(r["shape"]), r["dtype"]) for r in op_rows}) for _, _, op_rows in panels)
    fig, axes = plt.subplots(len(panels), len(modes), squeeze=False,
                             figsize=(max(4.6, 1.0 * groups_max) * len(modes), 3.2 * len(panels)))
    for i, (device, op, op_rows) in enumerate(panels):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            mode_rows = [r for r in op_rows if r["mode"] == mode]
            if not mode_rows:
                ax.axis("off")
                continue
            groups = []  # (shape, dtype) in the order the run measured them
            for r in mode_rows:
                key = ("x".join(map(str, r["shape"])), r["dtype"])
                if key not in groups:
                    groups.append(key)
            impls = ordered({r["impl"] for r in mode_rows}, tuple(IMPL_COLORS))
            width = 0.8 / len(impls)
            for k, impl in enumerate(impls):
                values = {("x".join(map(str, r["shape"])), r["dtype"]): r[metric] for r in mode_rows
                          if r["impl"] == impl}
                xs = [g + (k - (len(impls) - 1) / 2) * width for g in range(len(groups))]
                heights = [values.get(key, 0.0) for key in groups]
                bars = ax.bar(xs, heights, width, label=impl, color=IMPL_COLORS.get(impl))
                ax.bar_label(bars, fmt=lambda v: f"{v:.3g}", fontsize=6, rotation=90, padding=2)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{shape}\n{dtype}" for shape, dtype in groups], fontsize=7)
            values = [r[metric] for r in mode_rows if r[metric] > 0]
            if metric == "ms" and values:
                # times span decades across shapes: log axis from the decade below the fastest, room for labels
                ax.set_yscale("log")
                ax.set_ylim(10 ** math.floor(math.log10(min(values))), max(values) * 4)
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            elif values:
                ax.set_ylim(0, max(values) * 1.25)
            ax.set_ylabel("median ms (log)" if metric == "ms" else "GB/s")
            backend = next((r.get("backend") for r in mode_rows if r["impl"] == "fused"), None)
            ax.set_title(f"{op} / {mode}" + (f"  [fused: {backend}]" if backend else ""), fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
        axes[i][0].annotate(device, xy=(0, 0.5), xytext=(-axes[i][0].yaxis.labelpad - 28, 0),
                            xycoords=axes[i][0].yaxis.label, textcoords="offset points", rotation=90,
                            ha="right", va="center", fontsize=8)
    stamps = ", ".join(f"{device}: {max(r['timestamp'] for r in run)} (torch {run[0]['torch']})"
                       for device, run in runs.items())
    fig.suptitle(f"SQDF ops, fused vs eager vs torch.compile ({'median ms' if metric == 'ms' else 'GB/s'})\n{stamps}",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="kernels.jsonl, or a --json list")
    parser.add_argument("--out", type=Path, default=RESULTS.with_suffix(".png"))
    parser.add_argument("--metric", choices=("ms", "gbps"), default="ms")
    parser.add_argument("--device", help="only devices whose name contains this")
    args = parser.parse_args(argv)
    rows = load_rows(args.results)
    if args.device:
        rows = [r for r in rows if args.device.lower() in r["device"].lower()]
    out = plot(rows, args.out, args.metric)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
